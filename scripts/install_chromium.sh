#!/usr/bin/env sh
# Install Debian's headless-capable Chromium and its WebDriver for the browser tests.
# Idempotent: exits at once when chromium is already on PATH. Quiet unless something fails.
set -eu

if command -v chromium >/dev/null 2>&1; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium.sh: apt-get not found; install chromium and chromium-driver by hand" >&2
    exit 1
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
elif command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
else
    echo "install_chromium.sh: not root and sudo is missing; cannot install chromium" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# Quiet on success; the whole apt log on failure.
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_chromium.sh: apt-get could not install chromium" >&2
    exit 1
fi

command -v chromium >/dev/null 2>&1 || {
    echo "install_chromium.sh: chromium still missing after apt-get install" >&2
    exit 1
}

"""The heap trimmer gives freed pages back to the system (glibc)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from deepfeat.app.memory import heap_trimmer, trim_forever

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or heap_trimmer() is None, reason="needs glibc's malloc_trim"
)

# In a child process, since it changes the process's malloc settings. Blocks below the mmap threshold,
# every other one freed, so the freed half sits in the middle of the heap where free() never returns it;
# M_TRIM_THRESHOLD is raised so that free() does not trim the top either: any drop is the trimmer's.
_CHILD = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np
    from deepfeat.app.memory import heap_trimmer

    def anon():
        status = open("/proc/self/status").read().split("RssAnon:")[1]
        return int(status.split()[0]) // 1024
    ctypes.CDLL("libc.so.6").mallopt(-1, 1 << 30)
    blocks = [np.ones(96 * 1024, np.uint8) for _ in range(3000)]
    for i in range(0, len(blocks) - 1, 2):
        blocks[i] = None
    before = anon()
    if sys.argv[1] == "trim":
        heap_trimmer()()
    after = anon()
    print(before - after)
    """
)


def _freed_mib(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True, check=True)
    return int(done.stdout)


@glibc
def test_trimming_returns_freed_heap_pages() -> None:
    assert _freed_mib("keep") < 16  # without the trimmer the freed 140 MiB stay resident
    assert _freed_mib("trim") > 100


@glibc
def test_trim_forever_runs_until_cancelled() -> None:
    async def run() -> None:
        task = asyncio.create_task(trim_forever(0.01))
        await asyncio.sleep(0.05)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())

"""``deepfeat add-semantic``: compute the semantic vectors of stored images that lack them.

A store written before semantic vectors (or by a service with ``semantic_layer=none``) keeps working
for visual search; this command makes it answer ``similarity=semantic`` too. It records the semantic
layer in the store's identity (:meth:`ImageStore.adopt_semantic`), then, for every image without a
semantic vector, re-decodes the file at its recorded ``source`` path when it still exists with the
same content (sha256), and stores the vector (an UPDATE in batches; the semantic index of every
process picks it up on its next sync). Images whose file moved or changed are listed, one line each,
with a summary: re-index their folder (``deepfeat index``) to give them one.

Heavy imports (torch, FAISS) happen inside :func:`run`, so ``deepfeat --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from deepfeat.scripts.cli_common import echo, echo_json, existing_manifest, settings_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    from deepfeat.index.store import ImageStore
    from deepfeat.models.config import EmbedderConfig, EmbedderFields
    from deepfeat.models.embedder import Embedder
    from deepfeat.models.errors import ImageError
    from deepfeat.models.images import load_image
    from deepfeat.runtime import embedder_config, image_limits, open_store

    settings = settings_from_args(args)
    manifest = existing_manifest(settings)
    if manifest is None:
        return 2
    config = embedder_config(settings, manifest)
    adopting = config.semantic_layer is None  # the store keeps no semantic vectors yet
    if adopting:
        if "semantic_layer" in settings.explicit_embedder_options():
            sys.stderr.write("error [invalid_argument]: --semantic-layer none: there is nothing to add\n")
            return 2
        default = EmbedderFields.model_fields["semantic_layer"].default
        config = EmbedderConfig.model_validate({**config.model_dump(), "semantic_layer": default})
    embedder = Embedder(config, device=settings.device, precision=settings.precision)
    ImageStore.adopt_semantic(
        settings.data_dir,
        fingerprint=embedder.fingerprint,
        embedder_config=embedder.config.model_dump(mode="json"),
    )
    limits = image_limits(settings)
    added, missing, changed, unreadable = 0, 0, 0, 0
    skipped_rows: list[dict[str, str | None]] = []

    def skip(reason: str, source: str | None, detail: str = "") -> None:
        skipped_rows.append({"source": source, "reason": reason, **({"detail": detail} if detail else {})})
        if not args.json:  # one line per image, as it comes
            echo(f"{reason}  {source or '(no source path recorded)'}" + (f": {detail}" if detail else ""))

    with open_store(settings, embedder) as store:
        for chunk in store.iter_missing_semantic(batch=max(1, args.batch)):
            seqs, images = [], []
            for seq, sha256, source in chunk:
                if not source or not os.path.isfile(source):
                    skip("missing", source)
                    missing += 1
                    continue
                try:
                    loaded = load_image(source, limits=limits, draft_size=embedder.decode_size)
                except (ImageError, OSError) as exc:
                    skip("unreadable", source, str(exc))
                    unreadable += 1
                    continue
                if loaded.sha256 != sha256:
                    skip("changed", source)
                    changed += 1
                    continue
                seqs.append(seq)
                images.append(loaded.image)
            if images:
                added += store.set_semantic(seqs, embedder.embed_semantic(images))
        total = store.stats()["semantic_count"]
    skipped = missing + changed + unreadable
    if args.json:
        echo_json(
            {
                "added": added,
                "missing": missing,
                "changed": changed,
                "unreadable": unreadable,
                "with_semantic": total,
                "semantic_layer": embedder.config.semantic_layer,
                "skipped": skipped_rows,
            }
        )
        return 0
    echo(
        f"added semantic vectors ({embedder.config.semantic_layer}, {embedder.semantic_dim}-d) to {added} "
        f"images; {total} images now have one; {skipped} skipped ({missing} missing, {changed} changed, "
        f"{unreadable} unreadable)"
    )
    if skipped:
        echo(
            "the skipped images keep working for visual search; to give them semantic vectors, re-index "
            f"their folders: `deepfeat index FOLDER --data-dir {settings.data_dir}` (a moved file is "
            "recognised by its content and gets its semantic vector; a changed file is indexed as a new "
            "image, and its old entry keeps visual search only)"
        )
    if adopting:
        echo("restart a running service on this store so it stores semantic vectors for new images too")
    return 0

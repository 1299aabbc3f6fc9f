"""Choose on the tuning parts, report on the validation parts: the protocol ``deepfeat eval`` runs.

1. Every collection (and every distractor folder) is split by ``split.split_folder``: per top-level
   sub-folder, by a hash of the seed and each file's content.
2. The whole grid runs on the tuning parts, one report per collection.
3. One configuration is chosen by ``CRITERION``: the highest mean of the primary metric (category:
   mAP; copy: recall@1) over the collections' tuning parts, each collection weighing the same; ties
   go to the higher mean of the secondary metric (category: P@k at the smallest k; copy: mAP), then
   to the configuration that comes first in the grid.
4. The chosen configuration, the shipped default (``EmbedderConfig()`` resolved: what a user gets
   without options) and the naive baseline of each model (penultimate layer, centre crop, one scale,
   no whitening) run on the validation parts, which took no part in the choice. Those are the
   figures to report.

Copy mode refuses a part whose distractors are fewer than twice its originals (unless
``allow_few_distractors``): with few distractors a query finds its original by elimination, and the
figures say little about a real store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.scripts.evaluate.bank import FeatureBank
from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.grid import Config, same_point
from deepfeat.scripts.evaluate.runner import (
    class_files,
    content_id,
    evaluate_category_set,
    evaluate_copy_set,
    list_images,
    load_category_set,
    load_images,
    make_copy_set,
    whiten_images,
)
from deepfeat.scripts.evaluate.split import PARTS, SPLIT_RULE, SPLIT_SEED, FolderSplit, split_folder
from deepfeat.scripts.evaluate.transforms import check_transforms

__all__ = [
    "CRITERION",
    "MIN_DISTRACTOR_RATIO",
    "collection_names",
    "default_config",
    "rank_configs",
    "run_category",
    "run_copy",
    "validation_rows",
]

log = logging.getLogger(__name__)

MIN_DISTRACTOR_RATIO = 2
CRITERION = (
    "highest mean {primary} over the collections' tuning parts (each collection weighs the same); "
    "ties: higher mean {secondary}, then the earlier configuration in the grid"
)


def collection_names(folders: Sequence[Path]) -> list[str]:
    """Each folder's name, made unique with -2, -3... where two folders share one."""
    names: list[str] = []
    for folder in folders:
        base = Path(folder).resolve().name or str(folder)
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def default_config() -> Config:
    """The shipped retrieval default, as a grid point: ``EmbedderConfig()`` resolved against the
    registry (layer named, pooling decided), never whitened (a store is not, until ``deepfeat whiten``)."""
    from deepfeat.models.config import EmbedderConfig
    from deepfeat.models.identity import resolve

    c = resolve(EmbedderConfig())
    return Config(
        model=c.model,
        layer=str(c.layer),
        pooling=str(c.pooling),
        whitening="none",
        scales=tuple(float(s) for s in c.scales),
        resize_mode=c.resize_mode,
        max_side=c.max_side,
        gem_p=c.gem_p,
        regions=c.regions,
        lowpass=c.lowpass,
    )


def validation_rows(
    grid: Sequence[Config], chosen: Config, default: Config
) -> list[tuple[list[str], Config]]:
    """(roles, configuration) for the validation run: chosen, default, each model's baseline; a
    configuration that plays several roles runs once."""
    rows: list[tuple[list[str], Config]] = []

    def add(role: str, cfg: Config) -> None:
        for roles, other in rows:
            if same_point(other, cfg):
                roles.append(role)
                return
        rows.append(([role], cfg))

    add("chosen", chosen)
    add("default", default)
    for cfg in grid:
        if cfg.baseline:
            add("baseline", cfg)
    return rows


def rank_configs(
    reports: dict[str, dict[str, Any]], configs: Sequence[Config], primary: str, secondary: str
) -> list[dict[str, Any]]:
    """The grid ranked by ``CRITERION`` from the per-collection tuning reports, best first."""
    by_name = {name: {r["config"]: r["metrics"] for r in rep["results"]} for name, rep in reports.items()}
    rows: list[dict[str, Any]] = []
    for i, cfg in enumerate(configs):
        per = {name: metrics[cfg.name] for name, metrics in by_name.items()}
        rows.append(
            {
                "config": cfg.name,
                "grid_index": i,
                "baseline": cfg.baseline,
                "mean": float(np.mean([m[primary] for m in per.values()])),
                f"mean_{secondary}": float(np.mean([m[secondary] for m in per.values()])),
                "per_collection": {name: m[primary] for name, m in per.items()},
            }
        )
    rows.sort(key=lambda r: (-r["mean"], -r[f"mean_{secondary}"], r["grid_index"]))
    return rows


def _whiten(whiten_on: str | os.PathLike[str] | None, default_label: str) -> tuple[Any, str]:
    return whiten_images(whiten_on), (str(whiten_on) if whiten_on else default_label)


def _assemble(
    mode: str,
    *,
    primary: str,
    secondary: str,
    configs: Sequence[Config],
    splits: dict[str, FolderSplit],
    split_seed: int,
    tuning: dict[str, dict[str, Any]],
    ranking: list[dict[str, Any]],
    rows: list[tuple[list[str], Config]],
    validation: dict[str, dict[str, Any]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The run's report: what was split how, the tuning ranking, the choice and the validation rows."""
    for rep in validation.values():
        for r, (roles, _) in zip(rep["results"], rows, strict=True):
            r["roles"] = list(roles)
    summary = []
    for roles, cfg in rows:
        per = {
            name: next(r["metrics"] for r in rep["results"] if r["config"] == cfg.name)
            for name, rep in validation.items()
        }
        keep = (primary, secondary, "hard_recall@1") if mode == "copy" else (primary, secondary)
        summary.append(
            {
                "roles": list(roles),
                "config": cfg.name,
                **cfg.fields(),
                "per_collection": {name: {k: m[k] for k in keep} for name, m in per.items()},
                "mean": float(np.mean([m[primary] for m in per.values()])),
                f"mean_{secondary}": float(np.mean([m[secondary] for m in per.values()])),
            }
        )
    chosen = next(cfg for roles, cfg in rows if "chosen" in roles)
    default = next(cfg for roles, cfg in rows if "default" in roles)
    return {
        "mode": mode,
        "primary_metric": primary,
        "secondary_metric": secondary,
        "criterion": CRITERION.format(primary=primary, secondary=secondary),
        "split": {"seed": split_seed, "rule": SPLIT_RULE},
        "collections": {
            name: {
                "folder": str(sp.root),
                "tune": sp.counts()["tune"],
                "validation": sp.counts()["validation"],
                "by_group": sp.counts_by_stratum(),
            }
            for name, sp in splits.items()
        },
        **extra,
        "configurations": len(configs),
        "chosen": chosen.name,
        "default": default.name,
        "ranking": ranking,
        "validation_summary": summary,
        "tuning": tuning,
        "validation": validation,
    }


# ---------------------------------------------------------------------------------------------------
# category retrieval


def run_category(
    folders: Sequence[Path],
    configs: Sequence[Config],
    *,
    ks: Sequence[int] = (1, 5, 10),
    bank: FeatureBank,
    split_seed: int = SPLIT_SEED,
    whiten_on: str | os.PathLike[str] | None = None,
    limit_per_class: int | None = None,
) -> dict[str, Any]:
    """Category retrieval on each folder (one sub-folder per class): tune, choose, validate."""
    names = collection_names(folders)
    classes: dict[str, tuple[dict[Path, int], list[str]]] = {}
    splits: dict[str, FolderSplit] = {}
    for name, folder in zip(names, folders, strict=True):
        paths, labels, class_names = class_files(Path(folder))
        small = {c: int((labels == i).sum()) for i, c in enumerate(class_names) if (labels == i).sum() < 4}
        if small:
            raise EvalError(
                f"{folder}: every class needs at least 4 images (2 in each part of the tuning/validation "
                f"split); too few in {small}"
            )
        classes[name] = (dict(zip(paths, labels.tolist(), strict=True)), class_names)
        splits[name] = split_folder(Path(folder), paths, seed=split_seed)
    white, white_label = _whiten(whiten_on, "database")

    def part_reports(part: str, cfgs: Sequence[Config]) -> dict[str, dict[str, Any]]:
        bank.register(cfgs)
        out = {}
        for name, sp in splits.items():
            label_of, class_names = classes[name]
            paths = sp.part(part)
            data = load_category_set(
                paths,
                np.array([label_of[p] for p in paths]),
                class_names,
                limit_per_class=limit_per_class,
                where=f" in the {part} part of {sp.root}",
            )
            set_name = f"{name}/{part}"
            out[name] = evaluate_category_set(
                data,
                cfgs,
                ks=ks,
                bank=bank,
                set_name=set_name,
                whiten_on=white,
                whiten_label=white_label,
                folder=sp.root,
            )
            out[name]["part"] = part
            bank.release(set_name)
        return out

    primary, secondary = "mAP", f"P@{min(ks)}"
    tuning = part_reports("tune", configs)
    ranking = rank_configs(tuning, configs, primary, secondary)
    rows = validation_rows(configs, configs[ranking[0]["grid_index"]], default_config())
    validation = part_reports("validation", [cfg for _, cfg in rows])
    return _assemble(
        "category",
        primary=primary,
        secondary=secondary,
        configs=configs,
        splits=splits,
        split_seed=split_seed,
        tuning=tuning,
        ranking=ranking,
        rows=rows,
        validation=validation,
        extra={"ks": list(ks), "limit_per_class": limit_per_class},
    )


# ---------------------------------------------------------------------------------------------------
# copy detection


def _distractor_parts(
    folders: Sequence[Path], exclude: set[str], split_seed: int
) -> tuple[dict[str, list[Path]], dict[str, Any]]:
    """Each part's distractor files (every folder split like a collection), without exact copies of
    an original (they would be correct hits counted as misses) or a second file of one content."""
    parts: dict[str, list[Path]] = {p: [] for p in PARTS}
    seen: set[str] = set()
    dropped = 0
    for folder in folders:
        sp = split_folder(Path(folder), list_images(Path(folder)), seed=split_seed)
        for path, sha, part in zip(sp.paths, sp.sha256, sp.parts, strict=True):
            if sha in exclude or sha in seen:
                dropped += 1
                continue
            seen.add(sha)
            parts[part].append(path)
    info = {
        "folders": [str(f) for f in folders],
        **{part: len(paths) for part, paths in parts.items()},
        "dropped_copies": dropped,
    }
    return parts, info


def _check_distractors(
    splits: dict[str, FolderSplit], distractors: dict[str, list[Path]], allow: bool
) -> None:
    short = [
        f"{name} {part}: {sp.counts()[part]} originals, {len(distractors[part])} distractors"
        for name, sp in splits.items()
        for part in PARTS
        if len(distractors[part]) < MIN_DISTRACTOR_RATIO * sp.counts()[part]
    ]
    if not short:
        return
    if allow:
        log.warning("fewer distractors than %dx the originals: %s", MIN_DISTRACTOR_RATIO, "; ".join(short))
        return
    raise EvalError(
        f"copy mode needs at least {MIN_DISTRACTOR_RATIO}x as many distractors as originals in each part "
        f"(with fewer, a query finds its original by elimination): {'; '.join(short)}. Add folders with "
        "--distractors (a prepared category collection will do), or pass --allow-few-distractors"
    )


def run_copy(
    folders: Sequence[Path],
    configs: Sequence[Config],
    *,
    distractors: Sequence[Path] = (),
    transforms: Sequence[str],
    seed: int = 0,
    split_seed: int = SPLIT_SEED,
    bank: FeatureBank,
    ks: Sequence[int] = (1, 5, 10),
    whiten_on: str | os.PathLike[str] | None = None,
    allow_few_distractors: bool = False,
) -> dict[str, Any]:
    """Copy detection on each folder of originals, among the shared distractors: tune, choose, validate.

    Raises:
        EvalError: an unknown transform, fewer than 4 originals in a folder, or too few distractors
            (checked on the file lists, before anything is decoded).
    """
    check_transforms(transforms)
    names = collection_names(folders)
    splits: dict[str, FolderSplit] = {}
    for name, folder in zip(names, folders, strict=True):
        paths = list_images(Path(folder))
        if len(paths) < 4:
            raise EvalError(
                f"copy mode needs at least 4 originals in {folder} (2 in each part of the tuning/validation "
                f"split), found {len(paths)}"
            )
        splits[name] = split_folder(Path(folder), paths, seed=split_seed)
    exclude = {sha for sp in splits.values() for sha in sp.sha256}
    d_parts, d_info = _distractor_parts(distractors, exclude, split_seed)
    _check_distractors(splits, d_parts, allow_few_distractors)
    white, white_label = _whiten(whiten_on, "database (originals + distractors)")
    d_failed: list[str] = []

    def part_reports(part: str, cfgs: Sequence[Config]) -> dict[str, dict[str, Any]]:
        bank.register(cfgs)
        d_imgs, _, failed = load_images(d_parts[part])
        d_failed.extend(failed)
        out = {}
        for name, sp in splits.items():
            images, kept, failed = load_images(sp.part(part))
            sha = sp.sha_of()
            data = make_copy_set(
                images,
                d_imgs,
                transforms=transforms,
                seed=seed,
                ids=[content_id(sha[p]) for p in kept],
                failed=failed,
                where=f" in the {part} part of {sp.root}",
            )
            set_names = (f"{name}/{part}/originals", f"distractors/{part}", f"{name}/{part}/queries")
            out[name] = evaluate_copy_set(
                data,
                cfgs,
                ks=ks,
                bank=bank,
                set_names=set_names,
                whiten_on=white,
                whiten_label=white_label,
                folder=sp.root,
            )
            out[name]["part"] = part
            bank.release(set_names[0])
            bank.release(set_names[2])
        bank.release(f"distractors/{part}")
        return out

    primary, secondary = "recall@1", "mAP"
    tuning = part_reports("tune", configs)
    ranking = rank_configs(tuning, configs, primary, secondary)
    rows = validation_rows(configs, configs[ranking[0]["grid_index"]], default_config())
    validation = part_reports("validation", [cfg for _, cfg in rows])
    d_info["skipped"] = d_failed
    return _assemble(
        "copy",
        primary=primary,
        secondary=secondary,
        configs=configs,
        splits=splits,
        split_seed=split_seed,
        tuning=tuning,
        ranking=ranking,
        rows=rows,
        validation=validation,
        extra={
            "distractors": d_info,
            "min_distractor_ratio": None if allow_few_distractors else MIN_DISTRACTOR_RATIO,
            "transforms": list(transforms),
            "seed": seed,
            "ks": list(ks),
        },
    )

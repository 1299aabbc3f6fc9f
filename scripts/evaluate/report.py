"""What a run hands back: the report dict, its fixed-width table and summary, the JSON file and the plot.

Everything here reads the report dict, never a ``Config`` or a bank, so a table or a plot can be
redrawn from a saved ``--json`` report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from deepfeat.scripts.evaluate.errors import EvalError
from deepfeat.scripts.evaluate.transforms import HARD_TRANSFORMS

__all__ = [
    "build_report",
    "format_protocol",
    "format_table",
    "format_summary",
    "plot_paths",
    "save_plot",
    "write_json",
]

_AXES = ("model", "layer", "pooling", "whitening", "scales", "resize_mode", "regions")


def build_report(
    mode: str, folder: Any, results: list[dict[str, Any]], primary: str, info: dict[str, Any]
) -> dict[str, Any]:
    """The result rows with what they were measured on (``info``), the best row and the baseline."""
    ranked = sorted(results, key=lambda r: -r["metrics"][primary])
    baselines = [r for r in results if r["baseline"]]
    return {
        "mode": mode,
        "folder": str(folder),
        "primary_metric": primary,
        **info,
        "best": ranked[0]["config"],
        "baseline": baselines[0]["config"] if baselines else None,
        "marginals": _marginals(results, primary),
        "results": results,
    }


def _marginals(results: list[dict[str, Any]], primary: str) -> dict[str, dict[str, dict[str, float]]]:
    """For each axis value: the mean and the best of the primary metric over every other axis (the
    baseline is left out: it would count once for its layer and never for the others)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for axis in _AXES:
        groups: dict[str, list[float]] = {}
        for r in results:
            if r["baseline"]:
                continue
            value = _scales_label(r) if axis == "scales" else str(r.get(axis, 0))
            groups.setdefault(value, []).append(r["metrics"][primary])
        if len(groups) > 1:
            out[axis] = {
                v: {"mean": float(np.mean(x)), "best": float(np.max(x)), "n": len(x)}
                for v, x in groups.items()
            }
    return out


def _pool_label(r: dict[str, Any]) -> str:
    return f"gem{r['gem_p']:g}" if r["pooling"] == "gem" else str(r["pooling"])


def _resize_label(r: dict[str, Any]) -> str:
    return "crop" if r["resize_mode"] == "crop" else f"full{r['max_side']}"


def _white_label(r: dict[str, Any]) -> str:
    return "-" if r["whitening"] == "none" else str(r["whitening_dim"])


def _scales_label(r: dict[str, Any]) -> str:
    return "+".join(f"{s:.2g}" for s in r["scales"])


def _regions_label(r: dict[str, Any]) -> str:
    return f"{r['regions']}x{r['regions']}" if r.get("regions") else "-"


def format_table(report: dict[str, Any], *, top: int | None = None) -> str:
    """Fixed-width text: one row per configuration, best first, the baseline marked."""
    mode = report["mode"]
    primary = report["primary_metric"]
    rows = sorted(report["results"], key=lambda r: -r["metrics"][primary])
    ranked = list(enumerate(rows, 1))
    if top is not None:  # the N best, and the baseline wherever it ranks
        ranked = [(i, r) for i, r in ranked if i <= top or r["baseline"]]
    if mode == "category":
        metric_cols = ["mAP"] + [f"P@{k}" for k in report["ks"]] + [f"R@{k}" for k in report["ks"]]
    else:
        metric_cols = ["recall@1", "mAP", "hard_recall@1", *report["transforms"]]
    widths = [max(8, len(c)) for c in metric_cols]
    head = f"{'#':>3} {'model':<18} {'layer':<11} {'pool':<6} {'resize':<8} {'scales':<11} {'white':<6} {'reg':<3}"
    head += "".join(f" {c:>{w}}" for c, w in zip(metric_cols, widths, strict=True)) + f" {'img/s':>7}"
    lines = [head, "-" * len(head)]
    for i, r in ranked:
        cfg_cols = (
            f"{i:>3} {r['model'][:18]:<18} {r['layer'][:11]:<11} {_pool_label(r):<6} {_resize_label(r):<8} "
            f"{_scales_label(r)[:11]:<11} {_white_label(r):<6} {_regions_label(r):<3}"
        )
        # copy mode: a transform's column is its recall@1
        values = [
            r["per_transform"][c]["recall@1"]
            if mode == "copy" and c in report["transforms"]
            else r["metrics"][c]
            for c in metric_cols
        ]
        ips = r["images_per_s"]
        lines.append(
            cfg_cols
            + "".join(f" {v:>{w}.3f}" for v, w in zip(values, widths, strict=True))
            + (f" {ips:>7.1f}" if ips is not None else f" {'-':>7}")
            + _marker(r)
        )
    return "\n".join(lines)


def _marker(r: dict[str, Any]) -> str:
    """'  <- chosen, default' on a validation row; '  <- baseline' on the grid's baseline row."""
    roles = r.get("roles") or (["baseline"] if r["baseline"] else [])
    return f"  <- {', '.join(roles)}" if roles else ""


def format_summary(report: dict[str, Any]) -> str:
    """What was measured, the spread over the grid, the best row against the baseline, and the
    per-axis marginals that say which choice mattered."""
    primary = report["primary_metric"]
    by_name = {r["config"]: r for r in report["results"]}
    best, base = by_name[report["best"]], by_name.get(report["baseline"] or "")
    lines = _summary_header(report)
    vals = [r["metrics"][primary] for r in report["results"]]
    lines.append(
        f"{primary} over {len(vals)} configurations: best {max(vals):.3f}, median {float(np.median(vals)):.3f}, "
        f"mean {float(np.mean(vals)):.3f}, worst {min(vals):.3f}"
    )
    lines.append(
        f"best:     {best['config']}  {primary}={best['metrics'][primary]:.3f}" + _hard(best, report)
    )
    if base:
        lines.append(
            f"baseline: {base['config']}  {primary}={base['metrics'][primary]:.3f}" + _hard(base, report)
        )
    for axis, values in report["marginals"].items():
        parts = ", ".join(
            f"{v}: mean {s['mean']:.3f} best {s['best']:.3f}"
            for v, s in sorted(values.items(), key=lambda kv: -kv[1]["mean"])
        )
        lines.append(f"  by {axis:<11} {parts}")
    return "\n".join(lines)


def _summary_header(report: dict[str, Any]) -> list[str]:
    if report["mode"] == "category":
        return [
            f"category retrieval on {report['folder']}: {report['images']} images, classes {report['classes']}; "
            f"chance mAP {report['chance_mAP']:.3f}",
            "mAP = mean over queries of average precision; P@k/R@k = mean over queries",
        ]
    return [
        f"copy detection on {report['folder']}: {report['originals']} originals + {report['distractors']} "
        f"distractors, {report['queries']} queries ({', '.join(report['transforms'])}, seed {report['seed']})",
        "recall@1 = share of queries whose original ranks first; mAP = mean reciprocal rank of the original; "
        f"hard = {' + '.join(HARD_TRANSFORMS)}",
    ]


def _hard(r: dict[str, Any], report: dict[str, Any]) -> str:
    if report["mode"] != "copy":
        return f"  P@1={r['metrics']['P@1']:.3f}" if "P@1" in r["metrics"] else ""
    per = r["per_transform"]
    return "  " + "  ".join(f"{t} R@1={per[t]['recall@1']:.3f}" for t in HARD_TRANSFORMS if t in per)


def format_protocol(report: dict[str, Any], *, top: int | None = None) -> str:
    """A tune-then-validate run (``protocol``): the split, the tuning ranking and the choice, the
    validation rows (chosen, default, baseline) over all collections, then each collection's."""
    primary, secondary = report["primary_metric"], report["secondary_metric"]
    names = list(report["collections"])
    lines = [f"{report['mode']} evaluation; split seed {report['split']['seed']}: images tune / validation"]
    for name, c in report["collections"].items():
        lines.append(f"  {name:<16} {c['tune']:>5} / {c['validation']:<5} {c['folder']}")
    if report.get("limit_per_class"):
        lines.append(
            f"  (--limit-per-class {report['limit_per_class']}: at most that many per class in each part)"
        )
    if report["mode"] == "copy":
        d = report["distractors"]
        folders = ", ".join(d["folders"]) or "(none)"
        lines.append(f"  {'distractors':<16} {d['tune']:>5} / {d['validation']:<5} {folders}")
        lines.append(
            f"queries: each original x {', '.join(report['transforms'])} (seed {report['seed']}); "
            f"recall@1 = share of queries whose original ranks first; hard = {' + '.join(HARD_TRANSFORMS)}"
        )
    cols = [*names, "mean"] if len(names) > 1 else names
    widths = [max(8, len(c)) for c in cols]
    ranking = report["ranking"]
    shown = [(i, r) for i, r in enumerate(ranking, 1) if top is None or i <= top or r["baseline"]]
    width = max(len(r["config"]) for _, r in shown)
    lines += [
        "",
        f"tuning: {report['configurations']} configurations on the tuning parts, {primary}:",
        f"{'#':>3} {'configuration':<{width}}"
        + "".join(f" {c:>{w}}" for c, w in zip(cols, widths, strict=True)),
    ]
    for i, r in shown:
        values = [r["per_collection"][n] for n in names] + ([r["mean"]] if len(names) > 1 else [])
        lines.append(
            f"{i:>3} {r['config']:<{width}}"
            + "".join(f" {v:>{w}.3f}" for v, w in zip(values, widths, strict=True))
            + ("  <- baseline" if r["baseline"] else "")
        )
    lines.append(f"chosen: {report['chosen']}  ({report['criterion']})")
    summary = report["validation_summary"]
    width = max(len(r["config"]) for r in summary)
    role_w = max(len(", ".join(r["roles"])) for r in summary)
    lines += [
        "",
        f"validation ({primary}; these images took no part in the choice):",
        f"{'role':<{role_w}} {'configuration':<{width}}"
        + "".join(f" {c:>{w}}" for c, w in zip(cols, widths, strict=True))
        + f" {'mean ' + secondary:>12}",
    ]
    for r in summary:
        values = [r["per_collection"][n][primary] for n in names] + ([r["mean"]] if len(names) > 1 else [])
        lines.append(
            f"{', '.join(r['roles']):<{role_w}} {r['config']:<{width}}"
            + "".join(f" {v:>{w}.3f}" for v, w in zip(values, widths, strict=True))
            + f" {r['mean_' + secondary]:>12.3f}"
        )
    for name in names:
        rep = report["validation"][name]
        what = (
            f"{rep['images']} images, classes {rep['classes']}, chance mAP {rep['chance_mAP']:.3f}"
            if rep["mode"] == "category"
            else f"{rep['originals']} originals + {rep['distractors']} distractors, {rep['queries']} queries"
        )
        lines += ["", f"validation part of {name}: {what}", format_table(rep)]
    return "\n".join(lines)


def plot_paths(path: Path, names: list[str]) -> dict[str, Path]:
    """One plot per collection: ``path`` itself for one, ``<stem>-<name><suffix>`` for several."""
    if len(names) == 1:
        return {names[0]: path}
    return {name: path.with_name(f"{path.stem}-{name}{path.suffix or '.png'}") for name in names}


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)


def save_plot(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Category: horizontal bars of mAP per configuration. Copy: recall@1 heat map, configs x transforms."""
    try:
        import matplotlib
    except ImportError:
        raise EvalError("--plot needs matplotlib (pip install matplotlib)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = report["primary_metric"]
    # best at the top: bars count up from the bottom, heat-map rows down from the top
    rows = sorted(
        report["results"], key=lambda r: r["metrics"][primary], reverse=report["mode"] != "category"
    )
    height = max(4.0, 0.2 * len(rows) + 1.5)
    if report["mode"] == "category":
        fig, ax = plt.subplots(figsize=(9, height))
        title = _category_bars(ax, report, rows)
    else:
        fig, ax = plt.subplots(figsize=(4 + 0.9 * (1 + len(report["transforms"])), height))
        title = _copy_heat_map(fig, ax, report, rows)
    labels = [
        f"{r['layer']}/{_pool_label(r)}/{_resize_label(r)}/s{_scales_label(r)}/w{_white_label(r)}"
        + (f"/r{r['regions']}" if r.get("regions") else "")
        + (" [baseline]" if r["baseline"] else "")
        for r in rows
    ]
    ax.set_yticks(range(len(rows)), labels, fontsize=6)
    model_names = sorted({r["model"] for r in rows})
    ax.set_title(f"{title} ({', '.join(model_names)})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _category_bars(ax: Any, report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    colours = ["tab:red" if r["baseline"] else "tab:blue" for r in rows]
    ax.barh(range(len(rows)), [r["metrics"][report["primary_metric"]] for r in rows], color=colours)
    ax.axvline(report["chance_mAP"], color="grey", linestyle="--", label=f"chance {report['chance_mAP']:.2f}")
    ax.set_xlabel("mAP (mean over queries)")
    ax.legend(loc="lower right")
    return f"category retrieval: {report['images']} images, {len(report['classes'])} classes"


def _copy_heat_map(fig: Any, ax: Any, report: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    cols = ["overall", *report["transforms"]]
    data = np.array(
        [
            [r["metrics"]["recall@1"]] + [r["per_transform"][t]["recall@1"] for t in report["transforms"]]
            for r in rows
        ]
    )
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            colour = "w" if data[i, j] < 0.6 else "k"  # readable on both ends of viridis
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6, color=colour)
    fig.colorbar(im, ax=ax, label="recall@1")
    return f"copy detection: {report['originals']} originals + {report['distractors']} distractors"

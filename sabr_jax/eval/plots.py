"""PNG figures: route adherence per video (sabr-eval) and training loss curves (metrics.jsonl).

Drawn with matplotlib's object-oriented API on the Agg canvas: no pyplot, no global
backend switch, no display needed.
"""

from __future__ import annotations

import json
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _save(fig: Figure, path) -> None:
    FigureCanvasAgg(fig)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=120)


def plot_adherence(metrics: dict, path) -> None:
    """Grouped bars: route adherence (fraction of route holds touched, 0..1) per video, one
    colour per row of `metrics` (the dict sabr_jax.eval.evaluate returns). Videos without
    holds annotations have no bar; with none at all the figure says so."""
    rows = metrics["rows"]
    clip_ids = [v["clip_id"] for v in next(iter(rows.values()))["per_video"]]
    fig = Figure(figsize=(min(16.0, max(6.0, 0.3 * len(clip_ids) * len(rows) / 2 + 2)), 4.0))  # at most 16 in wide
    ax = fig.add_subplot()
    width = 0.8 / len(rows)
    x = np.arange(len(clip_ids))
    any_value = False
    for k, (row, summary) in enumerate(rows.items()):
        values = np.array(
            [np.nan if v["route_adherence"] is None else v["route_adherence"] for v in summary["per_video"]]
        )
        any_value |= bool(np.isfinite(values).any())
        mean = summary.get("route_adherence")
        label = row if mean is None else f"{row} (mean {mean:.2f})"
        ax.bar(x + (k - (len(rows) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(
        x, clip_ids, rotation=45 if len(clip_ids) > 6 else 0, ha="right" if len(clip_ids) > 6 else "center", fontsize=8
    )
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("route holds touched (fraction)")
    ax.set_xlabel("held-out video")
    ax.set_title("Route trajectory adherence")
    if any_value:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.text(
            0.5,
            0.5,
            "no holds annotations: route adherence not computed",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    _save(fig, path)


def plot_losses(metrics_jsonl_path, path) -> None:
    """Loss curves from a training run's metrics.jsonl (one JSON object per logged step with
    "step", "loss", "mse", "vlb", ...): loss, mse and every "val_*" key present, against
    the step, on a log y-axis. Non-positive values are left out (log scale)."""
    with open(metrics_jsonl_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    if not records:
        raise ValueError(f"{metrics_jsonl_path}: no records to plot")
    keys = ["loss", "mse"] + sorted({k for r in records for k in r if k.startswith("val_")})
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot()
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and r[key] > 0]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key.startswith("val_") else None, markersize=3, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("value (log scale)")
    ax.set_title("Training")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)

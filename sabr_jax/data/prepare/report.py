"""How sabr-prepare prints its report (sabr_jax.data.prepare.build writes it to DIR/report.json)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path


def print_report(report: dict, path: Path, log: Callable[[str], object]) -> None:
    """Log the report (sabr_jax.data.prepare.build.make_report's dict), written to `path`, line by line."""
    log(f"\n== sabr-prepare report ({path}) ==")
    log(
        f"clips built: {len(report['built'])} (prepared now {len(report['prepared_now'])}, resumed {len(report['resumed'])})"
    )
    if report["dataset"]:
        for name, s in report["dataset"]["splits"].items():
            log(f"  {name}: {s['clips']} clips from {s['source_clips']} source clips, {s['frames']} frames")
    masked = {c: n for c, n in report["masked_frames"].items() if n}
    if masked:
        log(
            f"masked frames (the tracker lost the climber; kept in place, out of the loss): {sum(masked.values())} in "
            f"{len(masked)} clips: " + ", ".join(f"{c} {n}" for c, n in masked.items())
        )
    if report["bad_frames"]:
        log(
            "frames with unusable tracker values, masked like tracker-lost ones: "
            + ", ".join(f"{c} {' '.join(frames)}" for c, frames in report["bad_frames"].items())
        )
    if report["skipped"]:
        log(f"skipped: {len(report['skipped'])}")
        for s in report["skipped"]:
            log(f"  {s['clip_id']}: {s['reason'].splitlines()[0]}")
    for w in report["warnings"]:
        log(f"warning: {w}")
    if report.get("error"):
        log(f"ERROR: {report['error']}")

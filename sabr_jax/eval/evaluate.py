"""The paper's metrics for an exported model on the held-out clips of a dataset (`sabr-eval`).

    evaluate(EXPORT_DIR, DATA, OUT)     # the command line: sabr-eval, sabr_jax.cli.eval

EXPORT_DIR is what `sabr-train --export` (or sabr-demo) writes; DATA is the --data_dir of
sabr-prepare. Every held-out clip is scored whole, from its first frame, with its route
images as the prompt, against five motions (the rows of the table):

    model           sampled from the clip's own video and route tokens
    mean_motion     the training set's mean motion vector in every frame
    random_clip     the motion of a random training clip (seeded), cut to the clip's
                    length or padded by repeating its last frame
    shuffled_video  the model sampled from another held-out clip's video and route tokens
                    (clip i gets those of clip i+1 mod N, cut/padded to clip i's length),
                    with clip i's masks and the same noise as `model`: if it scores as
                    well as `model`, the model does not use the video
    ground_truth    the true motion: movement MSE 0; its adherence is the ceiling the
                    annotations allow

Every figure is over the frames where the true motion is known: frames where the tracker
lost the climber (motion_mask False) are left out, as training leaves them out of the loss.
Movement MSE is reported in normalised units (the dataset's train-split NormStats; 1.0
is predicting the mean) and raw 161-value units (the paper's); route adherence and
distractors touched follow sabr_jax.eval.metrics (clips need holds annotations). OUT
gets metrics.json, metrics.csv (one line per row and clip), adherence.png and
samples.npz (the model's motions: raw [T, 161], motion frames only, keyed by clip id).

Frame alignment with holds.json's `view`: motion frame t of a clip (or of a part of a
clip longer than sabr-prepare's --max_seconds) is taken as 24-FPS frame
source_frames[0] + t: sabr-prepare keeps the frames where the tracker lost the climber in
place (masked; they are left out of the scores), so the motion frames stay aligned with the
video's frames between the first and last tracked one.
"""

from __future__ import annotations

import csv
import json
import os
import time

import jax
import numpy as np
from tqdm import tqdm

from sabr_jax.data import pipeline
from sabr_jax.data.store.tfds_builder import INDEX_FILE
from sabr_jax.data.store.tfds_source import TfdsClips, open_tfds
from sabr_jax.errors import UserError
from sabr_jax.eval import metrics as M
from sabr_jax.eval.plots import plot_adherence
from sabr_jax.sample import export, inputs

ROWS = ("model", "mean_motion", "random_clip", "shuffled_video", "ground_truth")
PAIRED = ("shuffled_video", "random_clip")  # rows the model is compared with wall by wall (`paired`)
PAIRED_METRICS = ("movement_mse", "route_adherence")
SAMPLED = ("model", "shuffled_video")
PER_VIDEO = (
    "movement_mse",
    "movement_mse_raw",
    "route_adherence",
    "route_touched",
    "route_holds",
    "distractors_touched",
    "distractor_holds",
)


def fit(frames: np.ndarray, length: int) -> np.ndarray:
    """frames [n, ...] cut to `length` rows, or padded by repeating the last row (zeros if n = 0)."""
    if len(frames) >= length:
        return frames[:length]
    last = frames[-1:] if len(frames) else np.zeros((1, *frames.shape[1:]), frames.dtype)
    return np.concatenate([frames, np.repeat(last, length - len(frames), axis=0)])


def _holds(source: TfdsClips, index: int) -> M.Holds | None:
    raw = source.clips[index].get("holds")
    where = f"{source.path / INDEX_FILE}: split {source.split!r}, clip {source.clip_id(index)!r}, field 'holds' (from its holds.json)"
    return None if raw is None else M.Holds.from_json(raw, where)


def _score(pred, truth, known, stats, holds, first_frame, radius_scale, min_frames, joint_pixels) -> dict:
    """The per-video figures of one motion pred [T, 161] (raw) against truth [T, 161], over the
    frames where the truth is known (known [T] bool: the clip's motion_mask)."""
    frames = (first_frame + np.arange(len(pred)))[known]
    pred, truth = pred[known], truth[known]
    out = {"movement_mse": M.movement_mse(pred, truth, stats), "movement_mse_raw": M.movement_mse(pred, truth)}
    if holds is None:
        return out | {k: None for k in PER_VIDEO[2:]}
    return out | M.route_adherence(
        pred, holds, frames, radius_scale=radius_scale, min_frames=min_frames, joint_pixels=joint_pixels
    )


def _sample(source, contexts, lengths, positions, params, model_stats, sampler, batch_size, seed):
    """Sample the `model` and `shuffled_video` rows of clips 0..len(lengths)-1, whole, from their first frame.

    Returns (true motions, their motion_masks, {row: sampled motions}), each a list over clips
    (motions raw [T, 161], masks [T] bool). Clip i's shuffled_video example has the video and route tokens of clip
    i+1 (mod n) fitted to clip i's masks, and the same key as its model example.
    """
    n = len(lengths)
    truths, masks, sampled = [None] * n, [None] * n, {row: [None] * n for row in SAMPLED}
    batches = [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    with tqdm(total=2 * len(batches), desc="sabr-eval sampling", unit="batch") as progress:
        for b, indices in enumerate(batches):
            clips = {i: source.read(i, 0, lengths[i]) for i in indices + [(indices[-1] + 1) % n]}
            own, shuffled = [], []
            for i in indices:
                truths[i], masks[i], other = clips[i]["motion"], clips[i]["motion_mask"], clips[(i + 1) % n]
                own.append(pipeline.assemble(clips[i], positions, contexts[i], model_stats))
                swapped = {
                    "motion": truths[i],
                    "video": fit(other["video"], lengths[i]),
                    "context": fit(other["context"], contexts[i]),
                }
                shuffled.append(pipeline.assemble(swapped, positions, contexts[i], model_stats))
            key = jax.random.fold_in(jax.random.PRNGKey(seed), b)
            for row, examples in zip(SAMPLED, (own, shuffled)):
                examples = examples + [examples[0]] * (batch_size - len(examples))  # a full batch: one compile
                batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
                motions = sampler(params, batch, key)  # each example's motion frames (normalised)
                for r, i in enumerate(indices):
                    assert len(motions[r]) == lengths[i], (len(motions[r]), lengths[i])
                    sampled[row][i] = model_stats.denormalize(motions[r])
                progress.update()
    return truths, masks, sampled


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate(
    export_dir: str,
    data_dir: str,
    out_dir: str,
    *,
    split: str = "validation",
    steps: int | None = None,
    method: str | None = None,
    guidance: float | None = None,
    seed: int = 0,
    max_clips: int | None = None,
    batch_size: int = 4,
    radius_scale: float = M.RADIUS_SCALE,
    min_frames: int = M.MIN_FRAMES,
    joint_pixels: M.JointPixels | None = None,
    log=print,
) -> dict:
    """Score an export on a split of a prepared dataset; write OUT's files; return metrics.json's dict.

    steps / method / guidance (the classifier-free guidance scale) override the export's
    cfg.sample; seed drives the sampling noise, the random_clip choice and the bootstrap; batch_size clips are sampled at once; joint_pixels replaces
    sabr_jax.body.camera.joint_pixels (e.g. with a SMPL body model).
    """
    if batch_size < 1 or (max_clips is not None and max_clips < 1) or (steps is not None and steps < 1):
        raise UserError(f"batch_size, max_clips and steps must be >= 1, got {batch_size}, {max_clips}, {steps}")
    start_time = time.time()
    params, cfg, model_stats, sampler, _ = export.load(export_dir, steps, method, guidance)
    source, stats = open_tfds(data_dir, split, cfg=cfg)
    train = source if split == "train" else TfdsClips(data_dir, "train")
    n = len(source) if max_clips is None else min(len(source), max_clips)
    if n == 0:
        raise UserError(f"{source.path}: split {split!r} has no clips to evaluate")
    if len(train) == 0:
        raise UserError(f"{source.path}: the train split has no clips (the random_clip row draws from it)")
    notes = []
    if not (
        np.allclose(model_stats.mean, stats.mean, atol=1e-5) and np.allclose(model_stats.std, stats.std, atol=1e-5)
    ):
        notes.append(
            "the export's normalisation statistics differ from this dataset's train split: was it trained on other data?"
        )
    if n == 1:
        notes.append("one clip only: shuffled_video uses the clip's own video (it equals model)")
    holds = [_holds(source, i) for i in range(n)]
    annotated = sum(h is not None for h in holds)
    if annotated == 0:
        notes.append(
            f"no holds annotations in split {split!r} of {source.path}: route adherence is null (add holds.json "
            "to the clips and rerun sabr-prepare)"
        )
    elif annotated < n:
        notes.append(
            f"{n - annotated} of {n} clips have no holds annotations: route adherence averages the other {annotated}"
        )

    contexts = [min(source.num_context(i), cfg.data.context_frames) for i in range(n)]
    lengths = [source.num_frames(i) for i in range(n)]
    positions = inputs.time_positions(max(c + t for c, t in zip(contexts, lengths)))  # one compile for all
    batch_size = min(batch_size, n)
    log(
        f"evaluating {n} clips of split {split!r} ({source.path}): {positions} time positions, "
        f"{cfg.sample.steps} {cfg.sample.method} steps, batches of {batch_size}"
    )
    truths, masks, sampled = _sample(
        source, contexts, lengths, positions, params, model_stats, sampler, batch_size, seed
    )

    rng = np.random.default_rng(seed)
    rows = {row: [] for row in ROWS}
    for i in range(n):
        clip_id = source.clip_id(i)
        others = [j for j in range(len(train)) if train.clip_id(j) != clip_id] or list(range(len(train)))
        j = int(rng.choice(others))
        random_motion = train.read(j, 0, min(lengths[i], train.num_frames(j)))["motion"]
        motions = {
            "model": sampled["model"][i],
            "mean_motion": np.broadcast_to(stats.mean, truths[i].shape),
            "random_clip": fit(random_motion, lengths[i]),
            "shuffled_video": sampled["shuffled_video"][i],
            "ground_truth": truths[i],
        }
        first_frame = source.clips[i].get("source_frames", [0])[0]
        for row in ROWS:
            scores = _score(
                motions[row], truths[i], masks[i], stats, holds[i], first_frame, radius_scale, min_frames, joint_pixels
            )
            rows[row].append({"clip_id": clip_id, "frames": lengths[i], **scores})

    result = {
        "paired": paired(rows, seed),
        "rows": {
            row: {
                "movement_mse": _mean(v["movement_mse"] for v in videos),
                "movement_mse_raw": _mean(v["movement_mse_raw"] for v in videos),
                "route_adherence": _mean(v["route_adherence"] for v in videos),
                "distractors_touched": _mean(v["distractors_touched"] for v in videos),
                "per_video": videos,
            }
            for row, videos in rows.items()
        },
        "settings": {
            "export_dir": os.path.abspath(export_dir),
            "dataset": str(source.path),
            "split": split,
            "clips": n,
            "steps": cfg.sample.steps,
            "method": cfg.sample.method,
            "guidance_scale": cfg.sample.guidance_scale,
            "seed": seed,
            "batch_size": batch_size,
            "time_positions": positions,
            "context_frames": cfg.data.context_frames,
            "radius_scale": radius_scale,
            "min_frames": min_frames,
            "normalisation": "the dataset's train-split NormStats",
            "seconds": round(time.time() - start_time, 1),
            "notes": notes,
        },
    }
    _write(out_dir, result, {source.clip_id(i): sampled["model"][i] for i in range(n)}, log)
    log(format_table(result))
    for note in notes:
        log(f"note: {note}")
    return result


def _write(out_dir: str, result: dict, samples: dict, log) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "metrics.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(out_dir, "metrics.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "clip_id", "frames", *PER_VIDEO])
        for row, summary in result["rows"].items():
            for v in summary["per_video"]:
                writer.writerow([row, v["clip_id"], v["frames"], *("" if v[k] is None else v[k] for k in PER_VIDEO)])
    plot_adherence(result, os.path.join(out_dir, "adherence.png"))
    np.savez(os.path.join(out_dir, "samples.npz"), **samples)
    log(f"wrote metrics.json, metrics.csv, adherence.png, samples.npz to {os.path.abspath(out_dir)}")


def paired(rows: dict, seed: int) -> dict:
    """{"model - R": {metric: metrics.paired_difference of the model's and row R's per-video scores}}
    for R in PAIRED: whether the model beats R on the same walls, with a bootstrap 95% interval."""
    per_video = lambda row, metric: [v[metric] for v in rows[row]]  # noqa: E731
    return {
        f"model - {other}": {
            metric: M.paired_difference(per_video("model", metric), per_video(other, metric), seed=seed)
            for metric in PAIRED_METRICS
        }
        for other in PAIRED
    }


def format_table(result: dict) -> str:
    """The console table: one line per row, means over the videos."""
    columns = (
        ("movement_mse", "movement MSE", ".4f"),
        ("movement_mse_raw", "MSE (raw)", ".5f"),
        ("route_adherence", "route adherence", ".3f"),
        ("distractors_touched", "distractors touched", ".2f"),
    )
    lines = [f"{'row':<16}" + "".join(f"{title:>21}" for _, title, _ in columns)]
    for row, summary in result["rows"].items():
        cells = ("null" if summary[k] is None else format(summary[k], spec) for k, _, spec in columns)
        lines.append(f"{row:<16}" + "".join(f"{c:>21}" for c in cells))
    lines.append("paired difference per wall, mean [bootstrap 95% interval]:")
    for name, metrics in result.get("paired", {}).items():
        cells = []
        for metric, d in metrics.items():
            text = "null" if d is None else f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
            cells.append(f"{metric} {text}")
        lines.append(f"  {name:<24}" + "   ".join(cells))
    return "\n".join(lines)

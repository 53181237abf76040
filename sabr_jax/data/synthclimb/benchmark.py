"""The SynthClimb benchmark as sabr-demo makes it: walls written and prepared from a config's
`synth` block (sabr_jax.config.synthclimb_config), the config matched to the dataset, and the
demo's closing lines on how to sample a held-out wall (`sampling_hint`)."""

from __future__ import annotations

import os
import shlex
import time

from absl import logging

from sabr_jax.data.prepare import build as prepare
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store.tfds_source import TfdsClips
from sabr_jax.data.synthclimb import synth


def write_benchmark(cfg, workdir: str, encoder: str, log=print) -> str:
    """Stages 1 and 2: SynthClimb clips and their prepared dataset; returns the data dir."""
    s = cfg.synth
    clips_dir, data_dir = os.path.join(workdir, "clips"), os.path.join(workdir, "data")
    height, width = s.size
    settings = Settings(  # checked before anything is written
        encoder=encoder,
        precision="float32",
        pool=s.pool,
        frame_size=(height, width),
        encoder_size=tuple(s.encoder_size),
        validation_fraction=s.validation_fraction,
        split_seed=cfg.seed,
        seed=cfg.seed,
        min_frames=8,
        context_frames=cfg.data.context_frames,
        mirror=s.mirror,
    )
    start = time.time()
    synth.write_clips(
        clips_dir,
        s.clips,
        seed=cfg.seed,
        height=height,
        width=width,
        context=cfg.data.context_frames,
        holds=s.holds,
        pan=s.pan,
        log=log,
        workers=os.cpu_count() or 1,
    )
    log(f"SynthClimb: {s.clips} clips in {clips_dir} ({time.time() - start:.0f} s)")
    start = time.time()
    report = prepare.prepare(clips_dir, data_dir, settings, log=logging.info, workers=os.cpu_count() or 1)
    if report.get("error"):
        raise RuntimeError(f"sabr-prepare failed: {report['error']} (see {os.path.join(data_dir, prepare.REPORT)})")
    splits = report["dataset"]["splits"]
    counts = ", ".join(f"{name} {split['clips']} clips / {split['frames']} frames" for name, split in splits.items())
    log(f"dataset: {counts} in {data_dir} ({time.time() - start:.0f} s)")
    return data_dir


def match_dataset(cfg, data_dir: str) -> None:
    """Train on the dataset. Its token count and width fill the config's unset ones (the
    Trainer's `resolve_shapes`); the patch grid follows the encoder and pooling, so it is copied."""
    grid = TfdsClips(data_dir, "train").clips[0]["grid"]
    with cfg.unlocked():
        cfg.data.update(source="tfds", dir=data_dir)
        cfg.model.update(patch_grid=tuple(grid))


def sampling_hint(cfg, workdir: str, data_dir: str) -> str:
    """sabr-demo's closing lines: the model's window (cfg.data.max_frames less the route images,
    in frames and seconds) and a ready sabr-sample command for the first held-out wall, with the
    route colour its holds.json records."""
    source = TfdsClips(data_dir, "validation")
    fps = source.index.get("fps", 24)
    motion = cfg.data.max_frames - cfg.data.context_frames
    lines = [
        f"the model takes at most {motion} motion frames (data.max_frames {cfg.data.max_frames} less "
        f"data.context_frames {cfg.data.context_frames} route images) = {motion / fps:.2f} s at {fps} FPS: a longer "
        f"video is cut to its first {motion / fps:.2f} s"
    ]
    walls = [c for c in source.clips if (c.get("holds") or {}).get("route_color")]
    if walls:
        wall = walls[0]
        video = os.path.join(workdir, "clips", wall["source_clip"], "video.mp4")
        lines.append(
            f"sample a held-out wall ({wall['source_clip']}: route colour {wall['holds']['route_color']}, climb "
            f"{wall['num_frames']} frames = {wall['num_frames'] / fps:.2f} s):"
        )
        command = ["sabr-sample", "--checkpoint", workdir, "--video", video, "--route_color"]
        command += [wall["holds"]["route_color"], "--out", os.path.join(workdir, "samples")]
        lines.append(f"  {shlex.join(command)}")
    return "\n".join(lines)

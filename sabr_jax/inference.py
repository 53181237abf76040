"""sabr-sample's inputs: an exported model, and a wall video with its route images -> the model's batch.

    model = load(find_export(PATH))                           # params, cfg, stats, sampler, meta
    settings = encoder_settings(model.meta, model.cfg)        # how the training tokens were made
    encoder = FrameEncoder(make_encoder(settings), settings)
    video = encode_video(VIDEO, settings, encoder, max_frames)
    batch = make_batch(video.tokens, route_tokens, cfg)

The video is decoded, resampled and encoded exactly as `sabr-prepare` does it (the same
functions, sabr_jax.data.video and sabr_jax.data.frame_encoder, and the same settings, read
from the export), and the tokens are rounded to the dataset's storage precision, so the
model sees tokens like the ones it was trained on. Every frame of the video from its first
is a motion frame. The batch is laid out as training laid out its examples
(sabr_jax.data.pipeline.assemble): the route images first, then the motion frames, then
padding to a multiple of 8 positions.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import NamedTuple

import ml_collections
import numpy as np

from sabr_jax import checkpoint
from sabr_jax.cli import UserError
from sabr_jax.data import pipeline
from sabr_jax.data import prepared as prep
from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.data.prepare_settings import Settings
from sabr_jax.motion import MOTION_DIM, NormStats
from sabr_jax.sampling import Sampler

TIME_MULTIPLE = 8  # time positions are rounded up to a multiple of this (fewer compiles; sabr-eval too)


def time_positions(used: int) -> int:
    """`used` time positions rounded up to a multiple of TIME_MULTIPLE."""
    return -(-used // TIME_MULTIPLE) * TIME_MULTIPLE


class Model(NamedTuple):
    """An export, ready to sample: params (on this process's first device), the run's config
    (cfg.sample possibly overridden), its NormStats, the jitted Sampler and the export's meta."""

    params: object
    cfg: ml_collections.ConfigDict
    stats: NormStats
    sampler: Sampler
    meta: dict


def find_export(path: str) -> str:
    """An export folder: `path` itself, or path/export when path is a workdir (sabr-demo's, or
    one holding the export of sabr-train --export there); UserError saying what is missing."""
    if not os.path.isdir(path):
        raise UserError(f"--checkpoint={path}: no such folder; expected an exported model or a sabr-demo workdir")
    if os.path.isdir(os.path.join(path, "checkpoints")) or os.path.isdir(os.path.join(path, "export")):
        export = os.path.join(path, "export")
        if not os.path.isdir(export):
            raise UserError(
                f"--checkpoint={path} is a training workdir without an export ({export} is missing): write one with "
                "sabr-train --export DIR (or give the folder sabr-demo made)"
            )
        return export
    return path


def load(export_dir: str, steps: int | None = None, method: str | None = None) -> Model:
    """An export (sabr_jax.checkpoint.load_export: written on any mesh, read onto this
    process's first device) with its sampler; steps/method override cfg.sample."""
    from flax import nnx

    from sabr_jax.sampling import make_sampler
    from sabr_jax.trainer import abstract_model

    params, meta = checkpoint.load_export(export_dir)
    if "config" not in meta or "norm_stats" not in meta:
        raise UserError(
            f"{export_dir}: the export's meta lacks 'config' or 'norm_stats' (not written by sabr-train --export?)"
        )
    cfg, stats = checkpoint.read_meta(meta)
    if steps is not None:
        cfg.sample.steps = steps
    if method is not None:
        cfg.sample.method = method
    graphdef = nnx.graphdef(abstract_model(cfg))
    return Model(params, cfg, stats, make_sampler(graphdef, cfg), meta)


def encoder_settings(meta: dict, cfg: ml_collections.ConfigDict, encoder: str | None = None) -> Settings:
    """The sabr-prepare Settings that made the training tokens: the export's meta "encoder",
    else the report of the dataset cfg.data.dir names (exports written before meta had it),
    with `encoder` (a path or random encoder name) replacing the recorded one if given.
    UserError when neither is there and no encoder is given, or the recorded encoder is not
    on this machine."""
    recorded = meta.get("encoder") or checkpoint.dataset_settings(cfg)
    if recorded is None and encoder is None:
        raise UserError(
            "the export does not say which encoder made its training tokens (no 'encoder' in its meta, no "
            f"report.json in its data.dir {cfg.data.get('dir') or '(none)'}): pass --encoder with the weights sabr-prepare used"
        )
    names = {f.name for f in dataclasses.fields(Settings)}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in (recorded or {}).items() if k in names}
    if encoder is not None:
        fields["encoder"] = encoder
    try:
        return Settings(**fields)
    except UserError as error:
        if encoder is not None:
            raise UserError(f"--encoder={encoder}: {error}") from None
        raise UserError(f"the export's encoder settings: {error}; pass --encoder PATH to use another copy") from None


def check_tokens(cfg: ml_collections.ConfigDict, video_dim: int, grid: tuple[int, int], where: str) -> None:
    """UserError unless tokens of width video_dim on a `grid` of patches fit the model."""
    problems = []
    if cfg.model.video_dim and video_dim != cfg.model.video_dim:
        problems.append(f"tokens {video_dim} wide, the model takes model.video_dim={cfg.model.video_dim}")
    if cfg.data.num_patches and math.prod(grid) != cfg.data.num_patches:
        problems.append(
            f"{math.prod(grid)} tokens per frame ({grid[0]}x{grid[1]}), the model takes data.num_patches={cfg.data.num_patches}"
        )
    if problems:
        raise UserError(
            f"{where} does not match the checkpoint: {'; '.join(problems)} (use the encoder, pool and encoder_size "
            "that prepared its training data)"
        )


@dataclasses.dataclass
class EncodedVideo:
    """tokens [T, P, Dv] float32 of the motion frames (the first T frames at settings.fps);
    source_of [T] the source frame of each; stats: `resampled_frames`' (source_frames,
    output_frames: the video's whole length, width, height upright, ...)."""

    tokens: np.ndarray
    source_of: np.ndarray
    stats: dict

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.stats["height"], self.stats["width"]


def as_stored(tokens: np.ndarray, settings: Settings) -> np.ndarray:
    """Tokens rounded to the dataset's storage precision (what training read), as float32."""
    return np.asarray(tokens, prep.dtype_of(settings.precision)).astype(np.float32)


def encode_images(images: np.ndarray, encoder) -> np.ndarray:
    """uint8 [N, h, w, 3] -> float32 [N, P, Dv] tokens at the encoder's precision (FrameEncoder.stream)."""
    parts = []
    encoder.stream(iter(images), parts.append)
    return as_stored(np.concatenate(parts), encoder.settings)


def encode_video(path: str, settings: Settings, encoder, max_frames: int) -> EncodedVideo:
    """Decode, resample, resize and encode the first `max_frames` frames of a video as
    sabr-prepare does (VideoError if it cannot be read)."""
    source_of, parts, stats = [], [], {}

    def frames():
        keep = lambda i: len(source_of) < max_frames  # noqa: E731 - source frames come in order
        for k, i, pixels in vid.resampled_frames(path, keep, settings.frame_size, settings.fps, stats):
            if k < max_frames:
                source_of.append(i)
                yield pixels

    encoder.stream(frames(), parts.append)
    tokens = np.concatenate(parts) if parts else np.zeros((0, 0, encoder.video_dim), np.float32)
    return EncodedVideo(as_stored(tokens, settings), np.asarray(source_of), stats)


def frames_at(path: str, settings: Settings, indices, source_of: np.ndarray) -> np.ndarray:
    """uint8 [len(indices), h, w, 3]: the resampled frames k in `indices` at settings.frame_size."""
    wanted = {int(source_of[k]) for k in indices}
    found = {
        k: pixels
        for k, _, pixels in vid.resampled_frames(path, wanted.__contains__, settings.frame_size, settings.fps)
        if k in indices
    }
    return np.stack([found[k] for k in indices])


def known_motion(
    tracks_path: str, video: EncodedVideo, keep_frames: int, tolerance: int
) -> tuple[np.ndarray, np.ndarray]:
    """The climber's raw motion [T, 161] and known [T] bool over the video's motion frames: the
    tracker's motion (sabr-prepare's loader and climber choice) on the first keep_frames frames
    where it saw the climber, False elsewhere. TrackError/UserError when the tracks do not fit."""
    tracks = tr.load_tracks(tracks_path)
    _, names, present, vectors = tr.climber_motion(tracks, tracks_path, image_hw=video.image_hw)
    frames = video.stats["source_frames"]
    if abs(frames - len(names)) > tolerance:
        raise UserError(
            f"{tracks_path} lists {len(names)} frames but the video decodes to {frames} (tolerance {tolerance}): the "
            "i-th sorted frame name must be the i-th video frame; give the tracks of this video"
        )
    steps = len(video.source_of)
    if keep_frames > steps:
        raise UserError(f"--keep_seconds keeps {keep_frames} frames but the video has {steps} motion frames")
    source = video.source_of[:keep_frames]
    inside = source < len(names)  # (within the tolerance, the tracks may end early)
    motion = np.zeros((steps, MOTION_DIM), np.float32)
    known = np.zeros(steps, bool)
    motion[:keep_frames][inside] = vectors[source[inside]]
    known[:keep_frames][inside] = present[source[inside]]
    return motion, known


def make_batch(
    video_tokens: np.ndarray,
    route_tokens: np.ndarray,
    cfg: ml_collections.ConfigDict,
    stats: NormStats,
    motion: np.ndarray | None = None,
    known: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A batch of one example: route_tokens [C, P, Dv] (C <= data.context_frames) then
    video_tokens [T, P, Dv] (C + T <= data.max_frames) on C + T rounded up to a multiple of TIME_MULTIPLE positions.
    With motion [T, 161] raw and known [T] bool (completion) it also holds the normalised
    "known" [1, L, 161] and "known_mask" [1, L] in the same layout."""
    used = len(route_tokens) + len(video_tokens)
    positions = min(time_positions(used), cfg.data.max_frames)
    clip = {
        "motion": np.zeros((len(video_tokens), MOTION_DIM), np.float32) if motion is None else motion,
        "motion_mask": np.ones(len(video_tokens), bool) if known is None else known,
        "video": video_tokens,
        "context": route_tokens,
    }
    example = pipeline.assemble(clip, positions, len(route_tokens), stats)
    batch = {k: example[k][None] for k in ("video", "frame_mask", "context_mask")}
    if known is not None:
        batch["known"], batch["known_mask"] = example["motion"][None], example["motion_mask"][None]
    return batch

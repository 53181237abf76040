"""The model's inputs from a wall video and its route images: tokens, then a batch.

    model = export.load(export.find_export(PATH))             # sabr_jax.sample.export
    settings = export.encoder_settings(model.meta, model.cfg)  # how the training tokens were made
    encoder = FrameEncoder(make_encoder(settings), settings)
    video = encode_video(VIDEO, settings, encoder, max_frames, spool_dir)   # decoded once, frames kept on disk
    batch = make_batch(video.tokens, route_tokens, model.cfg, model.stats)

The video is decoded, resampled and encoded exactly as `sabr-prepare` does it (the same
functions, sabr_jax.data.video and sabr_jax.encoders.frames, and the same settings, read
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

import ml_collections
import numpy as np

from sabr_jax import config as config_lib
from sabr_jax.data import pipeline
from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store import prepared as prep
from sabr_jax.errors import UserError
from sabr_jax.motion import MOTION_DIM, NormStats

TIME_MULTIPLE = 8  # time positions are rounded up to a multiple of this (fewer compiles; sabr-eval too)


def time_positions(used: int) -> int:
    """`used` time positions rounded up to a multiple of TIME_MULTIPLE."""
    return -(-used // TIME_MULTIPLE) * TIME_MULTIPLE


def check_tokens(cfg: ml_collections.ConfigDict, video_dim: int, grid: tuple[int, int], where: str) -> None:
    """UserError unless tokens of width video_dim on a `grid` of patches fit the model
    (sabr_jax.config.shape_mismatches, as for a dataset)."""
    problems = config_lib.shape_mismatches(cfg, math.prod(grid), video_dim, "the encoder's")
    if problems:
        raise UserError(
            f"{where} does not match the checkpoint: {'; '.join(problems)} (use the encoder, pool and encoder_size "
            "that prepared its training data)"
        )


class FrameSpool:
    """uint8 frames [h, w, 3] of one size appended to a file-backed array in `folder`, so that a
    video's frames cost disk, not memory; `frames` is the [n, h, w, 3] array written so far."""

    def __init__(self, folder: str, name: str, capacity: int):
        self.path, self.capacity, self.count, self._array = os.path.join(folder, name), capacity, 0, None

    def append(self, pixels: np.ndarray) -> None:
        if self._array is None:
            self._array = np.lib.format.open_memmap(self.path, "w+", np.uint8, (self.capacity, *pixels.shape))
        self._array[self.count] = pixels
        self.count += 1

    @property
    def frames(self) -> np.ndarray:
        return np.zeros((0, 0, 0, 3), np.uint8) if self._array is None else self._array[: self.count]


@dataclasses.dataclass
class EncodedVideo:
    """The first T frames of a video at settings.fps, decoded once: tokens [T, P, Dv] float32;
    frames [T, h, w, 3] uint8 at settings.frame_size (what the encoder saw) and source_frames
    [T, H, W, 3] at the video's own size, upright (file-backed: `FrameSpool`); source_of [T] the
    source frame of each; stats: `resampled_frames`' (source_frames, output_frames: the video's
    whole length, width, height upright, ...)."""

    tokens: np.ndarray
    frames: np.ndarray
    source_frames: np.ndarray
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


def encode_video(path: str, settings: Settings, encoder, max_frames: int, spool_dir: str) -> EncodedVideo:
    """Decode the video once, resample it to settings.fps and encode its first `max_frames` frames as
    sabr-prepare does (resized to settings.frame_size by the same decoder call); the frames are kept
    at both sizes in files under spool_dir (VideoError if the video cannot be read)."""
    source_of, parts, stats = [], [], {}
    small, full = (FrameSpool(spool_dir, name, max_frames) for name in ("frames.npy", "source_frames.npy"))

    def frames():
        keep = lambda i: len(source_of) < max_frames  # noqa: E731 - source frames come in order
        for k, i, pixels, source in vid.resampled_frames(path, keep, settings.frame_size, settings.fps, stats, True):
            if k < max_frames:
                source_of.append(i)
                small.append(pixels)
                full.append(source)
                yield pixels

    encoder.stream(frames(), parts.append)
    tokens = np.concatenate(parts) if parts else np.zeros((0, 0, encoder.video_dim), np.float32)
    return EncodedVideo(as_stored(tokens, settings), small.frames, full.frames, np.asarray(source_of), stats)


def known_motion(
    tracks_path: str, video_path: str, video: EncodedVideo, keep_frames: int, tolerance: int
) -> tuple[np.ndarray, np.ndarray]:
    """The climber's raw motion [T, 161] and known [T] bool over the video's motion frames: the
    tracker's motion (sabr-prepare's loader and climber choice) on the first keep_frames frames
    where it saw the climber, False elsewhere. TrackError/UserError when the tracks do not fit."""
    tracks = tr.load_tracks(tracks_path)
    _, names, present, vectors = tr.climber_motion(tracks, tracks_path, image_hw=video.image_hw)
    tr.check_frame_count(tracks_path, len(names), video_path, video.stats["source_frames"], tolerance)
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

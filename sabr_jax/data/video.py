"""Video decoding and 24-FPS resampling (PyAV), route images, and patch-token pooling.

Frame rule (how a track frame maps to a video frame and a 24-FPS output frame):

* The video is decoded in presentation order; source frame i (0-based) has timestamp
  t_i = pts_i * time_base - pts_0 * time_base (exact fractions), or i / average rate when
  the container has no pts.
* Output frame k (0-based) of the 24-FPS timeline sits at k / 24 s, for every k with
  k / 24 <= t_last; it shows the source frame whose timestamp is nearest (ties go to the
  earlier frame). A 24-FPS source maps one to one; 30 FPS drops every fifth frame; 12 FPS
  repeats every frame.
* Tracks map to source frames by index (see `sabr_jax.data.tracks`), so output frame k
  carries the motion of its source frame.

Frames are resized to the standard 368x640 (H x W; 640x368 for portrait sources) with
area interpolation before encoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np

OUTPUT_FPS = 24
FRAME_SIZE = (368, 640)  # landscape (H, W); portrait sources get (640, 368)


class VideoError(ValueError):
    """A video that cannot be read, or is shorter than it says."""


def oriented(size: tuple[int, int], height: int, width: int) -> tuple[int, int]:
    """A landscape (h, w) size, turned portrait when the source frame is portrait."""
    h, w = min(size), max(size)
    return (w, h) if height > width else (h, w)


def probe(path: str | os.PathLike) -> dict:
    """Width, height, average rate and declared frame count of the first video stream."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return {
                "width": stream.codec_context.width,
                "height": stream.codec_context.height,
                "fps": float(rate) if rate else None,
                "declared_frames": int(stream.frames or 0),
                "duration_s": float(stream.duration * stream.time_base) if stream.duration else None,
            }
    except VideoError:
        raise
    except Exception as e:  # av.error.* (InvalidDataError, ...), OSError
        raise VideoError(f"{path}: cannot open video: {e}") from None


def resampled_frames(
    path: str | os.PathLike,
    keep: Callable[[int], bool],
    size: tuple[int, int] | None = FRAME_SIZE,
    fps: int = OUTPUT_FPS,
    stats: dict | None = None,
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Decode and resample to `fps`; yields (output index k, source index i, uint8 [h, w, 3]).

    Only output frames whose source frame passes `keep(i)` are converted to pixels and
    yielded (the others cost a decode, no resize). `size` is the landscape (h, w) output
    size (None: the source size); portrait sources get it turned. `stats`, if given, is
    filled with source_frames, source_fps, output_frames, width, height at the end.
    Raises VideoError when the file cannot be opened or decoding fails part way (a
    truncated file): the message names the file and the last good frame.
    """
    import av

    path = os.fspath(path)
    try:
        container = av.open(path)
    except Exception as e:
        raise VideoError(f"{path}: cannot open video: {e}") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate or Fraction(OUTPUT_FPS)
        declared = int(stream.frames or 0)
        step = Fraction(1, fps)
        prev = None  # (index, time, frame)
        k = 0
        index = -1
        t0 = None
        out_hw = None

        def emit(k, item):
            i, _, frame = item
            if not keep(i):
                return None
            nonlocal out_hw
            if out_hw is None:
                out_hw = oriented(size, frame.height, frame.width) if size else (frame.height, frame.width)
            pixels = frame.to_ndarray(format="rgb24", height=out_hw[0], width=out_hw[1], interpolation="AREA")
            return k, i, pixels

        try:
            for frame in container.decode(stream):
                index += 1
                if frame.pts is not None and stream.time_base is not None:
                    t = Fraction(frame.pts) * stream.time_base
                else:
                    t = Fraction(index) / Fraction(rate)
                if t0 is None:
                    t0 = t
                t -= t0
                item = (index, t, frame)
                while prev is not None and k * step <= t:
                    # nearest of prev and this frame; ties to the earlier one
                    chosen = prev if k * step - prev[1] <= t - k * step else item
                    out = emit(k, chosen)
                    if out is not None:
                        yield out
                    k += 1
                prev = item
            while prev is not None and k * step <= prev[1]:  # the tail: the last frame is nearest
                out = emit(k, prev)
                if out is not None:
                    yield out
                k += 1
        except av.error.FFmpegError as e:
            raise VideoError(f"{path}: decoding failed after frame {index} (truncated or corrupt file?): {e}") from None
        if index < 0:
            raise VideoError(f"{path}: no frame could be decoded (truncated or corrupt file?)")
        if declared and index + 1 < declared:
            raise VideoError(
                f"{path}: the container declares {declared} frames but only {index + 1} decode (truncated file?)"
            )
        if stats is not None:
            stats.update(
                source_frames=index + 1,
                source_fps=float(rate),
                output_frames=k,
                width=prev[2].width,
                height=prev[2].height,
            )


def read_context(
    folder: str | os.PathLike, size: tuple[int, int] | None = FRAME_SIZE, limit: int | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """The route images of a clip: (names used, uint8 [C, h, w, 3] at `size`, names dropped).

    The PNGs of `folder` are taken in natural name order, as track frames are (runs of
    digits compare as numbers: 2.png before 10.png; sabr_jax.data.tracks.natural_key);
    the first `limit` (None: all) are read, the rest are dropped and named in the third
    value so that the caller can say so.
    """
    from PIL import Image

    from sabr_jax.data.tracks import natural_key

    folder = Path(folder)
    names = sorted((p.name for p in folder.glob("*.png")), key=natural_key) if folder.is_dir() else []
    if limit is not None:
        names, dropped = names[:limit], names[limit:]
    else:
        dropped = []
    frames = []
    for name in names:
        try:
            with Image.open(folder / name) as im:
                im = im.convert("RGB")
                if size:
                    h, w = oriented(size, im.height, im.width)
                    im = im.resize((w, h), Image.Resampling.BOX)
                frames.append(np.asarray(im, np.uint8))
        except Exception as e:
            raise VideoError(f"{folder / name}: cannot read route image: {e}") from None
    if frames and len({f.shape for f in frames}) > 1:
        raise VideoError(f"{folder}: route images have different orientations: {sorted({f.shape for f in frames})}")
    if not frames:
        h, w = size or (0, 0)
        return [], np.zeros((0, h, w, 3), np.uint8), dropped
    return names, np.stack(frames), dropped


def pool_tokens(tokens: np.ndarray, grid: tuple[int, int], pool: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Average-pool [N, gh*gw, D] row-major patch tokens over pool x pool windows.

    Ceil mode: a grid side that is not a multiple of `pool` keeps its last, partial window,
    averaged over the patches it has (no zero padding counts). So 20x35 -> 10x18 = 180
    tokens per frame (35x20 -> 18x10 for portrait) and every pixel column stays seen.
    Returns (tokens [N, ph*pw, D], (ph, pw)).
    """
    if pool <= 1:
        return tokens, grid
    gh, gw = grid
    n, p, d = tokens.shape
    if p != gh * gw:
        raise ValueError(f"{p} tokens do not form a {gh}x{gw} grid")
    ph, pw = -(-gh // pool), -(-gw // pool)
    x = np.zeros((n, ph * pool, pw * pool, d), np.float32)
    x[:, :gh, :gw] = tokens.reshape(n, gh, gw, d)
    count = np.zeros((ph * pool, pw * pool), np.float32)
    count[:gh, :gw] = 1
    sums = x.reshape(n, ph, pool, pw, pool, d).sum((2, 4))
    counts = count.reshape(ph, pool, pw, pool).sum((1, 3))
    return (sums / counts[None, :, :, None]).reshape(n, ph * pw, d), (ph, pw)

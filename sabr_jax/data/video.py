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

Phone videos: a container may store the frames sideways with a rotation to apply on
display (the display matrix, or the older 'rotate' stream tag). Frames are decoded
upright, as players show them: rotated by that angle (rounded to quarter turns), and
"portrait" and every size here mean the upright frame (`probe` reports its width and
height). Trackers see upright frames too (ffmpeg rotates when it extracts them), so a
track's `size` must have the upright frame's orientation (`orientation_mismatch`).
"""

from __future__ import annotations

import os
import re
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


def quarter_turns(frame, stream) -> int:
    """Counterclockwise quarter turns (0..3) that make a decoded frame upright: the frame's
    display matrix (PyAV's `rotation`, degrees counterclockwise), else the stream's 'rotate'
    tag (degrees clockwise), rounded to the nearest quarter turn."""
    degrees = frame.rotation
    if not degrees:
        try:
            degrees = -float(stream.metadata.get("rotate", 0))
        except ValueError:  # a tag that is not a number: no rotation
            degrees = 0
    return round(degrees / 90) % 4


def upright_hw(frame, turns: int) -> tuple[int, int]:
    """(height, width) of a decoded frame once turned upright."""
    return (frame.width, frame.height) if turns % 2 else (frame.height, frame.width)


def orientation_mismatch(size_hw, video_hw) -> str | None:
    """None when size_hw (a tracker's image size [H, W]) and video_hw (the upright decoded
    frame's) are both portrait or both landscape (or either is square); else what is wrong,
    to follow the name of the field that holds size_hw."""
    (h, w), (vh, vw) = size_hw, video_hw
    if h == w or vh == vw or (h > w) == (vh > vw):
        return None
    shape = lambda a, b: f"{'portrait' if a > b else 'landscape'} {int(a)}x{int(b)}"  # noqa: E731
    return (
        f"is {shape(h, w)} (HxW) but the video decodes upright to {shape(vh, vw)}: the tracker saw the frames "
        "turned (the video's rotation not applied?); track the upright video"
    )


def probe(path: str | os.PathLike) -> dict:
    """Upright width and height (see the module docstring), rotation (counterclockwise
    quarter turns applied), average rate and declared frame count of the first video stream.
    The first frame is decoded to read its display matrix."""
    import av

    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            first = next(container.decode(stream), None)
            turns = quarter_turns(first, stream) if first is not None else 0
            height, width = upright_hw(stream.codec_context, turns)
            return {
                "width": width,
                "height": height,
                "rotation": turns,
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
    source: bool = False,
) -> Iterator[tuple]:
    """Decode and resample to `fps`; yields (output index k, source index i, uint8 [h, w, 3]), and
    with source=True the same frame at the source size too (k, i, pixels, uint8 [H, W, 3]): one
    decode for both.

    Only output frames whose source frame passes `keep(i)` are converted to pixels and
    yielded (the others cost a decode, no resize). Frames are turned upright (the
    container's rotation, see the module docstring). `size` is the landscape (h, w) output
    size (None: the source size); portrait sources get it turned. `stats`, if given, is
    filled with source_frames, source_fps, output_frames, width, height (upright) and
    rotation (counterclockwise quarter turns applied) at the end.
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
        out_hw = turns = None

        def emit(k, item):
            i, _, frame = item
            if not keep(i):
                return None
            nonlocal out_hw
            if out_hw is None:
                out_hw = oriented(size, *upright_hw(frame, turns)) if size else upright_hw(frame, turns)
            height, width = out_hw[::-1] if turns % 2 else out_hw  # the stored (sideways) frame's
            pixels = [frame.to_ndarray(format="rgb24", height=height, width=width, interpolation="AREA")]
            if source:
                pixels.append(frame.to_ndarray(format="rgb24"))
            return k, i, *(np.ascontiguousarray(np.rot90(p, turns)) if turns else p for p in pixels)

        try:
            for frame in container.decode(stream):
                index += 1
                if frame.pts is not None and stream.time_base is not None:
                    t = Fraction(frame.pts) * stream.time_base
                else:
                    t = Fraction(index) / Fraction(rate)
                if t0 is None:
                    t0, turns = t, quarter_turns(frame, stream)
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
                width=upright_hw(prev[2], turns)[1],
                height=upright_hw(prev[2], turns)[0],
                rotation=turns,
            )


def natural_key(name) -> tuple:
    """A sort key that compares the digit runs of a name as numbers: frame_9 before frame_10."""
    parts = re.split(r"(\d+)", str(name))
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def read_context(
    folder: str | os.PathLike, size: tuple[int, int] | None = FRAME_SIZE, limit: int | None = None
) -> tuple[list[str], np.ndarray, list[str]]:
    """The route images of a clip: (names used, uint8 [C, h, w, 3] at `size`, names dropped).

    The PNGs of `folder` are taken in natural name order, as track frames are (runs of
    digits compare as numbers: 2.png before 10.png; sabr_jax.data.video.natural_key);
    the first `limit` (None: all) are read, the rest are dropped and named in the third
    value so that the caller can say so.
    """
    from PIL import Image

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


class VideoWriter:
    """An H.264 (libx264, yuv420p) mp4 written one uint8 [H, W, 3] frame at a time with PyAV.

    The size is the first frame's; an odd height or width (which yuv420p cannot hold) is
    padded by repeating the last row or column. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, fps: int, crf: int = 20):
        import av

        self._av = av
        self.container = av.open(os.fspath(path), "w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": str(crf), "preset": "veryfast"}
        self.started = False

    def write(self, frame: np.ndarray) -> None:
        height, width = frame.shape[:2]
        frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        if not self.started:
            self.stream.height, self.stream.width = frame.shape[:2]
            self.started = True
        video_frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        self.container.mux(self.stream.encode(video_frame))

    def close(self) -> None:
        if self.started:
            self.container.mux(self.stream.encode())
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

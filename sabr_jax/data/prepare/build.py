"""What `sabr-prepare` does: user clips -> motion vectors + DINOv2 tokens -> a TFDS dataset.

    prepare(CLIPS, DIR, Settings(encoder=...))   # the command line: sabr_jax.cli.prepare

CLIPS/<clip_id>/ holds video.mp4, context/*.png (optional), tracks.pkl (PHALP /
4D-Humans) and holds.json (optional). Settings (sabr_jax.data.prepare.settings) say what
to make of them. Two stages:

1. Per clip (split between hosts by jax.process_index; resumable): decode the video,
   resample to 24 FPS (nearest timestamp, see sabr_jax.data.video), resize to 368x640,
   read the climber's track (sabr_jax.data.tracks), keep every frame from the first to
   the last one where the climber is detected (frames in between where the tracker lost
   the climber stay in place, with their video tokens, and are masked: motion_mask False,
   zero motion, out of the loss and the statistics; see sabr_jax.data.store.prepared), take the
   route images in natural name order (at most --context_frames; the report names those
   dropped), encode every kept frame and route image with the frozen DINOv2
   (batched, data-parallel over the host's local devices), optionally 2x2-pool the patch
   tokens, store them (bf16 or f32) in DIR/prepared/<clip_id>/, atomically. A frame whose
   track values cannot be used (NaN, inf: sabr_jax.data.tracks.BadValues) is masked as a frame
   where the tracker lost the climber, and named in the report; a clip where more than
   --max_bad_fraction of the climber's detected frames are so is skipped. A clip that
   fails (unreadable video, bad tracks, ...) is recorded in DIR/prepared/_failed/ and
   the others go on; a rerun skips finished clips and retries failed ones.
2. On host 0, after all hosts: split the clips into train/validation by clip id
   (deterministic hash order), cut clips longer than --max_seconds into equal parts,
   compute the normalisation statistics over the train split's tracked frames, write the TFDS dataset
   (ArrayRecord, one record per frame; see sabr_jax.data.store.tfds_builder) to
   DIR/sabr_clips/1.0.0/, and the report DIR/report.json (also printed) listing what was
   built, resumed and skipped, and why, the masked frames of every clip, and warnings.
   A dataset whose fingerprint matches is kept unless one of its files is damaged
   (tfds_builder.damaged_files: missing, not the size written, unreadable): it is rebuilt.

A full disk stops either stage with one DiskFull error naming what was being written; a
rerun resumes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sabr_jax.body import camera
from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.data.prepare.disk import RESUME, DiskFull, disk_full
from sabr_jax.data.prepare.report import print_report
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.data.store import prepared as prep
from sabr_jax.encoders.frames import FrameEncoder, make_encoder
from sabr_jax.eval.metrics import mirror_holds
from sabr_jax.motion import NormStats

PREPARED = "prepared"
REPORT = "report.json"
NORM_STATS = "norm_stats.json"
MIRROR_SUFFIX = ".mirror"  # prepared_dir/<clip_id><this>: the clip's mirror image (Settings.mirror)


class ClipError(ValueError):
    """A clip that cannot be prepared; the message says which file and why."""


# ---------------------------------------------------------------- stage 1: one clip
def list_clips(clips_dir: str | os.PathLike) -> list[str]:
    """The clip ids (sub-folder names) of CLIPS; FileNotFoundError if it is no folder."""
    clips_dir = Path(clips_dir)
    if not clips_dir.is_dir():
        raise FileNotFoundError(
            f"{clips_dir}: no such folder; expected a folder of clips, CLIPS/<clip_id>/{{video.mp4, tracks.pkl, "
            "context/*.png, holds.json}"
        )
    return sorted(p.name for p in clips_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def mirrored_id(clip_id: str) -> str:
    """The clip id of a clip's mirror image (Settings.mirror)."""
    return f"{clip_id}{MIRROR_SUFFIX}"


def _check_clip_id(clip_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", clip_id):
        raise ClipError(
            f"clip folder name {clip_id!r} is not a valid clip id (letters, digits, '_', '-', '.'; not starting with '_' or '.')"
        )


def prepare_clip(
    clip_dir: Path, prepared_dir: Path, settings: Settings, encoder: FrameEncoder, mirror: bool = False
) -> dict:
    """Stage 1 for one clip: writes prepared_dir/<clip_id>/ and returns its meta. mirror=True
    prepares its left-right mirror image instead, as <clip_id>.mirror (`mirrored_id`): the video
    and route images flipped before they are encoded, the motion mirrored (body.camera.mirror),
    holds.json mirrored (eval.metrics.mirror_holds)."""
    _check_clip_id(clip_dir.name)
    clip_id = mirrored_id(clip_dir.name) if mirror else clip_dir.name
    flip = (lambda pixels: np.ascontiguousarray(pixels[:, ::-1])) if mirror else (lambda pixels: pixels)  # noqa: E731
    video_path, tracks_path = clip_dir / "video.mp4", clip_dir / "tracks.pkl"
    for path in (video_path, tracks_path):
        if not path.is_file():
            raise ClipError(f"{path}: missing")
    warnings = []
    info = vid.probe(video_path)
    tracks = tr.load_tracks(tracks_path)
    bad: dict[int, str] = {}  # frames with unusable values: masked like tracker-lost frames
    tid, names, present, vectors = tr.climber_motion(
        tracks, str(tracks_path), image_hw=(info["height"], info["width"]), bad=bad
    )
    detected = int(present.sum()) + len(bad)
    if len(bad) > settings.max_bad_fraction * detected:
        raise ClipError(
            f"{tracks_path}: {len(bad)} of the {detected} frames where the climber (track {tid}) is detected have "
            f"unusable values (more than --max_bad_fraction={settings.max_bad_fraction:g} of them); the first: "
            f"{bad[min(bad)].removeprefix(f'{tracks_path}: ')}"
        )
    if not present.any():
        raise ClipError(f"{tracks_path}: no frame where the climber (track {tid}) is detected has usable values")
    declared = info["declared_frames"]
    if declared:
        tr.check_frame_count(tracks_path, len(names), video_path, declared, settings.frame_tolerance, "declares")
    holds = None
    if (clip_dir / "holds.json").exists():
        try:
            holds = json.loads((clip_dir / "holds.json").read_text())
        except (OSError, ValueError) as e:
            warnings.append(f"{clip_dir / 'holds.json'}: ignored, not valid JSON ({e})")
    if mirror:
        vectors, holds = camera.mirror(vectors), holds and mirror_holds(holds)

    dtype = prep.dtype_of(settings.precision)
    writer = prep.ClipWriter(prepared_dir, clip_id, dtype)
    try:
        kept_sources: list[int] = []
        stats: dict = {}
        tracked = np.flatnonzero(present)  # (not empty: climber_motion needs one detection)

        def frames():
            keep = lambda i: tracked[0] <= i <= tracked[-1]  # noqa: E731
            for _, i, pixels in vid.resampled_frames(video_path, keep, settings.frame_size, settings.fps, stats):
                kept_sources.append(i)
                yield flip(pixels)

        encoder.stream(frames(), lambda t: writer.append("video.bin", t))
        tr.check_frame_count(tracks_path, len(names), video_path, stats["source_frames"], settings.frame_tolerance)
        motion_mask = present[kept_sources]
        if motion_mask.sum() < settings.min_frames:
            raise ClipError(
                f"{clip_dir}: only {motion_mask.sum()} frames at {settings.fps} FPS show the climber (track {tid}); "
                f"at least --min_frames={settings.min_frames} are needed"
            )
        context_names, context, dropped = vid.read_context(
            clip_dir / "context", settings.frame_size, settings.context_frames
        )
        if dropped:
            warnings.append(
                f"{clip_dir / 'context'}: more route images than --context_frames={settings.context_frames}; "
                f"dropped (in natural name order, the first ones are kept): {', '.join(dropped)}"
            )
        if len(context):
            encoder.stream(map(flip, context), lambda t: writer.append("context.bin", t))
        frame_hw = (stats["height"], stats["width"])
        grid = encoder.pooled_grid(frame_hw)
        meta = {
            "clip_id": clip_id,
            "num_frames": len(kept_sources),
            "masked_frames": int((~motion_mask).sum()),  # kept frames where the climber is not tracked
            "bad_frames": {names[i]: bad[i] for i in sorted(bad)},  # tracker frames with unusable values (masked)
            "num_context": len(context_names),
            "num_patches": grid[0] * grid[1],
            "video_dim": encoder.video_dim,
            "dtype": settings.precision,
            "grid": list(grid),
            "track_id": tid,
            "source": {
                "frames": stats["source_frames"],
                "fps": stats["source_fps"],
                "width": stats["width"],
                "height": stats["height"],
                "track_frames": len(names),
                "detected_frames": detected,
            },
            "output_frames": stats["output_frames"],
            "source_frame_of": kept_sources,  # source index of every kept output frame
            "context_files": context_names,
            "context_dropped": dropped,
            "holds": holds,
            "mirror_of": clip_dir.name if mirror else None,
            "warnings": warnings,
            "settings": settings.clip_fingerprint(),
            "created": time.time(),
        }
        writer.commit(vectors[kept_sources], meta, motion_mask)
        return meta
    except BaseException:
        writer.abort()
        raise


def _is_finished(prepared_dir: Path, clip_id: str, settings: Settings) -> bool:
    meta_path = prepared_dir / clip_id / prep.META
    if not meta_path.is_file():
        return False
    try:
        return json.loads(meta_path.read_text()).get("settings") == settings.clip_fingerprint()
    except (OSError, ValueError):
        return False


def encode_clips(
    clips_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    settings: Settings,
    *,
    process_index: int = 0,
    process_count: int = 1,
    encoder: FrameEncoder | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Stage 1 for this host's clips (clips[process_index::process_count], in name order).

    Returns {"prepared": [...], "resumed": [...], "failed": {clip_id: reason}} for this host.
    """
    clips_dir, data_dir = Path(clips_dir), Path(data_dir)
    mine = list_clips(clips_dir)[process_index::process_count]
    prepared_dir = data_dir / PREPARED
    failed_dir = prepared_dir / prep.FAILED_DIR
    failed_dir.mkdir(parents=True, exist_ok=True)
    result = {"prepared": [], "resumed": [], "failed": {}}
    train = set(split_clips(list_clips(clips_dir), settings.validation_fraction, settings.split_seed)[0])
    jobs = [(c, False) for c in mine] + [(c, True) for c in mine if settings.mirror and c in train]
    for n, (source_id, mirror) in enumerate(jobs):
        clip_id = mirrored_id(source_id) if mirror else source_id
        failure = failed_dir / f"{clip_id}.json"
        if _is_finished(prepared_dir, clip_id, settings):
            result["resumed"].append(clip_id)
            failure.unlink(missing_ok=True)
            continue
        if encoder is None:
            log(f"loading encoder {settings.encoder} ...")
            encoder = FrameEncoder(make_encoder(settings), settings)
        start = time.time()
        try:
            meta = prepare_clip(clips_dir / source_id, prepared_dir, settings, encoder, mirror)
        except (ClipError, tr.TrackError, vid.VideoError) as e:
            reason = str(e)
        except Exception as e:  # an unexpected failure still must not stop the other clips (a full disk stops all)
            if disk_full(e):
                raise DiskFull(
                    f"no space left on device writing the prepared clip {prepared_dir / clip_id}: {RESUME}"
                ) from None
            reason = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        else:
            failure.unlink(missing_ok=True)
            result["prepared"].append(clip_id)
            masked = f" ({meta['masked_frames']} masked: climber not tracked)" if meta["masked_frames"] else ""
            log(
                f"[{n + 1}/{len(jobs)}] {clip_id}: {meta['num_frames']} frames{masked}, {meta['num_context']} route images "
                f"({time.time() - start:.1f} s)"
            )
            continue
        result["failed"][clip_id] = reason
        prep.atomic_write_json(failure, {"clip_id": clip_id, "reason": reason, "time": time.time()})
        log(f"[{n + 1}/{len(jobs)}] {clip_id}: SKIPPED: {reason}")
    return result


# ---------------------------------------------------------------- stage 2: the dataset
def split_clips(clip_ids: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, validation) by clip id: sorted by a seeded hash, the first round(fraction * N)
    (at least 1 when fraction > 0 and N >= 2; never all) are validation. Adding clips moves
    few others."""
    order = sorted(clip_ids, key=lambda c: hashlib.sha256(f"{seed}:{c}".encode()).hexdigest())
    n = len(order)
    n_val = round(fraction * n)
    if fraction > 0 and n >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n - 1) if n else 0
    val = set(order[:n_val])
    return [c for c in sorted(clip_ids) if c not in val], [c for c in sorted(clip_ids) if c in val]


def cut(num_frames: int, max_frames: int) -> list[tuple[int, int]]:
    """Equal parts of at most max_frames covering 0..num_frames."""
    parts = max(1, math.ceil(num_frames / max_frames))
    bounds = np.linspace(0, num_frames, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def dataset_dir(data_dir: str | os.PathLike) -> Path:
    from sabr_jax.data.store import tfds_builder

    return Path(data_dir) / tfds_builder.NAME / tfds_builder.VERSION


def build_dataset(
    data_dir: str | os.PathLike, settings: Settings, clip_ids: Sequence[str], mirrors: Sequence[str] = (), log=print
) -> dict:
    """Stage 2: the TFDS dataset from the finished prepared clips among clip_ids, split by clip,
    with the prepared mirror images (`mirrored_id`) among `mirrors` of the train clips in train."""
    from sabr_jax.data.store import tfds_builder

    data_dir = Path(data_dir)
    prepared_dir = data_dir / PREPARED
    clips = {c: prep.PreparedClip(prepared_dir / c) for c in [*clip_ids, *mirrors]}
    if not clips:
        raise ClipError("no clip could be prepared: nothing to build (see the report)")
    shapes = {(c.num_patches, c.video_dim, c.meta["dtype"]) for c in clips.values()}
    if len(shapes) != 1:
        raise ClipError(f"prepared clips disagree on (patches, width, dtype): {sorted(shapes)}")
    ((num_patches, video_dim, precision),) = shapes
    train_ids, val_ids = split_clips(sorted(clip_ids), settings.validation_fraction, settings.split_seed)
    train_ids += [mirrored_id(c) for c in train_ids if mirrored_id(c) in mirrors]
    max_frames = max(1, int(settings.max_seconds * settings.fps))

    def parts(ids):
        out = []
        for c in ids:
            pieces = cut(clips[c].num_frames, max_frames)
            for k, (a, b) in enumerate(pieces):
                out.append(tfds_builder.ClipPart(str(clips[c].path), c if len(pieces) == 1 else f"{c}#{k}", c, k, a, b))
        return out

    splits = {"train": parts(train_ids), "validation": parts(val_ids)}
    stats = NormStats.from_data(  # over the tracked frames only
        np.concatenate([clips[c].motion() for c in train_ids]),
        np.concatenate([clips[c].motion_mask() for c in train_ids]),
    )
    fingerprint = hashlib.sha256(
        json.dumps(
            [
                tfds_builder.INDEX_FORMAT,
                settings.clip_fingerprint(),
                settings.validation_fraction,
                settings.split_seed,
                max_frames,
                [(c, clips[c].meta.get("created")) for c in sorted(clips)],
            ],
            sort_keys=True,
        ).encode()
    ).hexdigest()
    out = dataset_dir(data_dir).absolute()
    index_path = out / tfds_builder.INDEX_FILE
    summary = {
        name: {
            "clips": len(p),
            "source_clips": len({x.source_clip for x in p}),
            "frames": sum(x.stop - x.start for x in p),
        }
        for name, p in splits.items()
    }
    if index_path.is_file() and (index := json.loads(index_path.read_text())).get("fingerprint") == fingerprint:
        damaged = tfds_builder.damaged_files(out, index, list(index["splits"]))
        if not damaged:
            log(f"dataset {out} is up to date")
            return {"path": str(out), "rebuilt": False, "splits": summary}
        log(f"dataset {out} is damaged ({'; '.join(f'{f.name}: {why}' for f, why in damaged)}): rebuilding")
    if out.exists():
        shutil.rmtree(out)
    builder = tfds_builder.SabrClips(
        data_dir=os.fspath(data_dir),
        splits=splits,
        num_patches=num_patches,
        video_dim=video_dim,
        precision=precision,
        index_extra={
            "fingerprint": fingerprint,
            "norm_stats": stats.to_dict(),
            "pool": settings.pool,
            "fps": settings.fps,
            "max_seconds": settings.max_seconds,
            "encoder": settings.clip_fingerprint()["encoder"],
        },
    )
    try:
        builder.download_and_prepare()
        prep.atomic_write_json(data_dir / NORM_STATS, stats.to_dict())
    except (OSError, RuntimeError) as error:
        if not disk_full(error):
            raise
        file = re.search(r"writing (\S+?);", str(error))  # ArrayRecord's message names its file
        what = f"{Path(file[1]).name} of the dataset" if file else "the dataset"
        raise DiskFull(f"no space left on device writing {what} {out}: {RESUME}") from None
    log(f"wrote {out}: " + ", ".join(f"{k} {v['clips']} clips / {v['frames']} frames" for k, v in summary.items()))
    return {"path": str(out), "rebuilt": True, "splits": summary}


def make_report(clips_dir, data_dir, settings: Settings, host_results: Sequence[dict], dataset: dict | None) -> dict:
    """The report over all clips (reads the failure records every host wrote)."""
    data_dir = Path(data_dir)
    prepared_dir = data_dir / PREPARED
    skipped, built, warnings, masked, bad = [], [], [], {}, {}
    for clip_id in list_clips(clips_dir):
        failure = prepared_dir / prep.FAILED_DIR / f"{clip_id}.json"
        if _is_finished(prepared_dir, clip_id, settings):
            built.append(clip_id)
            meta = prep.PreparedClip(prepared_dir / clip_id).meta
            warnings += [f"{clip_id}: {w}" for w in meta.get("warnings", [])]
            masked[clip_id] = meta["masked_frames"]
            if meta.get("bad_frames"):
                bad[clip_id] = meta["bad_frames"]
        elif failure.is_file():
            skipped.append({"clip_id": clip_id, "reason": json.loads(failure.read_text())["reason"]})
        else:
            skipped.append({"clip_id": clip_id, "reason": "not prepared (a host did not finish it)"})
    return {
        "clips_dir": os.path.abspath(clips_dir),
        "settings": dataclasses.asdict(settings),
        "built": built,
        "prepared_now": sorted(c for r in host_results for c in r["prepared"]),
        "resumed": sorted(c for r in host_results for c in r["resumed"]),
        "skipped": skipped,
        "masked_frames": masked,  # per built clip: frames kept in place but out of the loss (climber not tracked)
        "bad_frames": bad,  # per built clip with any: {tracker frame name: why its values cannot be used}, masked
        "warnings": warnings,
        "dataset": dataset,
    }


def prepare(
    clips_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    settings: Settings,
    *,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[], None] | None = None,
    log: Callable[[str], None] = print,
    workers: int = 1,
) -> dict | None:
    """Both stages on this host; returns the report on host 0 (None elsewhere). workers > 1 (one
    host only) encodes the clips in that many processes, each its share as a host of a multi-host
    run would (clips[i::workers]), each with an encoder of its own; they log their clips with `log`
    if it can be sent to a process (a module-level function: print, absl's logging.info), else print."""
    if workers > 1 and process_count == 1:
        try:
            pickle.dumps(log)
        except (pickle.PicklingError, AttributeError, TypeError):
            log = print
        shares = [(clips_dir, data_dir, settings, i, workers, log) for i in range(workers)]
        context = multiprocessing.get_context("spawn")  # (JAX is not fork-safe)
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            results = list(pool.map(_encode_share, shares))
    else:
        results = [
            encode_clips(
                clips_dir, data_dir, settings, process_index=process_index, process_count=process_count, log=log
            )
        ]
    if barrier is not None:
        barrier()
    if process_index != 0:
        return None
    built = [c for c in list_clips(clips_dir) if _is_finished(Path(data_dir) / PREPARED, c, settings)]
    mirrors = [
        mirrored_id(c)
        for c in built
        if settings.mirror and _is_finished(Path(data_dir) / PREPARED, mirrored_id(c), settings)
    ]
    dataset, error = None, None
    try:
        dataset = build_dataset(data_dir, settings, built, mirrors, log=log) if built else None
    except ClipError as e:
        error = str(e)
    report = make_report(clips_dir, data_dir, settings, results, dataset)
    if error or not built:
        report["error"] = error or "no clip could be prepared: nothing to build"
    try:
        prep.atomic_write_json(Path(data_dir) / REPORT, report)
    except OSError as e:
        if disk_full(e):
            raise DiskFull(f"no space left on device writing {Path(data_dir) / REPORT}: {RESUME}") from None
        raise
    print_report(report, Path(data_dir) / REPORT, log)
    return report


def _encode_share(args) -> dict:
    """encode_clips of one worker's share: (clips_dir, data_dir, settings, index, count, log)."""
    clips_dir, data_dir, settings, index, count, log = args
    return encode_clips(clips_dir, data_dir, settings, process_index=index, process_count=count, log=log)

"""Data benchmarks: Grain pipeline throughput over the TFDS source, and disk bytes per minute.

    python benchmarks/bench_data.py                 # everything (a few minutes on 2 cores)
    python benchmarks/bench_data.py --only disk     # or: --only pipeline

Datasets are real: synthetic prepared clips (random tokens and motion) written through the
same `SabrClips` TFDS builder as `sabr-prepare`, then read through `open_tfds` and
`pipeline.dataset`. Prints markdown tables.

Pipeline rows: examples/s of the per-host pipeline (TFDS source, windows of max_frames,
padding, batching) with 0 and 2 Grain workers, for the demo shapes (P 8, Dv 32, L 48)
and the sabr_s shapes (P 700 or 180 pooled, Dv 384, L 1100, bf16 tokens). "stock" is
`pipeline.dataset` as it is; "bounded" is the same pipeline with
`to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))`: Grain's
default read options prefetch 500 *batches* with 16 threads, which at sabr_s shapes
(0.6 GB per example) exhausts host memory, so sabr_s rows use "bounded" only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import numpy as np  # noqa: E402

from sabr_jax.data import pipeline  # noqa: E402
from sabr_jax.data.prepare import build as P  # noqa: E402
from sabr_jax.data.prepare.settings import Settings  # noqa: E402
from sabr_jax.data.store import prepared as prep  # noqa: E402
from sabr_jax.data.store import tfds_source  # noqa: E402
from sabr_jax.data.video import pool_tokens  # noqa: E402
from sabr_jax.motion import MOTION_DIM  # noqa: E402

FPS = 24


def write_dataset(
    data_dir: Path, *, clips: int, frames: int, context: int, dim: int, pool: int, precision: str, grid=(20, 35), seed=0
) -> Path:
    """Synthetic prepared clips -> the SabrClips builder (as sabr-prepare stage 2 does)."""
    rng = np.random.default_rng(seed)
    dtype = prep.dtype_of(precision)
    pgrid = (-(-grid[0] // pool), -(-grid[1] // pool))
    ids = []
    for c in range(clips):
        clip_id = f"clip{c:03d}"
        writer = prep.ClipWriter(data_dir / P.PREPARED, clip_id, dtype)
        for name, n in (("context.bin", context), ("video.bin", frames)):
            for start in range(0, n, 64):
                m = min(64, n - start)
                tokens = rng.standard_normal((m, grid[0] * grid[1], dim), np.float32)
                writer.append(name, pool_tokens(tokens, grid, pool)[0])
        settings = Settings(encoder="random-s", precision=precision, pool=pool, validation_fraction=0.0)
        meta = {
            "clip_id": clip_id,
            "num_frames": frames,
            "num_context": context,
            "num_patches": pgrid[0] * pgrid[1],
            "video_dim": dim,
            "dtype": precision,
            "grid": list(pgrid),
            "settings": settings.clip_fingerprint(),
            "created": 0.0,
        }
        writer.commit(rng.standard_normal((frames, MOTION_DIM)).astype(np.float32), meta)
        ids.append(clip_id)
    P.build_dataset(data_dir, settings, ids, log=lambda s: None)
    return P.dataset_dir(data_dir)


def bounded_dataset(source, *, stats, max_frames, context_frames, batch_size, seed, num_workers=0):
    """pipeline.dataset with bounded Grain read options (the change proposed for pipeline.py)."""
    clips = grain.MapDataset.range(len(source))
    ds = (
        clips.shuffle(seed=seed)
        .repeat()
        .random_map(pipeline.Windowing(source, max_frames, context_frames, stats), seed=seed + 1)
        .batch(batch_size, drop_remainder=True)
        .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    )
    if num_workers > 0:
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def throughput(ds, batch_size: int, seconds: float, warmup: int = 2) -> tuple[float, int]:
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(it)
        n += 1
    return n * batch_size / (time.perf_counter() - start), n


def bench_pipeline(tmp: Path, seconds: float) -> None:
    print("\n## Pipeline throughput (TFDS source -> Grain batches), examples/s on this host\n")
    print(
        "| shapes | P | Dv | max_frames | batch | tokens | MB/example | read options | workers | examples/s | frames/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    cases = [
        # name, P grid, pool, Dv, max_frames, context, clip frames, clips, batch, variants
        ("demo", (2, 4), 1, 32, 48, 4, 96, 32, 8, ("stock", "bounded")),
        ("sabr_s", (20, 35), 1, 384, 1100, 16, 1080, 2, 1, ("bounded",)),
        ("sabr_s pooled", (20, 35), 2, 384, 1100, 16, 1080, 3, 2, ("bounded",)),
    ]
    for name, grid, pool, dim, max_frames, context, frames, clips, batch, variants in cases:
        data_dir = tmp / f"pipe-{name.replace(' ', '_')}"
        path = write_dataset(
            data_dir, clips=clips, frames=frames, context=context, dim=dim, pool=pool, precision="bfloat16", grid=grid
        )
        source, stats = tfds_source.open_tfds(path, "train")
        mb = max_frames * source.num_patches * dim * 2 / 1e6
        for variant in variants:
            for workers in (0, 2):
                make = pipeline.dataset if variant == "stock" else bounded_dataset
                ds = make(
                    source,
                    stats=stats,
                    max_frames=max_frames,
                    context_frames=context,
                    batch_size=batch,
                    seed=0,
                    num_workers=workers,
                )
                rate, _ = throughput(ds, batch, seconds)
                print(
                    f"| {name} | {source.num_patches} | {dim} | {max_frames} | {batch} | bf16 | {mb:.1f} | {variant} | {workers} "
                    f"| {rate:.1f} | {rate * max_frames:.0f} |",
                    flush=True,
                )
                del ds
        shutil.rmtree(data_dir)


def bench_disk(tmp: Path, frames: int) -> None:
    print(f"\n## Disk per minute of 24-FPS video (measured on datasets of {frames} frames + 4 route frames)\n")
    print(
        "| encoder | Dv | precision | pooling | tokens/frame | dataset bytes/frame | GB per minute | GB per 45-s clip | prepared/ GB per minute |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for enc, dim in (("S", 384), ("L", 1024)):
        for precision in ("bfloat16", "float32"):
            for pool in (1, 2):
                data_dir = tmp / f"disk-{enc}-{precision}-{pool}"
                path = write_dataset(
                    data_dir, clips=1, frames=frames, context=4, dim=dim, pool=pool, precision=precision
                )
                records = frames + 4
                size = sum(f.stat().st_size for f in path.glob("*.array_record-*"))
                prepared = sum(f.stat().st_size for f in (data_dir / P.PREPARED).rglob("*") if f.is_file())
                per_frame = size / records
                source, _ = tfds_source.open_tfds(path, "train")
                print(
                    f"| {enc} | {dim} | {precision} | {'2x2' if pool == 2 else 'off'} | {source.num_patches} | {per_frame:,.0f} "
                    f"| {per_frame * FPS * 60 / 1e9:.2f} | {per_frame * FPS * 45 / 1e9:.2f} | {prepared / records * FPS * 60 / 1e9:.2f} |",
                    flush=True,
                )
                shutil.rmtree(data_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("pipeline", "disk"), default=None)
    parser.add_argument("--seconds", type=float, default=10.0, help="measuring time per pipeline row")
    parser.add_argument("--disk_frames", type=int, default=96, help="frames per disk-measurement dataset")
    parser.add_argument("--tmp", default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="bench_data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"# bench_data ({os.cpu_count()} CPUs, scratch {tmp})")
    try:
        if args.only in (None, "disk"):
            bench_disk(tmp, args.disk_frames)
        if args.only in (None, "pipeline"):
            bench_pipeline(tmp, args.seconds)
    finally:
        if args.tmp is None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

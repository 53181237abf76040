"""Frames per second of our Flax DINOv2-reg encoder vs transformers' PyTorch model, same CPU.

Both models get the same random weights (the HF model is saved with
`save_pretrained` into a temporary folder and read back with
`sabr_jax.encoders.dinov2.load`), the same input (N x 280 x 490 pixels by
default), and the same CPU cores: the process is pinned to --threads cores
before either framework starts (XLA sizes its thread pool from the affinity
mask) and `torch.set_num_threads(--threads)`. Each measurement: warm-up calls
(compilation for JAX), then --repeats rounds, each timing one Flax call and
one PyTorch call back to back (so that load from other processes hits both
alike); we report medians. Run it on an otherwise idle machine.

    python benchmarks/bench_dinov2.py --sizes s l --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["s", "l"], choices=["s", "b", "l", "g"])
    parser.add_argument("--batch", type=int, default=4, help="frames per call")
    parser.add_argument("--height", type=int, default=280)
    parser.add_argument("--width", type=int, default=490)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU cores for both frameworks")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--depth", type=int, default=None, help="override the number of blocks (quick runs)")
    parser.add_argument("--no-torch", action="store_true", help="time only our encoder")
    return parser.parse_args(argv)


def pin_threads(threads: int) -> None:
    """Restrict this process to `threads` cores; call before importing jax or torch."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    if threads == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ["OMP_NUM_THREADS"] = str(threads)


def timed(fns, warmup: int, repeats: int) -> list[float]:
    """Median wall time in seconds of each fn(), interleaved; each fn must block until done."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, fn_times in zip(fns, times):
            start = time.perf_counter()
            fn()
            fn_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv=None) -> None:
    args = parse_args(argv)
    pin_threads(args.threads)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sabr_jax.encoders import dinov2

    torch = transformers = None
    if not args.no_torch:
        import torch
        import transformers

        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(args.batch, args.height, args.width, 3)).astype(np.float32)
    rows = []
    for size in args.sizes:
        c = dinov2.CONFIGS[size]
        depth = args.depth or c.depth
        with tempfile.TemporaryDirectory() as folder:
            if torch is not None:
                hf_config = transformers.Dinov2WithRegistersConfig(
                    hidden_size=c.width,
                    num_hidden_layers=depth,
                    num_attention_heads=c.num_heads,
                    mlp_ratio=int(c.mlp_ratio),
                    use_swiglu_ffn=c.ffn == "swiglu",
                    image_size=518,
                    patch_size=14,
                )
                torch.manual_seed(0)
                hf_model = transformers.Dinov2WithRegistersModel(hf_config).eval()
                hf_model.save_pretrained(folder)
                encoder = dinov2.load(folder)
            else:
                import dataclasses

                encoder = dinov2.random_encoder(dataclasses.replace(c, depth=depth))

        x = jnp.asarray(pixels)
        compile_start = time.perf_counter()
        jax.block_until_ready(encoder(x))
        compile_s = time.perf_counter() - compile_start

        def run_ours(encoder=encoder, x=x):
            return jax.block_until_ready(encoder(x))

        theirs = max_diff = float("nan")
        if torch is None:
            (ours,) = timed([run_ours], args.warmup, args.repeats)
        else:
            x_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy())

            def run_torch(hf_model=hf_model, x_t=x_t):
                with torch.inference_mode():
                    return hf_model(pixel_values=x_t).last_hidden_state

            ours, theirs = timed([run_ours, run_torch], args.warmup, args.repeats)
            ref = run_torch().numpy()[:, 1 + c.num_registers :]
            max_diff = float(np.abs(np.asarray(encoder(x)["patch_tokens"]) - ref).max())
            del hf_model
        rows.append((size.upper(), depth, ours, theirs, compile_s, max_diff))
        del encoder

    print(
        f"\nDINOv2-reg encoder, {args.batch} x {args.height}x{args.width} frames per call, "
        f"{args.threads} CPU threads, median of {args.repeats} (after {args.warmup} warm-up)"
    )
    print(f"jax {jax.__version__}" + (f", torch {torch.__version__}" if torch else "") + f", {sys.platform}")
    print("| model | blocks | flax fps | torch fps | flax / torch | flax compile s | max |diff| |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, depth, ours, theirs, compile_s, diff in rows:
        print(
            f"| ViT-{name}/14 | {depth} | {args.batch / ours:.3f} | {args.batch / theirs:.3f} | "
            f"{theirs / ours:.2f}x | {compile_s:.1f} | {diff:.1e} |"
        )


if __name__ == "__main__":
    main()

"""Sampling time of a 45-s clip on this machine: 1100 motion frames plus the config's context
frames, 250 DDPM steps and 50 DDIM steps, batches of 1 and 8 clips; median seconds per clip.

    python benchmarks/bench_sample.py                    # sabr-demo's config, on its prepared tokens' shape
    python benchmarks/bench_sample.py --config configs/demo.py --repeats 5 --json sample.json
    python benchmarks/bench_sample.py --timed_steps 25   # time 25 steps, report 25-step time x steps / 25

The default config is what sabr-demo trains and exports (sabr_jax/config.py:synthclimb_demo). Its
token shape is left to the prepared dataset; --data_dir reads it from one, else --num_patches and
--video_dim fill it (28 and 32: the demo's random-tiny encoder, 4x7 patches after --pool 2). The
parameters and tokens are random: the time does not depend on their values. The video key/value
cache follows the config's sample.kv_cache; 'auto' caches the most blocks whose compiled sampler
fits `--max_gib` (default: 80% of the device's memory, on a CPU of the host's RAM).

FLOPs (matrix multiplies) come from the sampler's own jaxpr (sabr_jax.parallel.flops.jaxpr_flops), traced
for 1 and 2 steps: their difference is one denoising step (the model forward as the sampler calls
it, guidance included), the rest is the once-per-clip set-up (the cached video keys/values). The
fraction of peak is the achieved FLOP/s of the timed runs (set-up included) over the matmul peak
measured in the same run for the compute dtype (the sampler runs on one device). "denoising step"
is one step without the set-up: a 1-step run is timed too, and the step is the difference over the
extra steps; "step, of peak" is its FLOPs over that time.
"""

from __future__ import annotations

import copy
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import harness  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sabr_jax import config as config_lib  # noqa: E402
from sabr_jax.cli.console import run  # noqa: E402
from sabr_jax.data.sources import resolve_shapes  # noqa: E402
from sabr_jax.diffusion.sampling import make_sampler  # noqa: E402
from sabr_jax.model.factory import build_model  # noqa: E402
from sabr_jax.parallel.flops import jaxpr_flops  # noqa: E402

flags.adopt_module_key_flags(harness)  # --help lists --json, --max_gib, --peak_n
_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{config_lib.__file__}:synthclimb_demo", "Config file (default: what sabr-demo trains)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset whose token shape the config takes.")
_NUM_PATCHES = flags.DEFINE_integer("num_patches", 28, "Tokens per frame where the config leaves them unset.")
_VIDEO_DIM = flags.DEFINE_integer("video_dim", 32, "Token width where the config leaves it unset.")
_FRAMES = flags.DEFINE_integer("frames", 1100, "Motion frames of the clip (45 s at 24 FPS is 1080; 1100 as the paper).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Clips sampled at once (one row per batch size and method).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method (after the compile and one warm-up run).")
_TIMED_STEPS = flags.DEFINE_integer(
    "timed_steps", 0, "Time this many steps and scale to the method's steps (0: time every step)."
)

METHODS = (("ddpm", 250), ("ddim", 50))

COLUMNS = (
    ("batch", "batch", "d"),
    ("method", "method", ""),
    ("steps", "steps", "d"),
    ("timed_steps", "timed", "d"),
    ("cached_blocks", "cached blocks", "d"),
    ("compile_s", "plan + compile (s)", ".1f"),
    ("seconds_per_step", "s/step", ".4g"),
    ("seconds_per_clip", "s/clip", ".4g"),
    ("gflop_per_step", "GFLOP/step", ".4g"),
    ("setup_gflop", "set-up GFLOP", ".4g"),
    ("gflop_per_s", "GFLOP/s", ".4g"),
    ("peak_fraction", "of peak", ".2f"),
    ("setup_s", "set-up (s)", ".3g"),
    ("denoise_step_s", "denoising step (s)", ".4g"),
    ("step_peak_fraction", "step, of peak", ".2f"),
)


def clip_batch(cfg, frames: int, batch: int = 1, seed: int = 0) -> dict:
    """`batch` clips: cfg.data.context_frames route images, then `frames` motion frames; random tokens."""
    context = cfg.data.context_frames
    length = context + frames
    video = np.random.default_rng(seed).normal(size=(batch, length, cfg.data.num_patches, cfg.model.video_dim))
    positions = np.broadcast_to(np.arange(length), (batch, length))
    return {
        "video": jnp.asarray(video, jnp.dtype(cfg.model.dtype)),
        "frame_mask": jnp.ones((batch, length), bool),
        "context_mask": jnp.asarray(positions < context),
    }


def step_flops(cfg, graphdef, params, batch, kv_pairs: int) -> tuple[float, float]:
    """-> (FLOPs of one denoising step, FLOPs done once per call) of the sampler caching kv_pairs
    block pairs: its jaxpr traced (not compiled) for 1 and for 2 steps."""
    totals = []
    for steps in (1, 2):
        one = copy.deepcopy(cfg)
        one.sample.update(steps=steps, kv_cache=str(2 * kv_pairs))
        sampler = make_sampler(graphdef, one)
        totals.append(jaxpr_flops(jax.make_jaxpr(sampler.padded)(params, batch, jax.random.PRNGKey(0))))
    per_step = totals[1] - totals[0]
    return per_step, totals[0] - per_step


def time_method(cfg, params, graphdef, batch, method, steps, timed_steps, repeats, memory, peak) -> dict:
    """Plan the key/value cache, compile and time sampling `batch` with `method`; seconds per clip
    (the batch's time, scaled from timed_steps if > 0, over its clips), FLOPs and fraction of peak.

    The denoising step alone: a second sampler of one step is timed too, and the step is the
    difference over the extra steps, (t(n steps) - t(1 step)) / (n - 1), so that the once-per-clip
    set-up (the cached keys/values) is not in it; its fraction of peak is its FLOPs over that time."""
    run_steps = timed_steps or steps
    args = (params, batch, jax.random.PRNGKey(0), None, None)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)

    def timed(n: int, kv_pairs: int | None = None):
        """-> (kv_pairs, compile s, median s of a run of n steps, the runs' s)."""
        cfg.sample.update(method=method, steps=n)
        sampler = make_sampler(graphdef, cfg, memory=memory)
        start = time.perf_counter()
        kv_pairs = sampler.kv_pairs(*args) if kv_pairs is None else kv_pairs  # 'auto' compiles what it measures
        sampler.compile(abstract, kv_pairs)
        compile_s = time.perf_counter() - start
        median, runs = harness.median_seconds(lambda: jax.block_until_ready(sampler.padded(*args)), repeats, 1)
        return kv_pairs, compile_s, median, runs

    kv_pairs, compile_s, per_run, runs = timed(run_steps)
    per_step, setup = step_flops(cfg, graphdef, params, batch, kv_pairs)
    rate = (setup + run_steps * per_step) / per_run
    clips = batch["video"].shape[0]
    row = {
        "batch": clips,
        "method": method,
        "steps": steps,
        "timed_steps": run_steps,
        "compile_s": compile_s,
        "seconds_per_step": per_run / run_steps,
        "seconds_per_clip": per_run * steps / run_steps / clips,
        "runs_s": runs,
        "cached_blocks": 2 * kv_pairs,
        "gflop_per_step": per_step / 1e9,
        "setup_gflop": setup / 1e9,
        "gflop_per_s": rate / 1e9,
        "peak_fraction": rate / peak,
    }
    if run_steps > 1:
        one_step = timed(1, kv_pairs)[2]
        step_s = (per_run - one_step) / (run_steps - 1)
        row.update(denoise_step_s=step_s, setup_s=one_step - step_s, step_peak_fraction=per_step / step_s / peak)
    return row


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    with cfg.unlocked():
        if _DATA_DIR.value:
            cfg.data.update(source="tfds", dir=_DATA_DIR.value)
            resolve_shapes(cfg)
        if cfg.data.num_patches == config_lib.UNSET:
            cfg.data.num_patches = _NUM_PATCHES.value
        if cfg.model.video_dim == config_lib.UNSET:
            cfg.model.video_dim = _VIDEO_DIM.value
        cfg.data.max_frames = cfg.data.context_frames + _FRAMES.value
    batches = harness.int_list(_BATCHES)
    peaks = harness.measure_peaks([cfg.model.dtype])
    memory = harness.memory_budget(harness.MAX_GIB.value)
    graphdef, state = nnx.split(build_model(cfg, cfg.seed))
    params = nnx.to_pure_dict(state)
    rows = []
    for clips in batches:
        batch = clip_batch(cfg, _FRAMES.value, clips)
        for method, steps in METHODS:
            rows.append(
                time_method(
                    cfg,
                    params,
                    graphdef,
                    batch,
                    method,
                    steps,
                    _TIMED_STEPS.value,
                    _REPEATS.value,
                    memory,
                    peaks[cfg.model.dtype],
                )
            )
    head = harness.header(
        cfg, peaks, batch=False, clip=f"{cfg.data.context_frames} context + {_FRAMES.value} motion frames"
    )
    notes = [
        f"medians of {_REPEATS.value} runs after a warm-up run; s/clip = the batch's s/step x steps / clips; "
        "GFLOP/step: one denoising step of the whole batch"
    ]
    harness.report(head, rows, COLUMNS, notes)


if __name__ == "__main__":
    run(main, "bench_sample")

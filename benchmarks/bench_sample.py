"""Sampling time of one 45-s clip on this machine: 1100 motion frames plus the config's context
frames, 250 DDPM steps and 50 DDIM steps, median seconds per clip after one compile.

    python benchmarks/bench_sample.py                    # sabr-demo's config, on its prepared tokens' shape
    python benchmarks/bench_sample.py --config configs/demo.py --repeats 5 --json
    python benchmarks/bench_sample.py --timed_steps 25   # time 25 steps, report 25-step time x steps / 25

The default config is what sabr-demo trains and exports (sabr_jax/config.py:synthclimb_demo). Its
token shape is left to the prepared dataset; --data_dir reads it from one, else --num_patches and
--video_dim fill it (28 and 32: the demo's random-tiny encoder, 4x7 patches after --pool 2). The
parameters and tokens are random: the time does not depend on their values. The video key/value
cache follows the config's sample.kv_cache ('auto' caches every block on a CPU).
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sabr_jax import config as config_lib  # noqa: E402
from sabr_jax.data.sources import resolve_shapes  # noqa: E402
from sabr_jax.sampling import make_sampler  # noqa: E402
from sabr_jax.trainer import build_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", f"{config_lib.__file__}:synthclimb_demo", "Config file (default: what sabr-demo trains)."
)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "A prepared dataset whose token shape the config takes.")
_NUM_PATCHES = flags.DEFINE_integer("num_patches", 28, "Tokens per frame where the config leaves them unset.")
_VIDEO_DIM = flags.DEFINE_integer("video_dim", 32, "Token width where the config leaves it unset.")
_FRAMES = flags.DEFINE_integer("frames", 1100, "Motion frames of the clip (45 s at 24 FPS is 1080; 1100 as the paper).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per method (after the compile and one warm-up run).")
_TIMED_STEPS = flags.DEFINE_integer(
    "timed_steps", 0, "Time this many steps and scale to the method's steps (0: time every step)."
)
_JSON = flags.DEFINE_bool("json", False, "Print the results as JSON instead of a table.")

METHODS = (("ddpm", 250), ("ddim", 50))


def clip_batch(cfg, frames: int, seed: int = 0) -> dict:
    """One clip: cfg.data.context_frames route images, then `frames` motion frames; random tokens."""
    context = cfg.data.context_frames
    length = context + frames
    video = np.random.default_rng(seed).normal(size=(1, length, cfg.data.num_patches, cfg.model.video_dim))
    positions = np.arange(length)[None]
    return {
        "video": jnp.asarray(video, jnp.dtype(cfg.model.dtype)),
        "frame_mask": jnp.ones((1, length), bool),
        "context_mask": jnp.asarray(positions < context),
    }


def time_method(cfg, params, graphdef, batch, method: str, steps: int, timed_steps: int, repeats: int) -> dict:
    """Compile and time sampling one clip with `method`; seconds per clip (scaled from timed_steps if > 0)."""
    run_steps = timed_steps or steps
    cfg.sample.update(method=method, steps=run_steps)
    sampler = make_sampler(graphdef, cfg)
    args = (params, batch, jax.random.PRNGKey(0), None, None)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    kv_pairs = sampler.kv_pairs(*args)
    start = time.perf_counter()
    sampler.compile(abstract, kv_pairs)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        start = time.perf_counter()
        jax.block_until_ready(sampler.padded(*args))
        times.append(time.perf_counter() - start)
    per_run = statistics.median(times[1:])
    return {
        "method": method,
        "steps": steps,
        "timed_steps": run_steps,
        "compile_s": compile_s,
        "seconds_per_step": per_run / run_steps,
        "seconds_per_clip": per_run * steps / run_steps,
        "runs_s": times[1:],
        "cached_blocks": 2 * kv_pairs,
    }


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
    graphdef, state = nnx.split(build_model(cfg, cfg.seed))
    params = nnx.to_pure_dict(state)
    batch = clip_batch(cfg, _FRAMES.value)
    results = [
        time_method(cfg, params, graphdef, batch, method, steps, _TIMED_STEPS.value, _REPEATS.value)
        for method, steps in METHODS
    ]
    m = cfg.model
    report = {
        "device": f"{jax.devices()[0].device_kind} ({jax.device_count()} x {jax.default_backend()}, {os.cpu_count()} cores)",
        "jax": jax.__version__,
        "config": (
            f"layout={m.layout} width={m.width} depth={m.depth} dtype={m.dtype}; {cfg.data.context_frames} context + "
            f"{_FRAMES.value} motion frames x {cfg.data.num_patches} patches x {m.video_dim}"
        ),
        "repeats": _REPEATS.value,
        "results": results,
    }
    if _JSON.value:
        print(json.dumps(report, indent=1))
        return
    print(f"device: {report['device']}; JAX {report['jax']}")
    print(f"config: {report['config']}")
    print(f"{'method':<7}{'steps':>6}{'timed':>7}{'cached blocks':>15}{'compile s':>11}{'s/step':>9}{'s/clip':>9}")
    for r in results:
        print(
            f"{r['method']:<7}{r['steps']:>6}{r['timed_steps']:>7}{r['cached_blocks']:>15}{r['compile_s']:>11.1f}"
            f"{r['seconds_per_step']:>9.3f}{r['seconds_per_clip']:>9.1f}"
        )
    print(f"medians of {_REPEATS.value} runs after a warm-up run; s/clip = s/step x steps when timed < steps")


if __name__ == "__main__":
    app.run(main)

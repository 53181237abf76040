"""Train-step speed of a config on this machine: median step time after compilation, the
examples per second the step consumes, and its matmul FLOP rate.

    python benchmarks/bench_train.py                      # the demo config
    python benchmarks/bench_train.py --config configs/demo.py --config.data.max_frames=96 --steps 30

The batches are prepared before timing (the input pipeline has its own benchmark), so this
measures the jitted, donated, sharded train step alone, on all local devices.
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from sabr_jax import sharding  # noqa: E402
from sabr_jax.data.sources import open_source  # noqa: E402
from sabr_jax.flops import compile_abstract, jaxpr_flops  # noqa: E402
from sabr_jax.loop import process_batches  # noqa: E402
from sabr_jax.trainer import Trainer  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "demo.py"), "Config file."
)
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")


def main(argv) -> None:
    del argv
    cfg = _CONFIG.value
    mesh = sharding.make_mesh(cfg.mesh)
    trainer = Trainer(cfg, mesh)
    source, stats = open_source(cfg)
    it = process_batches(cfg, source, stats, mesh, cfg.seed)
    batches = [jax.device_put(next(it), trainer.batch_sharding) for _ in range(min(_STEPS.value + 2, 8))]
    state = trainer.init_state(cfg.seed)
    t0 = time.perf_counter()
    traced, _, step = compile_abstract(trainer.jit_train_step, state, batches[0], mesh=mesh)
    compile_s = time.perf_counter() - t0
    flops = jaxpr_flops(traced.jaxpr)
    times = []
    for i in range(_STEPS.value + 2):
        t = time.perf_counter()
        state, metrics = step(state, batches[i % len(batches)])
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    timed = times[2:]
    median = statistics.median(timed)
    params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(
        f"config: width={cfg.model.width} depth={cfg.model.depth} frames={cfg.data.max_frames} "
        f"patches={cfg.data.num_patches} batch={cfg.batch_size} dtype={cfg.model.dtype} ({params} parameters)"
    )
    print(
        f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, mesh {dict(mesh.shape)}; compile {compile_s:.1f} s"
    )
    print("| median step (s) | min step (s) | examples/s | steps/s | GFLOP/step | GFLOP/s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {median:.4f} | {min(timed):.4f} | {cfg.batch_size / median:.1f} | {1 / median:.2f} | "
        f"{flops / 1e9:.2f} | {flops / median / 1e9:.1f} |"
    )


if __name__ == "__main__":
    app.run(main)

"""The train step: sharded == single device, grad accumulation, EMA, non-finite steps, FLOPs.

Multi-device checks run in a subprocess with 8 forced host devices (the device count is
fixed when JAX starts); `python tests/test_train_sharded.py equivalence` is that child.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sabr_jax.config import demo_config
from sabr_jax.parallel import sharding
from sabr_jax.training.trainer import Trainer, ema_update

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**mesh):
    cfg = demo_config()
    cfg.batch_size = 8
    cfg.model.update(width=32, heads=4, depth=2, video_dim=16)
    cfg.data.update(max_frames=16, context_frames=4, num_patches=8, num_clips=16, min_clip_frames=8, max_clip_frames=24)
    cfg.optim.update(lr=1e-2, warmup_steps=0)
    cfg.ema_decay = 0.9
    cfg.mesh.update({"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return cfg


def batches(cfg, n):
    from sabr_jax.data.sources import open_source
    from sabr_jax.training.loop import process_batches

    source, stats = open_source(cfg)
    it = process_batches(cfg, source, stats, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), cfg.seed)
    return [next(it) for _ in range(n)]


def run_steps(cfg, devices, data, steps=3):
    """-> (losses, params as numpy) after `steps` steps on a mesh of `devices`."""
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh, devices))
    state = trainer.init_state(cfg.seed)
    losses = []
    with jax.set_mesh(trainer.mesh):
        for batch in data[:steps]:
            batch = jax.device_put(batch, trainer.batch_sharding)
            state, metrics = trainer.jit_train_step(state, batch)
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, jax.device_get(state["params"])), trainer


def _equivalence_child():
    assert jax.device_count() == 8, jax.devices()
    data = batches(tiny_config(), 3)
    one_losses, one_params, _ = run_steps(tiny_config(), jax.devices()[:1], data)
    out = {"one": one_losses}
    for name, cfg in {
        "mesh222": tiny_config(data=2, fsdp=2, tensor=2),
        "mesh222_accum2": tiny_config(data=2, fsdp=2, tensor=2),
    }.items():
        if name.endswith("accum2"):
            cfg.grad_accum = 2
        losses, params, trainer = run_steps(cfg, jax.devices(), data)
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_params)))
        scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(one_params))
        specs = {str(s.spec) for s in jax.tree.leaves(trainer.state_sharding["params"])}
        out[name] = {"losses": losses, "max_param_diff": diff, "param_scale": scale, "specs": sorted(specs)}
    print("RESULT " + json.dumps(out))


def test_sharded_steps_match_one_device():
    """Same 3 steps on 1 device and on 8 devices (data=2, fsdp=2, tensor=2, also with
    grad_accum=2): same losses and parameters within float tolerance.

    Adam divides by the gradient's RMS, so float noise in tiny gradients moves parameters
    by up to ~lr; the tolerance is 0.5% of the largest possible change (lr x steps)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, __file__, "equivalence"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    lr, steps = tiny_config().optim.lr, 3
    for name in ("mesh222", "mesh222_accum2"):
        np.testing.assert_allclose(out[name]["losses"], out["one"], rtol=2e-5, err_msg=name)
        assert out[name]["max_param_diff"] < 5e-3 * lr * steps, (name, out[name])
    # The parameters really are sharded over fsdp and tensor on the 2x2x2 mesh.
    specs = " ".join(out["mesh222"]["specs"])
    assert "'fsdp'" in specs and "'tensor'" in specs, specs


@pytest.mark.slow  # ~45 s; in CI, test_loss_weighting checks accumulation (over unequal micro-batches)
def test_grad_accum_equals_full_batch():
    cfg = tiny_config()
    data = batches(cfg, 2)
    full, full_params, _ = run_steps(cfg, jax.devices()[:1], data, steps=2)
    cfg.grad_accum = 4
    accum, accum_params, _ = run_steps(cfg, jax.devices()[:1], data, steps=2)
    np.testing.assert_allclose(accum, full, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(accum_params), jax.tree.leaves(full_params)):
        np.testing.assert_allclose(a, b, atol=5e-3 * cfg.optim.lr * 2)  # Adam: see the test above


def test_micro_batches_are_strided_rows():
    cfg = tiny_config()
    cfg.grad_accum = 2
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    with jax.set_mesh(trainer.mesh):
        micro = jax.jit(trainer.split_micro)({"x": jnp.arange(8)})["x"]
    np.testing.assert_array_equal(micro, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_ema_matches_hand_computation():
    cfg = tiny_config()
    cfg.ema_decay = 0.75
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    p0 = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    data = batches(cfg, 2)
    state, _ = trainer.jit_train_step(state, data[0])
    p1 = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    ema1 = jax.tree.map(np.asarray, jax.device_get(state["ema"]))
    state, _ = trainer.jit_train_step(state, data[1])
    p2 = jax.tree.map(np.asarray, jax.device_get(state["params"]))
    ema2 = jax.tree.map(np.asarray, jax.device_get(state["ema"]))
    changed = 0
    for a0, a1, a2, e1, e2 in zip(*(jax.tree.leaves(t) for t in (p0, p1, p2, ema1, ema2))):
        hand1 = 0.75 * a0 + 0.25 * a1
        hand2 = 0.75 * hand1 + 0.25 * a2
        np.testing.assert_allclose(e1, hand1, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(e2, hand2, rtol=1e-6, atol=1e-7)
        changed += int(not np.array_equal(a0, a2))
    assert changed > 0
    assert int(state["step"]) == 2
    # ema_update itself, on a scalar
    assert float(ema_update({"w": 2.0}, {"w": 10.0}, 0.9)["w"]) == pytest.approx(0.9 * 2 + 0.1 * 10)


def test_nonfinite_step_changes_nothing_but_step():
    cfg = tiny_config()
    trainer = Trainer(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    before = jax.tree.map(np.asarray, jax.device_get({k: state[k] for k in ("params", "ema", "opt_state")}))
    batch = batches(cfg, 1)[0]
    batch["motion"][0, 5, 3] = np.nan
    state, metrics = trainer.jit_train_step(state, batch)
    assert float(metrics["finite"]) == 0 and float(metrics["loss_finite"]) == 0
    after = jax.device_get({k: state[k] for k in ("params", "ema", "opt_state")})
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)
    assert int(state["step"]) == 1


def test_nonfinite_report_names_the_quantity():
    from sabr_jax.training.loop import nonfinite_report

    names = ["a/kernel", "b/bias"]
    assert nonfinite_report(3, {"finite": 1.0}, names) is None
    loss_msg = nonfinite_report(
        3, {"finite": 0.0, "loss_finite": 0.0, "loss": np.nan, "grad_leaf_finite": [False, False]}, names
    )
    assert "step 3" in loss_msg and "non-finite loss" in loss_msg
    grad_msg = nonfinite_report(
        4, {"finite": 0.0, "loss_finite": 1.0, "loss": 1.5, "grad_leaf_finite": [True, False]}, names
    )
    assert (
        "step 4" in grad_msg
        and "non-finite gradients" in grad_msg
        and "b/bias" in grad_msg
        and "a/kernel" not in grad_msg
    )


def test_jaxpr_flops_counts_scan_trips():
    from sabr_jax.parallel.flops import jaxpr_flops

    x, w = jnp.ones((8, 16)), jnp.ones((5, 16, 16))
    scanned = jax.make_jaxpr(lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0])(x, w)
    assert jaxpr_flops(scanned) == 5 * 2 * 8 * 16 * 16
    grad = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(jax.checkpoint(lambda x: x @ w[0])(x))))(x, w)
    assert jaxpr_flops(grad) >= 2 * 2 * 8 * 16 * 16  # forward (+ recompute) + backward w.r.t. x


def test_matmuls_lists_each_shape_with_its_count():
    """`flops.matmuls`: each distinct dot_general once, counted over scan trips; a cond counts its
    most expensive branch; jaxpr_flops is their total."""
    from sabr_jax.parallel.flops import jaxpr_flops, matmuls

    x, w = jnp.ones((8, 16)), jnp.ones((5, 16, 16))

    def f(x, w):
        y = jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0]
        return jax.lax.cond(y[0, 0] > 0, lambda y: y @ jnp.ones((16, 32)), lambda y: y[:, :4] @ jnp.ones((4, 32)), y)

    counts = matmuls(jax.make_jaxpr(f)(x, w))
    assert {(m.lhs, m.rhs, n) for m, n in counts.items()} == {((8, 16), (16, 16), 5), ((8, 16), (16, 32), 1)}
    assert all(m.dtype == m.out_dtype == "float32" for m in counts)
    assert jaxpr_flops(jax.make_jaxpr(f)(x, w)) == 5 * 2 * 8 * 16 * 16 + 2 * 8 * 16 * 32


if __name__ == "__main__":
    if sys.argv[1:] == ["equivalence"]:
        _equivalence_child()

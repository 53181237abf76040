"""Tensor parallelism by whole heads: every parameter's logical axes have a rule, the fused
projections are sharded by heads, and one compiled train step on 8 forced host devices runs
few collectives per block.

The compile runs in a subprocess (the device count is fixed when JAX starts);
`python tests/test_tensor_parallel.py collectives` is that child.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from util import dit_config

from sabr_jax.model.dit import Block, DiT
from sabr_jax.parallel import sharding
from sabr_jax.training.dry_run import COLLECTIVES, collective_counts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIONS = {"route_frames": 2, "cross_route": True, "route_adaln": True, "patch_grid": (2, 2), "video_norm": True}
MESHES = {"2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "4x1x2": {"data": 4, "fsdp": 1, "tensor": 2}}

# Collectives per block (forward and backward) and per train step, configs/demo.py with depth 4 (two
# block pairs), measured with jax 0.10.2 on CPU: before the head-sharded layout (q/k/v, k/v and
# adaLN kernels [D, n*D] split by output features) and after (the bounds leave a little room).
#   mesh 2x2x2: per block 87.5 -> 26, per step 248 -> 94
#   mesh 4x1x2: per block 48.5 -> 8,  per step 173 -> 22
# 4x1x2 is pure Megatron: per block, forward, one all-reduce after each of the attention, the
# cross-attention and the MLP plus one all-gather of the adaLN modulations; backward the same.
BOUNDS = {"2x2x2": {"per_block": 30, "total": 110}, "4x1x2": {"per_block": 10, "total": 30}}


def abstract_model(layout, **extra):
    cfg = dit_config(layout=layout, width=32, heads=4, depth=2, video_dim=16, **extra)
    return nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))


def test_every_logical_axis_name_has_a_rule():
    for layout, extra in [("slots", {}), ("slots", OPTIONS), ("frame", OPTIONS)]:
        params = nnx.state(abstract_model(layout, **extra), nnx.Param)
        for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
            names = var.get_metadata().get("out_sharding")
            where = (layout, jax.tree_util.keystr(path))
            assert names is not None and len(names) == len(var.shape), (where, names, var.shape)
            assert set(names) <= set(sharding.RULES), (where, set(names) - set(sharding.RULES))


def test_fused_projections_are_sharded_by_whole_heads():
    """q/k/v, k/v and the adaLN modulations each keep their own axis, and the tensor axis
    splits heads (or each modulation's width), never the fused axis."""
    mesh = AbstractMesh((2, 2, 2), sharding.AXES)
    specs = sharding.param_specs(nnx.state(abstract_model("slots", **OPTIONS), nnx.Param), mesh)
    block = specs["blocks"]["spatial"]  # leading axis: the stacked block pairs
    heads = P(None, "fsdp", None, "tensor", None)  # [pairs, D, n, H, Dh]
    assert block["qkv"]["kernel"] == heads and block["cross_kv"]["kernel"] == heads
    assert block["qkv"]["bias"] == P(None, None, "tensor", None)
    assert block["cross_q"]["kernel"] == P(None, "fsdp", "tensor", None)  # [pairs, D, H, Dh]
    assert block["attn_out"]["kernel"] == block["cross_out"]["kernel"] == P(None, "tensor", None, "fsdp")
    assert block["adaLN_modulation"]["linear"]["kernel"] == P(None, "fsdp", None, "tensor")  # [pairs, D, 6, D]
    assert block["mlp"]["fc1"]["kernel"] == P(None, "fsdp", "tensor")
    assert block["mlp"]["fc2"]["kernel"] == P(None, "tensor", "fsdp")
    assert specs["route_embedder"]["kv"]["kernel"] == P("fsdp", None, "tensor", None)


def test_fused_projection_splits_like_the_flat_layout():
    """The [D, 3, H, Dh] kernel is a flat [D, 3D] one reshaped: q, k, v and their heads come
    out in the order of the flat layout's output features (q | k | v, head after head)."""
    block = Block(dit_config(width=32, heads=4, depth=2, video_dim=16, dtype="float32"), "slots", "frame", nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 32)).astype(np.float32)
    flat = np.split(x @ np.asarray(block.qkv.kernel).reshape(32, 96), 3, axis=-1)
    for ours, theirs in zip(block.qkv(x), flat):
        assert ours.shape == (2, 3, 5, 4, 8)
        np.testing.assert_allclose(np.asarray(ours).reshape(2, 3, 5, 32), theirs, rtol=1e-5, atol=1e-5)


def _collectives_child():
    from sabr_jax.config import demo_config
    from sabr_jax.training.dry_run import compile_step

    assert jax.device_count() == 8, jax.devices()
    out = {}
    for name, mesh in MESHES.items():
        cfg = demo_config()
        cfg.model.depth = 4
        cfg.mesh.update(mesh)
        _, compiled, _, _ = compile_step(cfg)
        out[name] = collective_counts(compiled.as_text())
    print("RESULT " + json.dumps(out))


def test_collectives_per_block_with_tensor_parallelism():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run(
        [sys.executable, __file__, "collectives"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("RESULT ", 1)[1])
    for name, counts in out.items():
        per_block = counts["in_loops"] / 2  # the loop bodies: one block pair, forward and backward
        assert per_block <= BOUNDS[name]["per_block"], (name, counts)
        assert counts["total"] <= BOUNDS[name]["total"], (name, counts)
        assert counts["total"] == sum(counts[op] for op in COLLECTIVES)


def test_collective_counts_reads_loops_and_async_ops():
    hlo = """HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(%a, %b)
}

%body (p: (s32[], f32[4])) -> (s32[], f32[4]) {
  %x = f32[4] all-reduce(%y), to_apply=%add
  %g = f32[8] all-gather-start(%x), dimensions={0}
  %d = f32[8] all-gather-done(%g)
  ROOT %t = (s32[], f32[4]) tuple(%i, %x)
}

%cond (p: (s32[], f32[4])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4]) -> f32[4] {
  %w = (s32[], f32[4]) while(%t0), condition=%cond, body=%body
  %r = f32[4] reduce-scatter(%a), dimensions={0}, to_apply=%add
  ROOT %p = f32[4] collective-permute(%r), source_target_pairs={{0,1}}
}
"""
    counts = collective_counts(hlo)
    assert counts == {
        "all-gather": 1,
        "all-reduce": 1,
        "reduce-scatter": 1,
        "all-to-all": 0,
        "collective-permute": 1,
        "total": 4,
        "in_loops": 2,
    }


if __name__ == "__main__":
    if sys.argv[1:] == ["collectives"]:
        _collectives_child()

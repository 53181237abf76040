"""Every attention kernel against one plain softmax reference (CPU).

The splash kernel runs in Pallas interpret mode here; with the `tpu` extra
(libtpu) it is also compiled ahead of time for a v5p topology.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap

# libtpu lets one process at a time load it unless this is set; any other JAX
# process running on this machine would otherwise make the AOT test fail.
# Must be set before libtpu is first loaded (JAX backend initialisation).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P

from sabr_jax.model import attention  # noqa: E402
from sabr_jax.model.attention import dot_product_attention  # noqa: E402


def reference_attention(q, k, v, kv_mask=None):
    """einsum + masked softmax; rows with no key give zeros. Shapes as the API."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    if kv_mask is None:
        kv_mask = jnp.ones(k.shape[:2], bool)
    keep = kv_mask[:, None, None, :]
    scores = jnp.where(keep, scores, -jnp.inf)
    peak = jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.where(keep, jnp.exp(scores - jnp.where(keep, peak, 0.0)), 0.0)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = weights / jnp.where(total > 0, total, 1.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def make_inputs(batch, len_q, len_k, heads, head_dim, masked, seed=0, dtype=jnp.float32):
    """q, k, v and a mask whose rows are: all kept, some masked, none kept, ..."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(batch, len_q, heads, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, len_k, heads, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, len_k, heads, head_dim)), dtype)
    if not masked:
        return q, k, v, None
    mask = rng.random((batch, len_k)) < 0.6
    mask[0] = True
    mask[1 % batch, len_k // 3 :] = False  # padding-like tail
    mask[2 % batch] = False  # no key at all -> zeros
    return q, k, v, jnp.asarray(mask)


def assert_close(actual, expected, atol):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=atol, rtol=0)


# (batch, len_q, len_k, heads, head_dim)
XLA_SHAPES = {"self": (3, 100, 100, 2, 16), "cross": (3, 27, 700, 2, 16)}
SPLASH_SHAPES = {
    "self": (3, 100, 100, 2, 64),  # padded to 128
    "cross": (3, 27, 200, 1, 64),  # q padded to 128, k/v to 256
    "aligned": (3, 128, 128, 2, 64),  # no padding
}


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", XLA_SHAPES.values(), ids=XLA_SHAPES.keys())
def test_xla_matches_reference(shape, masked):
    q, k, v, mask = make_inputs(*shape, masked)
    out = dot_product_attention(q, k, v, mask, implementation="xla")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference_attention(q, k, v, mask), 1e-5)
    if masked:
        assert not np.any(np.asarray(out[2]))  # the row with no key


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("shape", SPLASH_SHAPES.values(), ids=SPLASH_SHAPES.keys())
def test_splash_interpret_matches_reference(shape, masked):
    q, k, v, mask = make_inputs(*shape, masked, seed=1)
    out = dot_product_attention(q, k, v, mask, implementation="splash_interpret")
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference_attention(q, k, v, mask), 1e-5)


def test_cudnn_key_compaction_matches_reference():
    """The cuDNN path's mask handling (keys reordered + lengths), run by XLA."""
    q, k, v, mask = make_inputs(3, 27, 150, 2, 16, masked=True, seed=2)
    out = attention._cudnn_attention(q, k, v, mask, implementation="xla")
    expected = reference_attention(q, k, v, mask)
    assert_close(out[:2], expected[:2], 1e-5)
    assert np.all(np.isfinite(np.asarray(out)))  # the row with no key: finite


@pytest.mark.parametrize("implementation", ["xla", "splash_interpret"])
def test_gradients_match_reference(implementation):
    q, k, v, mask = make_inputs(3, 40, 70, 2, 64, masked=True, seed=3)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * fn(q, k, v, mask))

    ours = jax.grad(loss(lambda *a: dot_product_attention(*a, implementation=implementation)), argnums=(0, 1, 2))(
        q, k, v
    )
    expected = jax.grad(loss(reference_attention), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(ours, expected):
        assert np.all(np.isfinite(np.asarray(g)))
        assert_close(g, g_ref, 2e-5)
    assert not np.any(np.asarray(ours[0][2]))  # no key -> no gradient


def group_inputs(groups, seed):
    """q [3, 20, 2, 16]; k, v [3, 24, groups, 2, 16]; the mask of `make_inputs` (one example with no key)."""
    q, _, _, mask = make_inputs(3, 20, 24, 2, 16, masked=True, seed=seed)
    rng = np.random.default_rng(seed + 100)
    k, v = (jnp.asarray(rng.normal(size=(3, 24, groups, 2, 16)), jnp.float32) for _ in range(2))
    return q, k, v, mask


def reference_group_mean(q, k, v, mask):
    """The mean over groups of the reference attention to each group's keys."""
    return jnp.mean(jnp.stack([reference_attention(q, k[:, :, g], v[:, :, g], mask) for g in range(k.shape[2])]), 0)


@pytest.mark.parametrize("implementation", ["xla", "splash_interpret"])
def test_group_mean_attention_matches_the_mean_of_separate_attentions(implementation):
    """The xla path (one matmul per example and head over all groups' keys) and the per-group path
    of flash kernels both equal the mean of G separate attentions, values and gradients; an
    example with no key gives zeros and passes no gradient."""
    q, k, v, mask = group_inputs(groups=5, seed=5)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)
    ours = lambda q, k, v: attention.group_mean_attention(q, k, v, mask, implementation=implementation)
    out = ours(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, reference_group_mean(q, k, v, mask), 1e-5)
    assert not np.any(np.asarray(out[2]))
    loss = lambda fn: lambda q, k, v: jnp.sum(weights * fn(q, k, v))
    grads = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(lambda q, k, v: reference_group_mean(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, expected):
        assert_close(g, g_ref, 2e-5)
    assert not np.any(np.asarray(grads[0][2]))


def test_group_mean_attention_in_chunks_matches(monkeypatch):
    """With a score budget of 2 groups, the 5 groups go through in 3 chunks (the last padded):
    the same values and gradients as all at once, inside one scan."""
    q, k, v, mask = group_inputs(groups=5, seed=8)
    one_group = 4 * 3 * 2 * 20 * 24  # float32 scores of one group: B H Lq Lk
    monkeypatch.setattr(attention, "_GROUP_CHUNK_BYTES", 2 * one_group)
    ours = lambda q, k, v: attention.group_mean_attention(q, k, v, mask, implementation="xla")
    assert any(e.primitive.name == "scan" for e in jax.make_jaxpr(ours)(q, k, v).jaxpr.eqns)
    assert_close(ours(q, k, v), reference_group_mean(q, k, v, mask), 1e-5)
    loss = lambda fn: lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)
    grads = jax.grad(loss(ours), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(loss(lambda q, k, v: reference_group_mean(q, k, v, mask)), argnums=(0, 1, 2))(q, k, v)
    for g, g_ref in zip(grads, expected):
        assert_close(g, g_ref, 2e-5)


def test_group_mean_attention_chunks_keep_nothing_for_the_backward(monkeypatch):
    """The chunk scan is rematerialised: in the gradient's program the forward scan returns only
    its running sum, no per-chunk scores or key/value slices stacked for the backward pass."""
    q, k, v, mask = group_inputs(groups=5, seed=8)
    monkeypatch.setattr(attention, "_GROUP_CHUNK_BYTES", 2 * 4 * 3 * 2 * 20 * 24)  # 3 chunks of 2 groups
    loss = lambda q, k, v: jnp.sum(attention.group_mean_attention(q, k, v, mask, implementation="xla"))
    scans = [
        e for e in jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr.eqns if e.primitive.name == "scan"
    ]
    assert len(scans) == 2  # forward, backward
    assert [o.aval.shape for o in scans[0].outvars] == [q.shape]


def test_group_chunk_divides_the_groups_when_it_can():
    assert attention._group_chunk(700, 42) == 35  # sabr_s: 20 chunks, no padding
    assert attention._group_chunk(700, 1000) == 700
    assert attention._group_chunk(7, 4) == 4  # 7 is prime: 2 chunks, the last padded
    assert attention._group_chunk(5, 2) == 2  # a divisor of half the budget does not pay
    assert attention._group_chunk(5, 0) == 1


def test_group_mean_attention_longer_keys_run_per_group(monkeypatch):
    """Keys longer than _GROUP_MERGE_MAX_LEN take the per-group path: the same values; its dots
    are batched over examples x groups."""
    q, k, v, mask = group_inputs(groups=5, seed=9)
    monkeypatch.setattr(attention, "_GROUP_MERGE_MAX_LEN", k.shape[1] - 1)
    ours = lambda q, k, v: attention.group_mean_attention(q, k, v, mask, implementation="xla")
    assert_close(ours(q, k, v), reference_group_mean(q, k, v, mask), 1e-5)
    dots = [e for e in jax.make_jaxpr(ours)(q, k, v).jaxpr.eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.outvars[0].aval.shape[0] == 3 * 5 for e in dots)


def test_group_mean_attention_xla_is_two_large_matmuls():
    """On the xla path the products are 2 dot_generals batched over (example, head) only: the
    groups are in the matmuls' rows or contraction, not in their batch."""
    q, k, v, mask = group_inputs(groups=7, seed=7)
    jaxpr = jax.make_jaxpr(lambda *a: attention.group_mean_attention(*a, implementation="xla"))(q, k, v, mask)
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 2
    for dot in dots:
        (_, _), (lhs_batch, _) = dot.params["dimension_numbers"]
        assert len(lhs_batch) == 2  # example and head


def test_default_on_cpu_is_xla_and_keeps_dtype():
    q, k, v, mask = make_inputs(2, 9, 13, 2, 8, masked=True, dtype=jnp.bfloat16)
    out = dot_product_attention(q, k, v, mask)
    assert out.dtype == jnp.bfloat16
    assert_close(
        out.astype(jnp.float32), dot_product_attention(q, k, v, mask, implementation="xla").astype(jnp.float32), 0
    )


@pytest.mark.parametrize(
    "platform, dtype, len_q, len_k, expected",
    [
        ("tpu", jnp.bfloat16, 1100, 1100, "splash"),
        ("tpu", jnp.bfloat16, 27, 700, "xla"),  # mostly padding for splash
        ("gpu", jnp.bfloat16, 27, 700, "cudnn"),
        ("gpu", jnp.float32, 27, 700, "xla"),
        ("cpu", jnp.bfloat16, 1100, 1100, "xla"),
    ],
)
def test_choice_follows_the_ambient_mesh_platform(platform, dtype, len_q, len_k, expected):
    device = jax.sharding.AbstractDevice(device_kind="test", num_cores=None, platform=platform)
    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=device)
    q = jax.ShapeDtypeStruct((1, len_q, 4, 64), dtype)
    k = jax.ShapeDtypeStruct((1, len_k, 4, 64), dtype)
    with jax.sharding.use_abstract_mesh(mesh):
        assert attention._choose_implementation(q, k) == expected


def test_bad_arguments_raise():
    q, k, v, _ = make_inputs(2, 5, 6, 1, 8, masked=False)
    with pytest.raises(ValueError, match="implementation"):
        dot_product_attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="kv_mask"):
        dot_product_attention(q, k, v, jnp.ones((2, 5), bool))
    with pytest.raises(ValueError, match="differ"):
        dot_product_attention(q, k[:1], v[:1])


@pytest.mark.parametrize("axis_type", [jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit])
def test_splash_runs_in_shard_map_under_a_mesh(axis_type):
    """The shard_map path, on a 1-device mesh with the project's axis names."""
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
    q, k, v, mask = make_inputs(3, 27, 130, 2, 64, masked=True, seed=5)
    expected = reference_attention(q, k, v, mask)
    splash = lambda *a: dot_product_attention(*a, implementation="splash_interpret")
    with jax.set_mesh(mesh):
        assert_close(jax.jit(splash)(q, k, v, mask), expected, 1e-5)
        # Inside a caller's shard_map over part of the mesh.
        inputs = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, mask)]
        nested = jax.shard_map(splash, in_specs=P("data"), out_specs=P("data"), axis_names={"data"}, check_vma=False)
        assert_close(jax.jit(nested)(*inputs), expected, 1e-5)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sabr_jax.model.attention import dot_product_attention
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"))
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(4, 100, 2, 64)).astype(np.float32) for _ in range(3))
    mask = rng.random((4, 100)) < 0.5
    mask[3] = False
    row = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, row) for x in (q, k, v))
    mask = jax.device_put(mask, NamedSharding(mesh, P(("data", "fsdp"), None)))
    run = lambda impl: jax.jit(lambda *a: dot_product_attention(*a, implementation=impl))
    with jax.set_mesh(mesh):
        splash = run("splash_interpret")(q, k, v, mask)
        text = jax.jit(lambda *a: dot_product_attention(*a, implementation="splash_interpret")
                       ).lower(q, k, v, mask).as_text()
    xla = run("xla")(q, k, v, mask)
    assert "shard_map" in text or "sdy.manual_computation" in text, text[:2000]
    print("MAXDIFF", float(jnp.max(jnp.abs(splash - xla))))
""")


def test_splash_sharded_over_four_cpu_devices():
    """Batch over ('data', 'fsdp') and heads over 'tensor', numbers unchanged."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4")
    result = subprocess.run(
        [sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    max_diff = float(result.stdout.split("MAXDIFF")[1])
    assert max_diff < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (pip install 'sabr_jax[tpu]')")
def test_splash_compiles_ahead_of_time_for_v5p():
    from jax.experimental import topologies

    try:  # jax 0.10: get_topology_desc(topology_name, platform)
        topology = topologies.get_topology_desc("v5p:2x2x1", "tpu")
    except jax.errors.JaxRuntimeError as error:
        if "lockfile" in str(error):  # another process holds libtpu
            pytest.skip(f"libtpu busy: {error}")
        raise
    devices = np.array(topology.devices).reshape(2, 1, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    batch, length, heads, head_dim = 4, 300, 4, 64
    rows = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    x = jax.ShapeDtypeStruct((batch, length, heads, head_dim), jnp.bfloat16, sharding=rows)
    mask = jax.ShapeDtypeStruct((batch, length), jnp.bool_, sharding=NamedSharding(mesh, P(("data", "fsdp"), None)))

    def loss(q, k, v, kv_mask):
        out = dot_product_attention(q, k, v, kv_mask, implementation="splash")
        return jnp.sum(out.astype(jnp.float32))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    with jax.set_mesh(mesh):
        compiled = step.lower(x, x, x, mask).compile()
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == 3  # fwd, dq, dkv
    # Each device runs its shard: 2 examples x 2 heads, length padded to 384.
    assert "bf16[2,2,384,64]" in hlo

import jax.numpy as jnp
import numpy as np
import pytest

from sabr_jax import motion as M


def random_rotations(n, seed=0):
    rng = np.random.default_rng(seed)
    aa = rng.normal(size=(n, 3))
    aa *= rng.uniform(0, np.pi, (n, 1)) / np.linalg.norm(aa, axis=-1, keepdims=True)
    aa[:4] = [[0, 0, 0], [np.pi - 1e-7, 0, 0], [0, 1e-9, 0], [0, 0, -np.pi + 1e-6]]
    return aa


def test_layout():
    assert M.MOTION_DIM == 161 and M.NUM_SLOTS == 27
    assert [w for _, w in M.SLOTS][:2] == [4, 3] and M.SLOTS[-1] == ("betas", 10)
    assert (M.BBOX.stop, M.CAMERA.stop, M.ROTATIONS.stop, M.BETAS.stop) == (4, 7, 151, 161)


@pytest.mark.parametrize("xp", [np, jnp])
def test_pack_unpack_are_inverses(xp):
    x = xp.asarray(np.random.default_rng(1).normal(size=(2, 5, 161)).astype(np.float32))
    slots = M.pack(x)
    assert slots.shape == (2, 5, 27, 10)
    np.testing.assert_array_equal(M.unpack(slots), x)
    assert float(jnp.abs(jnp.where(M.SLOT_VALID, 0.0, slots)).max()) == 0.0  # pads are zero
    np.testing.assert_array_equal(M.pack(M.unpack(slots)), slots)
    # slot 2 is joint 0, i.e. values 7..12
    np.testing.assert_array_equal(slots[..., 2, :6], x[..., 7:13])


@pytest.mark.parametrize("xp", [np, jnp])
def test_rotation_round_trips(xp):
    aa = random_rotations(500)
    rot = M.axis_angle_to_matrix(xp.asarray(aa))
    np.testing.assert_allclose(np.einsum("nij,nkj->nik", rot, rot), np.broadcast_to(np.eye(3), (500, 3, 3)), atol=1e-6)
    np.testing.assert_allclose(np.linalg.det(np.asarray(rot)), 1.0, atol=1e-6)
    np.testing.assert_allclose(M.matrix_to_axis_angle(rot), aa, atol=1e-5)
    np.testing.assert_allclose(M.rot6d_to_matrix(M.matrix_to_rot6d(rot)), rot, atol=1e-6)


def test_rot6d_column_major_and_gram_schmidt():
    rot = M.axis_angle_to_matrix(random_rotations(10, seed=3))
    r6 = M.matrix_to_rot6d(rot)
    np.testing.assert_array_equal(r6[:, :3], rot[:, :, 0])
    np.testing.assert_array_equal(r6[:, 3:], rot[:, :, 1])
    # a scaled, skewed 6D vector maps back to the same rotation
    skewed = np.concatenate([3.0 * r6[:, :3], 0.5 * r6[:, 3:] + 0.2 * r6[:, :3]], axis=1)
    np.testing.assert_allclose(M.rot6d_to_matrix(skewed), rot, atol=1e-6)


def test_axis_angle_known_value():
    rot = M.axis_angle_to_matrix(np.array([0.0, 0.0, np.pi / 2]))
    np.testing.assert_allclose(rot, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)


def test_norm_stats():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(4, 50, 161)).astype(np.float32)
    x[..., 160] = 1.0  # a constant feature
    mask = np.ones((4, 50), bool)
    mask[:, 40:] = False
    x[~mask] = 1e6  # masked frames must not count
    stats = M.NormStats.from_data(x, mask)
    np.testing.assert_allclose(stats.mean[:160], x[mask][:, :160].mean(0), rtol=1e-5)
    assert stats.std[160] == pytest.approx(1e-3)
    y = stats.normalize(x[mask])
    np.testing.assert_allclose(y[:, :160].mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(stats.denormalize(y), x[mask], rtol=1e-5, atol=1e-5)
    again = M.NormStats.from_dict(stats.to_dict())
    np.testing.assert_array_equal(again.mean, stats.mean)
    with pytest.raises(ValueError, match="shape"):
        M.NormStats.from_dict({"mean": [0.0], "std": [1.0]})

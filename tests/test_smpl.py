"""SMPL: parity with smplx on a synthetic file of the real layout, the .pkl reader, refusals, errors, the fallback."""

import os
import pickle
import struct
import sys
import types

import jax
import numpy as np
import pytest

from sabr_jax import motion as M
from sabr_jax.body import skeleton, smpl
from sabr_jax.errors import UserError

V, F = 6890, 13776
FILE_BETAS = 16  # more shape components in the file than the 10 used


@pytest.fixture(scope="module")
def arrays():
    """A model of SMPL's layout with random values (float32-exact, so float64 smplx sees the same numbers)."""
    rng = np.random.default_rng(0)
    j = skeleton.NUM_JOINTS
    regressor = np.zeros((j, V))
    for row in regressor:
        idx = rng.choice(V, 30, replace=False)
        row[idx] = rng.uniform(0.1, 1.0, 30)
    weights = np.zeros((V, j))
    for v, idx in enumerate(rng.integers(0, j, (V, 4))):
        weights[v, idx] = rng.uniform(0.1, 1.0, 4)
    kintree = np.stack([np.array(skeleton.PARENTS), np.arange(j)])
    kintree[0, 0] = 4294967295  # as in the official files
    return {
        "v_template": rng.normal(0.0, 0.3, (V, 3)).astype(np.float32),
        "shapedirs": rng.normal(0.0, 0.01, (V, 3, FILE_BETAS)).astype(np.float32),
        "posedirs": rng.normal(0.0, 0.01, (V, 3, 207)).astype(np.float32),
        "J_regressor": (regressor / regressor.sum(1, keepdims=True)).astype(np.float32),
        "weights": (weights / weights.sum(1, keepdims=True)).astype(np.float32),
        "kintree_table": kintree,
        "f": rng.integers(0, V, (F, 3)).astype(np.uint32),
    }


@pytest.fixture(scope="module")
def npz_path(arrays, tmp_path_factory):
    path = tmp_path_factory.mktemp("smpl") / "SMPL_NEUTRAL.npz"
    np.savez(path, **arrays)
    return path


def random_inputs(n, seed=1):
    rng = np.random.default_rng(seed)
    axis = rng.normal(size=(n, 24, 3))
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    rotations = M.axis_angle_to_matrix(axis * rng.uniform(0.0, 1.2, (n, 24, 1)))
    return rng.normal(0.0, 1.5, (n, 10)), rotations


def test_matches_smplx(npz_path):
    torch = pytest.importorskip("torch")
    smplx = pytest.importorskip("smplx")
    from smplx.utils import Struct

    with np.load(npz_path) as npz:
        reference = smplx.SMPL(model_path=str(npz_path), data_struct=Struct(**npz), num_betas=10, dtype=torch.float64)
    model = smpl.load(npz_path)
    assert model.num_betas == 10 and model.faces.dtype == np.int32 and model.faces.shape == (F, 3)
    betas, rotations = random_inputs(5)
    out = model(betas, rotations)
    t = lambda x: torch.as_tensor(x, dtype=torch.float64)
    with torch.no_grad():
        ref = reference(
            betas=t(betas), global_orient=t(rotations[:, :1]), body_pose=t(rotations[:, 1:]), pose2rot=False
        )
        rest = reference(betas=t(betas), global_orient=t(np.eye(3)[None, None].repeat(5, 0)), pose2rot=False,
                         body_pose=t(np.eye(3)[None, None].repeat(5, 0).repeat(23, 1)))  # fmt: skip
    assert out["vertices"].shape == (5, V, 3) and out["joints"].shape == (5, 24, 3)
    np.testing.assert_allclose(out["vertices"], ref.vertices.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["joints"], ref.joints[:, :24].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.rest_joints(betas), rest.joints[:, :24].numpy(), atol=1e-5, rtol=0)
    jitted = jax.jit(lambda body, b, r: body(b, r)["joints"])  # the model is a pytree
    np.testing.assert_allclose(jitted(model, betas, rotations), out["joints"], atol=1e-6)
    # fewer betas use the first components: the same as zeros in the others
    np.testing.assert_allclose(
        model(betas[:, :4], rotations)["vertices"],
        model(np.concatenate([betas[:, :4], np.zeros((5, 6))], 1), rotations)["vertices"],
        atol=1e-6,
    )


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's str (BINSTRING), as the official files (Python 2, protocol 2) hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def write_original_pkl(arrays, path, monkeypatch, protocol):
    """The arrays as in the official .pkl: chumpy Ch objects, a scipy csc J_regressor, extra keys."""
    sparse = pytest.importorskip("scipy.sparse")
    module = types.ModuleType("chumpy.ch")

    class Ch:  # what chumpy's Ch pickles as: its __dict__ minus the caches
        def __init__(self, x):
            self.x, self._dirty_vars, self._itr, self._depends_on_deps = x, {"x"}, None, {}

    Ch.__module__, Ch.__qualname__, module.Ch = "chumpy.ch", "Ch", Ch
    monkeypatch.setitem(sys.modules, "chumpy", types.ModuleType("chumpy"))
    monkeypatch.setitem(sys.modules, "chumpy.ch", module)
    data = dict(arrays, shapedirs=Ch(arrays["shapedirs"].astype(np.float64)), v_template=Ch(arrays["v_template"]))
    data |= {"J_regressor": sparse.csc_matrix(arrays["J_regressor"]), "bs_style": "lbs", "bs_type": "lrotmin"}
    data |= {"J": np.zeros((24, 3)), "vert_sym_idxs": np.arange(V), "pose_training_info": {"lambda": 1.0}}
    with open(path, "wb") as f:
        (Py2Pickler(f, protocol) if protocol == 2 else pickle.Pickler(f, protocol)).dump(data)


@pytest.mark.parametrize("protocol", [2, 0])
def test_original_pkl_loads_like_npz(arrays, npz_path, tmp_path, monkeypatch, protocol):
    write_original_pkl(arrays, tmp_path / "basicModel_neutral.pkl", monkeypatch, protocol)
    monkeypatch.delitem(sys.modules, "chumpy.ch")  # the reader must not need the classes
    from_pkl, from_npz = smpl.load(tmp_path / "basicModel_neutral.pkl"), smpl.load(npz_path)
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "faces"):
        np.testing.assert_array_equal(getattr(from_pkl, key), getattr(from_npz, key), err_msg=key)
    assert from_pkl.parents == skeleton.PARENTS


class Exploit:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_pickle_naming_other_classes_is_refused_unrun(tmp_path, protocol):
    sentinel = tmp_path / "PWNED"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"v_template": Exploit(sentinel)}, f, protocol)
    with pytest.raises(smpl.ModelFileError, match=r"evil.pkl: unsafe or invalid pickle: refusing to load posix.system"):
        smpl.load(tmp_path / "evil.pkl")
    assert not sentinel.exists()


def test_wrong_files_raise_one_line_user_errors(arrays, tmp_path):
    def error(path, **changes):
        np.savez(path, **{k: v for k, v in (arrays | changes).items() if v is not None})
        with pytest.raises(UserError) as info:
            smpl.load(path)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert error(tmp_path / "a.npz", weights=None).startswith(f"{tmp_path / 'a.npz'}: missing key 'weights'")
    assert "'posedirs' has shape (6890, 3, 200), expected (6890, 3, 207)" in error(
        tmp_path / "b.npz", posedirs=arrays["posedirs"][..., :200]
    )
    assert "'shapedirs' has 8 shape components, expected >= 10" in error(
        tmp_path / "c.npz", shapedirs=arrays["shapedirs"][..., :8]
    )
    assert "'kintree_table' row 0" in error(tmp_path / "d.npz", kintree_table=np.zeros((2, 24), int))
    assert "'J_regressor' has non-finite values" in error(
        tmp_path / "e.npz", J_regressor=arrays["J_regressor"] * np.nan
    )
    with pytest.raises(smpl.ModelFileError, match="nothere.pkl: no such SMPL model file"):
        smpl.load(tmp_path / "nothere.pkl")
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(smpl.ModelFileError, match="list.pkl: expected a dict of arrays"):
        smpl.load(tmp_path / "list.pkl")


def test_builtin_skeleton_fallback():
    body = smpl.load_or_builtin(None)
    assert "no SMPL file given: drawing the built-in 24-joint skeleton" in body.description
    betas, rotations = random_inputs(3)
    out = body(betas, rotations)
    assert set(out) == {"joints"} and body.faces is None and body.parents == skeleton.PARENTS
    np.testing.assert_allclose(out["joints"], skeleton.forward_kinematics(rotations), atol=1e-6)
    np.testing.assert_array_equal(body.rest_joints(betas)[2], skeleton.REST_JOINTS)
    with pytest.raises(ValueError, match="rotations have shape"):
        body(betas, rotations[:, :23])

"""The SMPL body model in JAX: loads the licensed model files and poses them exactly as `smplx` does.

    model = smpl.load("SMPL_NEUTRAL.pkl")               # or .npz; the male and female files too
    out = model(betas, rotations)                        # betas [N, B], rotations [N, 24, 3, 3]
    out["vertices"]  [N, V, 3],  out["joints"]  [N, 24, 3]   metres, float32

`rotations` are local joint rotation matrices in SMPL's joint order (sabr_jax.body.skeleton;
index 0 = global orient). No translation is applied: joint 0 stays at its rest position.
B <= model.num_betas: the first B shape components are used.

Model file (the same layout for the neutral, male and female files; V vertices, 24 joints):

    v_template     [V, 3]        rest mesh, metres
    shapedirs      [V, 3, S]     shape blend shapes, S >= num_betas (SMPL 10, the 300-component files 300)
    posedirs       [V, 3, 207]   pose blend shapes, driven by (R - I) of joints 1..23
    J_regressor    [24, V]       joints from vertices (dense, or a scipy sparse matrix in the .pkl)
    weights        [V, 24]       skinning weights
    kintree_table  [2, 24]       row 0: each joint's parent (the root's entry is ignored)
    f              [F, 3]        triangles (vertex indices)

Other keys (J, bs_style, bs_type, vert_sym_idxs, ...) are ignored. `.npz` files load with
numpy (no pickles inside). The original `.pkl` files are Python 2 pickles holding chumpy
arrays (`chumpy.ch.Ch`, whose array is the `x` of its pickled state) and a scipy sparse
J_regressor (csc: `data`, `indices`, `indptr`, `_shape`): sabr_jax.safe_pickle reads them
into stand-ins without importing chumpy or scipy's classes, refusing every other class, and
they are converted to numpy here. A file that cannot be used raises `ModelFileError` (a
`sabr_jax.errors.UserError`) naming the file and the key.

The forward pass is smplx's `lbs` with pose2rot=False: shape blend shapes, joint regression
on the shaped rest mesh, pose blend shapes, the kinematic chain, linear blend skinning.
Without a model file, `builtin()` poses sabr_jax.body.skeleton's 24 joints with the same call.
"""

from __future__ import annotations

import dataclasses
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from scipy import sparse

from sabr_jax import motion, safe_pickle
from sabr_jax.body import skeleton
from sabr_jax.errors import UserError

_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 on accelerators too (their default may be TF32 or bf16)
NUM_POSE_BASIS = 9 * (skeleton.NUM_JOINTS - 1)  # 207
KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")


class ModelFileError(UserError):
    """An SMPL model file that cannot be read or has the wrong layout; the message names the file and key."""


# ---------------------------------------------------------------- reading the file
_CHUMPY = ("chumpy.ch", "Ch")
_SPARSE = {
    (module, f"{fmt}_{kind}")
    for fmt in ("csc", "csr")
    for kind in ("matrix", "array")
    for module in ("scipy.sparse", f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}")
}


class _Unpickler(safe_pickle.Unpickler):
    stand_ins = safe_pickle.stand_ins({_CHUMPY, *_SPARSE})
    admits = "numpy arrays, plain Python values, chumpy.ch.Ch and scipy csc/csr matrices"


def _read(path: str) -> dict:
    """{key: value} of an .npz or a (Python 2 or 3) pickle; values may still be stand-ins."""
    if not os.path.isfile(path):
        raise ModelFileError(f"{path}: no such SMPL model file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                return {key: npz[key] for key in npz.files}
        with open(path, "rb") as f:
            data = _Unpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: unsafe or invalid pickle: {e}") from None
    except Exception as e:  # EOFError, zipfile.BadZipFile, ValueError, ...
        raise ModelFileError(f"{path}: cannot read an SMPL model ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a dict of arrays ({', '.join(KEYS)}), got {type(data).__name__}")
    return data


def _to_numpy(value, path: str, key: str) -> np.ndarray:
    """A file value as a numpy array: chumpy arrays by their `x`, sparse matrices made dense."""
    if isinstance(value, safe_pickle.StandIn):
        state = value.state if isinstance(value.state, dict) else {}
        module, name = value.pickled_as
        try:
            if (module, name) == _CHUMPY:
                value = state["x"]
            else:
                matrix = getattr(sparse, name)
                shape = state["_shape"] if "_shape" in state else state["shape"]
                value = matrix((state["data"], state["indices"], state["indptr"]), shape=shape).toarray()
        except Exception as e:
            raise ModelFileError(f"{path}: '{key}' is a {module}.{name} that cannot be rebuilt ({e!r})") from None
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ModelFileError(f"{path}: '{key}' is not a numeric array (got {type(value).__name__})")
    return array


def _get(data: dict, path: str, key: str, shape: tuple) -> np.ndarray:
    """data[key] as numpy, checked against `shape` (ints; None: any size) and for NaN or inf."""
    if key not in data:
        raise ModelFileError(f"{path}: missing key '{key}' (an SMPL model file holds {', '.join(KEYS)})")
    array = _to_numpy(data[key], path, key)
    if array.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, array.shape)):
        expected = "(" + ", ".join("N" if n is None else str(n) for n in shape) + ")"
        raise ModelFileError(f"{path}: '{key}' has shape {array.shape}, expected {expected}")
    if not np.isfinite(array).all():
        raise ModelFileError(f"{path}: '{key}' has non-finite values (NaN or inf)")
    return array


# ---------------------------------------------------------------- the model
@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SMPL:
    """An SMPL model's arrays (jnp, float32; faces int32), in smplx's layout. Call it to pose it."""

    v_template: jax.Array  # [V, 3] metres
    shapedirs: jax.Array  # [V, 3, num_betas]
    posedirs: jax.Array  # [207, V * 3] (the file's [V, 3, 207], reshaped as smplx does)
    J_regressor: jax.Array  # [24, V]
    weights: jax.Array  # [V, 24]
    faces: jax.Array  # [F, 3] int32
    description: str = dataclasses.field(metadata={"static": True})  # e.g. for the CLI to print
    parents: tuple[int, ...] = dataclasses.field(default=skeleton.PARENTS, metadata={"static": True})

    @property
    def num_betas(self) -> int:
        return self.shapedirs.shape[-1]

    def rest_joints(self, betas) -> jax.Array:
        """betas [N, B] -> the shaped body's rest joints [N, 24, 3] metres (e.g. BVH rest offsets)."""
        return _rest_joints(self, _betas(betas, self.num_betas))

    def __call__(self, betas, rotations) -> dict[str, jax.Array]:
        """betas [N, B], rotations [N, 24, 3, 3] -> {"vertices": [N, V, 3], "joints": [N, 24, 3]} metres.

        Peak memory is about 24 floats per vertex and frame (~100 bytes * N * V): pose long clips in chunks.
        """
        betas = _betas(betas, self.num_betas)
        return _posed(self, betas, _rotations(rotations, len(betas)))


def _betas(betas, num_betas: int) -> jax.Array:
    betas = jnp.asarray(betas, jnp.float32)
    if betas.ndim != 2 or betas.shape[1] > num_betas:
        raise ValueError(f"betas have shape {betas.shape}, expected [N, B] with B <= {num_betas}")
    return betas


def _rotations(rotations, n: int) -> jax.Array:
    rotations = jnp.asarray(rotations, jnp.float32)
    if rotations.shape != (n, skeleton.NUM_JOINTS, 3, 3):
        raise ValueError(f"rotations have shape {rotations.shape}, expected ({n}, {skeleton.NUM_JOINTS}, 3, 3)")
    return rotations


def _shaped(model: SMPL, betas: jax.Array) -> jax.Array:
    """[N, V, 3]: the template plus the first B shape blend shapes."""
    shapedirs = model.shapedirs[..., : betas.shape[1]]
    return model.v_template + jnp.einsum("nb,vcb->nvc", betas, shapedirs, precision=_HIGHEST)


def _regress(model: SMPL, vertices: jax.Array) -> jax.Array:
    return jnp.einsum("jv,nvc->njc", model.J_regressor, vertices, precision=_HIGHEST)


@jax.jit
def _rest_joints(model: SMPL, betas: jax.Array) -> jax.Array:
    return _regress(model, _shaped(model, betas))


def _kinematic_chain(rotations: jax.Array, rest: jax.Array, parents: tuple[int, ...]) -> jax.Array:
    """[N, 24, 4, 4] world transforms: joint k's is its parent's times [rotations[k] | rest[k] - rest[parent]]."""
    offsets = rest - jnp.concatenate([jnp.zeros_like(rest[:, :1]), rest[:, list(parents[1:])]], axis=1)
    local = jnp.concatenate([rotations, offsets[..., None]], axis=-1)  # [N, 24, 3, 4]
    bottom = jnp.broadcast_to(jnp.array([0.0, 0.0, 0.0, 1.0], rest.dtype), local.shape[:-2] + (1, 4))
    local = jnp.concatenate([local, bottom], axis=-2)
    world = [local[:, 0]]
    for k in range(1, len(parents)):
        world.append(jnp.matmul(world[parents[k]], local[:, k], precision=_HIGHEST))
    return jnp.stack(world, axis=1)


@jax.jit
def _posed(model: SMPL, betas: jax.Array, rotations: jax.Array) -> dict[str, jax.Array]:
    n = rotations.shape[0]
    shaped = _shaped(model, betas)
    rest = _regress(model, shaped)  # [N, 24, 3]
    pose_feature = (rotations[:, 1:] - jnp.eye(3, dtype=rotations.dtype)).reshape(n, NUM_POSE_BASIS)
    posed = shaped + jnp.matmul(pose_feature, model.posedirs, precision=_HIGHEST).reshape(n, -1, 3)
    world = _kinematic_chain(rotations, rest, model.parents)
    world_rot, joints = world[..., :3, :3], world[..., :3, 3]
    # skinning: vertex x moves with joint k as world_rot[k] @ (x - rest[k]) + joints[k], blended by weights
    shift = joints - jnp.einsum("nkij,nkj->nki", world_rot, rest, precision=_HIGHEST)
    blended_rot = jnp.einsum("vk,nkij->nvij", model.weights, world_rot, precision=_HIGHEST)
    blended_shift = jnp.einsum("vk,nki->nvi", model.weights, shift, precision=_HIGHEST)
    vertices = jnp.einsum("nvij,nvj->nvi", blended_rot, posed, precision=_HIGHEST) + blended_shift
    return {"vertices": vertices, "joints": joints}


def load(path: str | os.PathLike, num_betas: int = motion.NUM_BETAS) -> SMPL:
    """The SMPL model in an .npz or original .pkl file, keeping its first `num_betas` shape components.

    Raises ModelFileError (one line naming the file and key) for a missing, unreadable,
    unsafe or wrongly laid out file.
    """
    path = os.fspath(path)
    data = _read(path)
    v_template = _get(data, path, "v_template", (None, 3))
    v, j = len(v_template), skeleton.NUM_JOINTS
    shapedirs = _get(data, path, "shapedirs", (v, 3, None))
    if shapedirs.shape[2] < num_betas:
        raise ModelFileError(f"{path}: 'shapedirs' has {shapedirs.shape[2]} shape components, expected >= {num_betas}")
    posedirs = _get(data, path, "posedirs", (v, 3, NUM_POSE_BASIS))
    regressor = _get(data, path, "J_regressor", (j, v))
    weights = _get(data, path, "weights", (v, j))
    parents = (-1, *(int(p) for p in _get(data, path, "kintree_table", (2, j))[0, 1:]))
    if parents != skeleton.PARENTS:
        raise ModelFileError(
            f"{path}: 'kintree_table' row 0 is {list(parents)}, expected SMPL's {list(skeleton.PARENTS)}"
        )
    faces = _get(data, path, "f", (None, 3))
    if faces.dtype.kind == "f" or faces.min(initial=0) < 0 or faces.max(initial=0) >= v:
        raise ModelFileError(f"{path}: 'f' must hold integer vertex indices in [0, {v})")
    return SMPL(
        v_template=jnp.asarray(v_template, jnp.float32),
        shapedirs=jnp.asarray(shapedirs[..., :num_betas], jnp.float32),
        posedirs=jnp.asarray(posedirs.reshape(-1, NUM_POSE_BASIS).T, jnp.float32),
        J_regressor=jnp.asarray(regressor, jnp.float32),
        weights=jnp.asarray(weights, jnp.float32),
        faces=jnp.asarray(faces, jnp.int32),
        description=f"SMPL model {path}: {v} vertices, {len(faces)} faces, {num_betas} shape components",
    )


# ---------------------------------------------------------------- without a model file
BUILTIN_DESCRIPTION = (
    "no SMPL file given: drawing the built-in 24-joint skeleton (sabr_jax.body.skeleton; betas ignored)"
)


@dataclasses.dataclass(frozen=True)
class Skeleton:
    """sabr_jax.body.skeleton's 24 joints with SMPL's call signature; no mesh (`faces` None), betas are ignored."""

    description: str = BUILTIN_DESCRIPTION
    parents: tuple[int, ...] = skeleton.PARENTS
    num_betas: int = motion.NUM_BETAS
    faces: None = None

    def rest_joints(self, betas) -> jax.Array:
        """betas [N, B] -> [N, 24, 3] metres: skeleton.REST_JOINTS for every frame."""
        n = len(_betas(betas, self.num_betas))
        return jnp.broadcast_to(jnp.asarray(skeleton.REST_JOINTS), (n, skeleton.NUM_JOINTS, 3))

    def __call__(self, betas, rotations) -> dict[str, jax.Array]:
        """betas [N, B], rotations [N, 24, 3, 3] -> {"joints": [N, 24, 3]} metres (no "vertices")."""
        rotations = _rotations(rotations, len(_betas(betas, self.num_betas)))
        return {"joints": _skeleton_joints(rotations)}


_skeleton_joints = jax.jit(skeleton.forward_kinematics)


def builtin() -> Skeleton:
    return Skeleton()


def load_or_builtin(path: str | os.PathLike | None, num_betas: int = motion.NUM_BETAS) -> SMPL | Skeleton:
    """`load(path)`, or without a path the built-in skeleton; logs (INFO) the `description` of what it returns."""
    body = load(path, num_betas) if path else builtin()
    logging.info("%s", body.description)
    return body

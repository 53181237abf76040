"""sabr_jax.body.gltf: the .glb read back (our own small reader of node TRS, animation and skin)
gives the skeleton's forward kinematics and SMPL's skinned mesh, placed as the BVH; the Khronos
glTF validator (npm `gltf-validator`, where node and npm are installed) reports no errors."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pygltflib
import pytest
from scipy.spatial.transform import Rotation

from sabr_jax import motion as M
from sabr_jax.body import bvh, gltf, skeleton, smpl
from sabr_jax.sample import outputs

FPS = 24
HW = (64, 96)  # (H, W) pixels
FOCAL = 3828.0
VALIDATOR = "2.0.0-dev.3.10"
_DTYPES = {5126: np.float32, 5123: np.uint16, 5125: np.uint32}
_SIZES = {"SCALAR": 1, "VEC3": 3, "VEC4": 4, "MAT4": 16}


# ---------------------------------------------------------------- a small glTF reader
def accessor(doc, blob, index):
    """Accessor `index` as a numpy array [count, components] (MAT4: [count, 4, 4], row-major)."""
    acc = doc.accessors[index]
    view = doc.bufferViews[acc.bufferView]
    assert view.byteStride is None  # tightly packed, as gltf.write stores them
    size = _SIZES[acc.type]
    start = view.byteOffset + (acc.byteOffset or 0)
    data = np.frombuffer(blob, _DTYPES[acc.componentType], acc.count * size, start).reshape(acc.count, size)
    return data.reshape(-1, 4, 4).transpose(0, 2, 1) if acc.type == "MAT4" else data  # glTF: column-major


def quat_matrix(q):
    """Unit quaternion (x, y, z, w) -> 3x3 rotation matrix (the glTF spec's formula)."""
    x, y, z, w = q
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])  # fmt: skip


def sample(times, values, t, path):
    """The LINEAR sampler's value at time t: lerp, or slerp for rotations; clamped at the ends."""
    i = int(np.clip(np.searchsorted(times, t, side="right") - 1, 0, len(times) - 1))
    if i == len(times) - 1 or t <= times[0]:
        return values[i if t > times[0] else 0].astype(np.float64)
    a, b = values[i].astype(np.float64), values[i + 1].astype(np.float64)
    u = (t - times[i]) / (times[i + 1] - times[i])
    if path != "rotation":
        return a + u * (b - a)
    dot = np.dot(a, b)
    b, dot = (-b, -dot) if dot < 0 else (b, dot)
    theta = np.arccos(min(dot, 1.0))
    if theta < 1e-8:
        return a
    return (np.sin((1 - u) * theta) * a + np.sin(u * theta) * b) / np.sin(theta)


def read(path):
    doc = pygltflib.GLTF2.load_binary(str(path))
    return doc, doc.binary_blob()


def world_transforms(doc, blob, t):
    """{node: 4x4 world matrix} at time t of animation 0, composing T R S down from the scene's roots."""
    local = {}
    for k, node in enumerate(doc.nodes):
        assert node.matrix is None and node.scale is None
        local[k] = {"translation": np.array(node.translation or [0.0] * 3), "rotation": node.rotation or [0, 0, 0, 1]}
    animation = doc.animations[0]
    for channel in animation.channels:
        s = animation.samplers[channel.sampler]
        assert s.interpolation == "LINEAR"
        times = accessor(doc, blob, s.input)[:, 0]
        local[channel.target.node][channel.target.path] = sample(
            times, accessor(doc, blob, s.output), t, channel.target.path
        )
    world = {}

    def visit(k, parent):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = quat_matrix(local[k]["rotation"]), local[k]["translation"]
        world[k] = parent @ m
        for c in doc.nodes[k].children or []:
            visit(c, world[k])

    for k in doc.scenes[doc.scene].nodes:
        visit(k, np.eye(4))
    return world


def joint_positions(path, n_frames):
    """[T, 24, 3]: the world positions of the nodes named after the skeleton's joints at times k / FPS."""
    doc, blob = read(path)
    index = [[n.name for n in doc.nodes].index(name) for name in skeleton.JOINT_NAMES]
    frames = [world_transforms(doc, blob, k / FPS) for k in range(n_frames)]
    return np.array([[w[i][:3, 3] for i in index] for w in frames])


def skinned_vertices(path, n_frames):
    """[T, V, 3]: the mesh skinned by its skin at times k / FPS (sum_i w_i joint_matrix_i v)."""
    doc, blob = read(path)
    (body,) = [n for n in doc.nodes if n.mesh is not None]
    skin, attributes = doc.skins[body.skin], doc.meshes[body.mesh].primitives[0].attributes
    ibm = accessor(doc, blob, skin.inverseBindMatrices)
    vertices = accessor(doc, blob, attributes.POSITION).astype(np.float64)
    joints, weights = accessor(doc, blob, attributes.JOINTS_0), accessor(doc, blob, attributes.WEIGHTS_0)
    homogeneous = np.concatenate([vertices, np.ones((len(vertices), 1))], 1)
    out = []
    for k in range(n_frames):
        world = world_transforms(doc, blob, k / FPS)
        matrices = np.array([world[j] @ m for j, m in zip(skin.joints, ibm)])  # [J, 4, 4]
        blended = np.einsum("vi,vimn->vmn", weights, matrices[joints])
        out.append(np.einsum("vmn,vn->vm", blended, homogeneous)[:, :3])
    return np.array(out)


# ---------------------------------------------------------------- expectations
def placed(camera_points):
    """Camera-frame points [T, N, 3] -> the y-up world (x, -y, -z), shifted so frame 0's point 0
    (the pelvis) is at x = z = 0 and frame 0's lowest point at y = 0."""
    world = camera_points * np.array([1.0, -1.0, -1.0])
    return world - np.array([world[0, 0, 0], world[0, :, 1].min(), world[0, 0, 2]])


def motion(frames=6, seed=0):
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(frames * 24, random_state=seed).as_matrix().reshape(frames, 24, 3, 3)
    return rotations, rng.normal(size=(frames, 3)) + np.array([0.0, 0.0, 100.0])  # cam_t: ~100 m away


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A model of SMPL's layout with random values (the real files are licensed), no pose blend
    shapes and at most 4 joints per vertex, so its vertices are exactly glTF's linear blend skinning."""
    rng = np.random.default_rng(0)
    v, j = 6890, skeleton.NUM_JOINTS
    regressor = np.zeros((j, v))
    for row in regressor:
        row[rng.choice(v, 30, replace=False)] = rng.uniform(0.1, 1.0, 30)
    weights = np.zeros((v, j))
    for i, idx in enumerate(rng.integers(0, j, (v, 4))):  # repeats: some vertices have fewer than 4
        weights[i, idx] = rng.uniform(0.1, 1.0, 4)
    kintree = np.stack([np.array(skeleton.PARENTS), np.arange(j)])
    path = tmp_path_factory.mktemp("smpl") / "SMPL_NEUTRAL.npz"
    np.savez(path, v_template=(skeleton.REST_JOINTS[rng.integers(0, j, v)] + rng.normal(0, 0.05, (v, 3))),
             shapedirs=rng.normal(0.0, 0.01, (v, 3, 10)), posedirs=np.zeros((v, 3, 207)),
             J_regressor=regressor / regressor.sum(1, keepdims=True), weights=weights / weights.sum(1, keepdims=True),
             kintree_table=kintree, f=rng.integers(0, v, (13776, 3)))  # fmt: skip
    return smpl.load(path)


# ---------------------------------------------------------------- the tests
@pytest.mark.parametrize("pelvis", [(0.0, 0.0, 0.0), (0.003, -0.22, 0.028)])
def test_animation_matches_forward_kinematics(tmp_path, pelvis):
    rotations, cam_t = motion()
    rest = skeleton.REST_JOINTS.astype(np.float64) + np.array(pelvis)  # SMPL's rest pelvis is off the origin
    gltf.write(tmp_path / "motion.glb", rotations, rest, cam_t, FPS, HW, FOCAL)
    got = joint_positions(tmp_path / "motion.glb", len(rotations))
    want = placed(np.asarray(skeleton.forward_kinematics(rotations, rest)) + cam_t[:, None])
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert got[0, 0, [0, 2]] == pytest.approx([0, 0], abs=1e-6) and got[0, :, 1].min() == pytest.approx(0, abs=1e-6)

    doc, blob = read(tmp_path / "motion.glb")
    names = [n.name for n in doc.nodes]
    for k, name in enumerate(skeleton.JOINT_NAMES):  # the hierarchy is the skeleton's
        children = {names[c] for c in doc.nodes[names.index(name)].children}
        assert children == {skeleton.JOINT_NAMES[c] for c, p in enumerate(skeleton.PARENTS) if p == k}
    (animation,) = doc.animations
    assert len(animation.channels) == 25 and {c.target.path for c in animation.channels} == {"rotation", "translation"}
    for s in animation.samplers:
        np.testing.assert_allclose(accessor(doc, blob, s.input)[:, 0], np.arange(len(rotations)) / FPS, rtol=1e-6)
        values = accessor(doc, blob, s.output)
        if values.shape[1] == 4:
            np.testing.assert_allclose(np.linalg.norm(values, axis=1), 1.0, atol=1e-6)
    assert not [n for n in doc.nodes if n.mesh is not None]  # the skeleton only
    assert len(doc.skins) == 1 and doc.skins[0].joints == list(range(24))  # for importers' armatures


def test_camera_node_keeps_the_video_camera(tmp_path):
    rotations, cam_t = motion(frames=3, seed=1)
    gltf.write(tmp_path / "motion.glb", rotations, skeleton.REST_JOINTS, cam_t, FPS, HW, FOCAL)
    doc, blob = read(tmp_path / "motion.glb")
    (camera_node,) = [k for k, n in enumerate(doc.nodes) if n.camera is not None]
    perspective = doc.cameras[doc.nodes[camera_node].camera].perspective
    assert perspective.yfov == pytest.approx(2 * np.arctan(HW[0] / 2 / FOCAL)) and perspective.aspectRatio == 1.5
    root = doc.nodes.index(next(n for n in doc.nodes if n.name == "pelvis"))
    for k in range(3):  # in the camera node's frame (y up, looking down -z) the pelvis is where the video has it
        world = world_transforms(doc, blob, k / FPS)
        seen = np.linalg.inv(world[camera_node]) @ world[root][:, 3]
        np.testing.assert_allclose(seen[:3], (skeleton.REST_JOINTS[0] + cam_t[k]) * [1, -1, -1], atol=1e-4)
    np.testing.assert_allclose(
        doc.nodes[camera_node].translation, bvh.placement(rotations, skeleton.REST_JOINTS, cam_t)
    )


def test_skinned_mesh_matches_smpl(tmp_path, model):
    rotations, cam_t = motion(frames=3, seed=2)
    rest = np.asarray(model.rest_joints(np.zeros((1, 10))))[0]
    gltf.write(tmp_path / "body.glb", rotations, rest, cam_t, FPS, HW, FOCAL, mesh=gltf.mean_shape_mesh(model))
    posed = model(np.zeros((3, 10)), rotations)
    camera_points = np.concatenate([posed["joints"], posed["vertices"]], axis=1) + cam_t[:, None]
    world = camera_points * np.array([1.0, -1.0, -1.0]) + bvh.placement(rotations, rest, cam_t)
    np.testing.assert_allclose(skinned_vertices(tmp_path / "body.glb", 3), world[:, 24:], atol=1e-4)
    np.testing.assert_allclose(joint_positions(tmp_path / "body.glb", 3), world[:, :24], atol=1e-4)


def test_top_weights_keeps_the_four_largest_renormalised():
    weights = np.array([[0.1, 0.3, 0.05, 0.2, 0.15, 0.2], [0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0] * 6])
    joints, kept = gltf.top_weights(weights)
    assert joints.dtype == np.uint16 and kept.dtype == np.float32
    assert joints.tolist() == [[1, 3, 5, 4], [2, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(kept[0], np.array([0.3, 0.2, 0.2, 0.15]) / 0.85, rtol=1e-6)
    np.testing.assert_allclose(kept[1:], [[1, 0, 0, 0], [1, 0, 0, 0]])


def test_write_sample_writes_motion_glb_beside_the_bvh(tmp_path):
    rotations, _ = motion(frames=4, seed=3)
    raw = np.zeros((4, M.MOTION_DIM), np.float32)
    raw[:, M.BBOX] = [0.3, 0.2, 0.3, 0.6]
    raw[:, M.CAMERA] = [0.9, 0.05, -0.1]
    raw[:, M.ROTATIONS] = np.asarray(M.matrix_to_rot6d(rotations)).reshape(4, -1)
    arrays = outputs.motion_arrays(raw, HW, FPS)
    frames = [np.zeros((*HW, 3), np.uint8)] * 4
    outputs.write_sample(str(tmp_path), arrays, smpl.builtin(), frames)
    assert "motion.glb" in outputs.LAYOUT and {"motion.bvh", "motion.glb"} <= set(os.listdir(tmp_path))
    cam_t = np.load(tmp_path / "motion.npz")["cam_t"]  # the full-image camera, unplaced
    np.testing.assert_allclose(cam_t, arrays["cam_t"])
    got = joint_positions(tmp_path / "motion.glb", 4)
    joints = np.asarray(skeleton.forward_kinematics(arrays["rotations"]))
    np.testing.assert_allclose(got, placed(joints + cam_t[:, None]), atol=1e-4)
    lines = (tmp_path / "motion.bvh").read_text().splitlines()
    bvh_root = np.array([row.split()[:3] for row in lines[-4:]], float)
    np.testing.assert_allclose(bvh_root, got[:, 0], atol=1e-5)  # the same world in both files


# ---------------------------------------------------------------- the Khronos validator
VALIDATE_JS = """
const validator = require(process.argv[2]);
const data = new Uint8Array(require("fs").readFileSync(process.argv[3]));
validator.validateBytes(data, {maxIssues: 0})
  .then((report) => console.log(JSON.stringify(report.issues)))
  .catch((error) => { console.error(error); process.exit(1); });
"""


@pytest.fixture(scope="module")
def validate(tmp_path_factory):
    """validate(path) -> the validator's issues {numErrors, numWarnings, messages, ...}; installs
    gltf-validator once into ~/.cache/sabr_jax/node (or $XDG_CACHE_HOME's) with npm."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Khronos glTF validator is an npm package (gltf-validator)")
    prefix = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sabr_jax" / "node"
    package = prefix / "node_modules" / "gltf-validator"
    try:
        installed = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        installed = None
    if installed != VALIDATOR:
        command = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", f"gltf-validator@{VALIDATOR}"]
        try:
            prefix.mkdir(parents=True, exist_ok=True)
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            pytest.skip(f"npm could not install gltf-validator@{VALIDATOR} (offline?): {detail.strip()[-300:]}")
    script = tmp_path_factory.mktemp("validator") / "validate.js"
    script.write_text(VALIDATE_JS)

    def run(path):
        result = subprocess.run(
            [node, str(script), str(package), str(path)], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    return run


def test_validator_reports_no_errors(tmp_path, model, validate):
    rotations, cam_t = motion(frames=30, seed=4)
    rest = np.asarray(model.rest_joints(np.zeros((1, 10))))[0]
    gltf.write(tmp_path / "skeleton.glb", rotations, skeleton.REST_JOINTS, cam_t, FPS, HW, FOCAL)
    gltf.write(tmp_path / "body.glb", rotations, rest, cam_t, FPS, HW, FOCAL, mesh=gltf.mean_shape_mesh(model))
    for name in ("skeleton.glb", "body.glb"):
        issues = validate(tmp_path / name)
        assert issues["numErrors"] == 0 and issues["numWarnings"] == 0, (name, issues["messages"])

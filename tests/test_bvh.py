"""sabr_jax.body.bvh: the written file parses back to the skeleton's own forward kinematics, and
Blender's importer reads the same joint positions (where Blender's `bpy` module is installed)."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from sabr_jax.body import bvh, skeleton

FPS = 30


def parse(path):
    """A small BVH reader: joint names, parents, offsets [J, 3], channel names per joint, End
    Site count, frame count, frame time and the motion values [T, C]."""
    tokens = open(path).read().split()
    names, parents, offsets, channels, stack = [], [], [], [], []
    end_sites, i, in_end = 0, 1, False
    while tokens[i] != "MOTION":
        word = tokens[i]
        if word in ("ROOT", "JOINT"):
            parents.append(stack[-1] if stack else -1)
            names.append(tokens[i + 1])
            i += 2
        elif word == "End":
            end_sites, in_end, i = end_sites + 1, True, i + 2
        elif word == "{":
            stack.append(-2 if in_end else len(names) - 1)
            i += 1
        elif word == "}":
            in_end = stack.pop() != -2 and in_end
            i += 1
        elif word == "OFFSET":
            if not in_end:
                offsets.append([float(v) for v in tokens[i + 1 : i + 4]])
            i += 4
        elif word == "CHANNELS":
            n = int(tokens[i + 1])
            channels.append(tokens[i + 2 : i + 2 + n])
            i += 2 + n
        else:
            raise AssertionError(f"unexpected token {word!r}")
    assert tokens[i + 1] == "Frames:" and tokens[i + 3 : i + 5] == ["Frame", "Time:"]
    frames, frame_time = int(tokens[i + 2]), float(tokens[i + 5])
    motion = np.array(tokens[i + 6 :], np.float64).reshape(frames, -1)
    return dict(
        names=names,
        parents=parents,
        offsets=np.array(offsets),
        channels=channels,
        end_sites=end_sites,
        frames=frames,
        frame_time=frame_time,
        motion=motion,
    )


def positions(parsed):
    """World joint positions [T, J, 3] (file units, file order) by BVH forward kinematics:
    world_k = world_parent . Translate(offset_k + position channels) . rotation channels."""
    motion, column = parsed["motion"], 0
    world_rot, world_pos = [], []
    for k, (parent, chans) in enumerate(zip(parsed["parents"], parsed["channels"])):
        values = motion[:, column : column + len(chans)]
        column += len(chans)
        local_pos = np.broadcast_to(parsed["offsets"][k], (len(motion), 3)).copy()
        axes, angles = "", []
        for name, v in zip(chans, values.T):
            if name.endswith("position"):
                local_pos[:, "XYZ".index(name[0])] += v
            else:
                axes, angles = axes + name[0], angles + [v]
        local_rot = Rotation.from_euler(axes, np.stack(angles, -1), degrees=True).as_matrix()
        if parent < 0:
            world_rot.append(local_rot)
            world_pos.append(local_pos)
        else:
            world_pos.append(world_pos[parent] + np.einsum("tij,tj->ti", world_rot[parent], local_pos))
            world_rot.append(world_rot[parent] @ local_rot)
    return np.stack(world_pos, 1)


def expected_positions(rotations, rest, translation, placed=True):
    """The skeleton's own forward kinematics, translated, in the BVH world (x, -y, -z): [T, 24, 3]
    metres; placed: shifted so that frame 0's pelvis is at x = z = 0 and its lowest joint at y = 0."""
    camera_frame = np.asarray(skeleton.forward_kinematics(rotations, rest)) + translation[:, None]
    world = camera_frame * np.array([1.0, -1.0, -1.0])
    if placed:
        world -= np.array([world[0, 0, 0], world[0, :, 1].min(), world[0, 0, 2]])
    return world


def motion(frames=5, seed=0):
    rng = np.random.default_rng(seed)
    rotations = Rotation.random(frames * 24, random_state=seed).as_matrix().reshape(frames, 24, 3, 3)
    translation = rng.normal(size=(frames, 3)) + np.array([0.0, 0.0, 20.0])
    return rotations, translation


@pytest.mark.parametrize("scale", [1.0, 100.0])
@pytest.mark.parametrize("pelvis", [(0.0, 0.0, 0.0), (0.003, -0.22, 0.028)])
def test_round_trip_matches_forward_kinematics(tmp_path, scale, pelvis):
    rotations, translation = motion()
    rest = skeleton.REST_JOINTS.astype(np.float64) + np.array(pelvis)  # SMPL's rest pelvis is off the origin
    path = tmp_path / "climb.bvh"
    bvh.write(path, rotations, rest, translation, FPS, scale=scale)
    parsed = parse(path)
    order = [parsed["names"].index(n) for n in skeleton.JOINT_NAMES]
    got = positions(parsed)[:, order] / scale
    np.testing.assert_allclose(got, expected_positions(rotations, rest, translation), atol=1e-4)


def test_placement_puts_the_first_frame_on_the_floor_at_the_origin(tmp_path):
    """The root sits near the origin, not ~20 m (here; ~100 m for real videos) away at cam_t, frame
    0's lowest joint on y = 0; world_shift = 0 keeps the camera's origin (the translation as given)."""
    rotations, translation = motion(frames=6, seed=2)
    rest = skeleton.REST_JOINTS.astype(np.float64)
    path = tmp_path / "climb.bvh"
    bvh.write(path, rotations, rest, translation, FPS)
    parsed = parse(path)
    got = positions(parsed)[:, [parsed["names"].index(n) for n in skeleton.JOINT_NAMES]]
    np.testing.assert_allclose([got[0, 0, 0], got[0, :, 1].min(), got[0, 0, 2]], 0.0, atol=1e-6)
    assert np.linalg.norm(translation[0]) > 15 and np.abs(got).max() < 6  # the body stays near the origin
    unplaced = expected_positions(rotations, rest, translation, placed=False)
    shift = bvh.placement(rotations, rest, translation)  # the shift that sabr_jax.body.gltf shares
    np.testing.assert_allclose(unplaced + shift, expected_positions(rotations, rest, translation), atol=1e-5)
    bvh.write(path, rotations, rest, translation, FPS, world_shift=np.zeros(3))
    parsed = parse(path)
    got = positions(parsed)[:, [parsed["names"].index(n) for n in skeleton.JOINT_NAMES]]
    np.testing.assert_allclose(got, unplaced, atol=1e-4)


def test_file_structure(tmp_path):
    rotations, translation = motion(frames=7)
    path = tmp_path / "climb.bvh"
    bvh.write(path, rotations, skeleton.REST_JOINTS, translation, FPS)
    parsed = parse(path)
    assert sorted(parsed["names"]) == sorted(skeleton.JOINT_NAMES) and len(parsed["names"]) == 24
    parent_names = [parsed["names"][p] if p >= 0 else None for p in parsed["parents"]]
    for name, parent in zip(parsed["names"], parent_names):
        k = skeleton.JOINT_NAMES.index(name)
        assert parent == (skeleton.JOINT_NAMES[skeleton.PARENTS[k]] if k else None)
    leaves = set(range(24)) - set(skeleton.PARENTS)
    assert parsed["end_sites"] == len(leaves) == 5
    assert parsed["names"][0] == "pelvis" and parsed["channels"][0][:3] == ["Xposition", "Yposition", "Zposition"]
    assert all(c[-3:] == ["Zrotation", "Xrotation", "Yrotation"] for c in parsed["channels"])
    assert parsed["frames"] == 7 and parsed["motion"].shape == (7, 6 + 23 * 3)
    assert parsed["frame_time"] == pytest.approx(1 / FPS, abs=1e-8)


def test_climber_stands_upright(tmp_path):
    """A rest pose facing the wall (a half turn about the camera's z axis: SMPL's y up becomes
    the camera's y down) has its head above its pelvis above its ankles in the y-up BVH world."""
    rotations = np.tile(np.eye(3), (1, 24, 1, 1))
    rotations[0, 0] = np.diag([-1.0, -1.0, 1.0])
    path = tmp_path / "climb.bvh"
    bvh.write(path, rotations, skeleton.REST_JOINTS, np.array([[0.0, 0.0, 10.0]]), FPS)
    parsed = parse(path)
    y = {n: p[1] for n, p in zip(parsed["names"], positions(parsed)[0])}
    assert y["head"] > y["pelvis"] + 0.4 > y["L_ankle"] + 1.2


BLENDER_SCRIPT = """
import json, sys
import bpy
bpy.ops.wm.read_factory_settings(use_empty=True)
bpy.ops.import_anim.bvh(filepath=sys.argv[1], global_scale=1.0, axis_forward="-Z", axis_up="Y", frame_start=1)
armature = bpy.context.selected_objects[0]
frames = []
for f in range(1, int(sys.argv[2]) + 1):
    bpy.context.scene.frame_set(f)
    frames.append({b.name: list(armature.matrix_world @ b.head) for b in armature.pose.bones})
json.dump(frames, open(sys.argv[3], "w"))
"""


def _python_with_bpy():
    """An interpreter that imports Blender's `bpy` (PyPI; it needs numpy < 2, so usually a venv
    of its own named by $BPY_PYTHON), or None."""
    if importlib.util.find_spec("bpy") is not None:
        return sys.executable
    return os.environ.get("BPY_PYTHON")


@pytest.mark.skipif(
    _python_with_bpy() is None, reason="Blender's bpy is not installed; set BPY_PYTHON to a python with it"
)
def test_blender_imports_the_same_joint_positions(tmp_path):
    """Blender's own BVH importer (its y-up to z-up mapping: Blender (x, y, z) = BVH (x, -z, y))
    puts every bone's head where the skeleton's forward kinematics puts the joint."""
    rotations, translation = motion(frames=4, seed=3)
    path, script, out = tmp_path / "climb.bvh", tmp_path / "read.py", tmp_path / "joints.json"
    bvh.write(path, rotations, skeleton.REST_JOINTS, translation, FPS)
    script.write_text(BLENDER_SCRIPT)
    subprocess.run([_python_with_bpy(), str(script), str(path), "4", str(out)], check=True, capture_output=True)
    frames = json.loads(out.read_text())
    got = np.array([[f[n] for n in skeleton.JOINT_NAMES] for f in frames])
    want = expected_positions(rotations, skeleton.REST_JOINTS, translation)
    np.testing.assert_allclose(got, want[..., [0, 2, 1]] * np.array([1.0, -1.0, 1.0]), atol=1e-4)

"""SynthClimb's climber: a route on a wall, a fixed move plan along it, and the body by JAX inverse kinematics.

Everything is in metres in the camera frame (x right, y DOWN, z away from the camera): the wall
is the plane z = 0 and the climber, built-in skeleton (sabr_jax.body.skeleton, zero betas: one typical
adult body), faces it with its back to the camera. The plan is a deterministic function of the
route: the hands leapfrog from hold to hold (left hand on even holds, right hand on odd ones), each
hand move followed by one foot move, ONE limb per move of a fixed number of frames (reach, then the
pelvis follows). Every frame is solved on its own, from the base pose with each limb swung towards
its target, by a fixed number of Levenberg-Marquardt steps (jitted, vmapped over frames), so the
pose is a deterministic function of the frame's targets. Joints outside `MOVING` keep exactly
their `BASE_POSE` rotation in every frame.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from sabr_jax import motion as M
from sabr_jax.body import skeleton as S
from sabr_jax.errors import UserError

LIMBS = ("left_hand", "right_hand", "left_foot", "right_foot")
LIMB_JOINTS = np.array([S.END_EFFECTORS[name] for name in LIMBS])  # [4] joint ids
SMEAR = -1  # `Plan.holds` value of a foot resting on the bare wall

# ---------------------------------------------------------------- the body model
# Only the limbs move (and the pelvis translates). With the spine, collars and global orientation
# free too, the IK traded them off differently on every wall: motion that the route images do not
# determine, which no model can learn (on 64 walls, predicting each frame from its time alone left
# 0.29 of the normalised variance, and a linear map from the exact hold coordinates barely less).
FREE = (1, 2, 16, 17)  # 3-DOF joints (axis-angle): hips and shoulders
HINGES = ((4, (1.0, 0.0, 0.0)), (5, (1.0, 0.0, 0.0)), (18, (0.0, -1.0, 0.0)), (19, (0.0, 1.0, 0.0)))  # knees, elbows
MOVING = tuple(sorted(FREE + tuple(j for j, _ in HINGES)))
NUM_PARAMS = 3 + 3 * len(FREE) + len(HINGES)  # root translation, axis-angles, hinge angles
# per-joint regulariser weight (per radian) and soft limit on the rotation angle (radians)
_REG = {0: 2.0, 1: 0.3, 2: 0.3, 3: 1.0, 6: 1.0, 9: 1.0, 13: 2.0, 14: 2.0, 16: 0.2, 17: 0.2}
_LIMIT = {0: 0.3, 1: 1.2, 2: 1.2, 3: 0.3, 6: 0.3, 9: 0.3, 13: 0.2, 14: 0.2, 16: 1.6, 17: 1.6}
_HINGE_REG, _HINGE_RANGE = 0.1, (-0.6, 2.4)  # hinge angles relative to the base pose, radians
_LIMB_WEIGHT, _PELVIS_WEIGHT, _WALL_WEIGHT = 100.0, 0.5, 10.0
_WALL_CLEARANCE = 0.06  # metres every non-limb joint keeps off the wall
_NEAR_LIMB = (7, 8, 10, 11, 20, 21, 22, 23)  # ankles, feet, wrists, hands: allowed at the wall


def _base_pose() -> np.ndarray:
    """[24, 3, 3] float32: the rest climbing pose (back to the camera, arms up, knees bent)."""
    aa = np.zeros((24, 3))
    aa[1], aa[2] = (-0.3, 0.0, 0.35), (-0.3, 0.0, -0.35)  # hips flexed towards the wall, abducted
    aa[4] = aa[5] = (0.6, 0.0, 0.0)  # knees
    aa[16], aa[17] = (0.0, 0.0, 1.0), (0.0, 0.0, -1.0)  # arms raised
    aa[18], aa[19] = (0.0, -0.3, 0.0), (0.0, 0.3, 0.0)  # elbows
    pose = M.axis_angle_to_matrix(aa)
    pose[0] = np.diag([-1.0, -1.0, 1.0])  # 180 degrees about z: SMPL's y-up front-facing body, back to us
    return pose.astype(np.float32)


BASE_POSE = _base_pose()


def _base_frames() -> np.ndarray:
    """[24, 3, 3]: each joint's world orientation in the base pose (parent's world rotation @ local)."""
    world = [BASE_POSE[0].astype(np.float64)]
    for k in range(1, 24):
        world.append(world[S.PARENTS[k]] @ BASE_POSE[k])
    return np.stack(world)


_BASE_WORLD = _base_frames()


@functools.cache
def _base_joints() -> np.ndarray:
    """[24, 3] the base pose's joints, pelvis at the origin (on first use: no JAX computation at import;
    computed eagerly even when the first use is inside a trace)."""
    with jax.ensure_compile_time_eval():
        return np.asarray(S.forward_kinematics(BASE_POSE), np.float64)


_LIMB_ROOTS = (16, 17, 1, 2)  # the joint that swings each limb (LIMBS order): shoulders, hips


def _exp(aa):
    """[..., 3] axis * angle -> [..., 3, 3] by Rodrigues' formula, smooth (finite gradients) at zero."""
    angle = jnp.sqrt(jnp.sum(aa**2, axis=-1) + 1e-12)[..., None, None]
    unit = aa / angle[..., 0]
    k = jnp.swapaxes(jnp.cross(unit[..., None, :], jnp.eye(3)), -1, -2)  # k @ v = unit x v
    return jnp.eye(3) + jnp.sin(angle) * k + (1 - jnp.cos(angle)) * (k @ k)


def rotations_from_params(params):
    """params [..., NUM_PARAMS] -> local rotations [..., 24, 3, 3] (BASE_POSE times the offsets)."""
    free = params[..., 3 : 3 + 3 * len(FREE)].reshape(*params.shape[:-1], len(FREE), 3)
    hinge = params[..., 3 + 3 * len(FREE) :, None] * jnp.asarray([axis for _, axis in HINGES])
    offsets = _exp(jnp.concatenate([free, hinge], axis=-2))  # [..., 14, 3, 3]
    rot = jnp.broadcast_to(jnp.asarray(BASE_POSE), (*params.shape[:-1], 24, 3, 3))
    index = np.array(FREE + tuple(j for j, _ in HINGES))
    return rot.at[..., index, :, :].set(rot[..., index, :, :] @ offsets)


def joints_from_params(params):
    """params [..., NUM_PARAMS] -> posed joints [..., 24, 3] metres in the camera frame."""
    return S.forward_kinematics(rotations_from_params(params)) + params[..., None, :3]


def _residuals(params, targets, weights, pelvis):
    """Weighted residuals of one frame: limbs to targets [4, 3] (weights [4]), pelvis to [3],
    the regulariser towards the base pose, soft joint limits and the wall's clearance."""
    joints = joints_from_params(params)
    free = params[3 : 3 + 3 * len(FREE)].reshape(len(FREE), 3)
    hinge = params[3 + 3 * len(FREE) :]
    angle = jnp.sqrt(jnp.sum(free**2, axis=-1) + 1e-12)
    lo, hi = _HINGE_RANGE
    others = np.setdiff1d(np.arange(24), _NEAR_LIMB)
    return jnp.concatenate(
        [
            (_LIMB_WEIGHT * weights[:, None] * (joints[LIMB_JOINTS] - targets)).reshape(-1),
            _PELVIS_WEIGHT * (joints[0] - pelvis),
            (jnp.asarray([_REG[j] for j in FREE])[:, None] * free).reshape(-1),
            _HINGE_REG * hinge,
            10.0 * jax.nn.relu(angle - jnp.asarray([_LIMIT[j] for j in FREE])),
            10.0 * (jax.nn.relu(lo - hinge) + jax.nn.relu(hinge - hi)),
            _WALL_WEIGHT * jax.nn.relu(joints[others, 2] + _WALL_CLEARANCE),
        ]
    )


def _initial_params(targets, pelvis):
    """The start of every frame's solve: the base pose with its root at the pelvis target and
    each limb swung (at its shoulder or hip) to point at its target. -> params [NUM_PARAMS]."""
    params = jnp.zeros(NUM_PARAMS).at[:3].set(pelvis)
    for limb, root in enumerate(_LIMB_ROOTS):
        a = _base_joints()[LIMB_JOINTS[limb]] - _base_joints()[root]
        b = targets[limb] - pelvis - _base_joints()[root]
        axis = jnp.cross(a, b)
        sin, cos = jnp.linalg.norm(axis), jnp.dot(a, b)
        world_aa = axis / (sin + 1e-9) * jnp.arctan2(sin, cos)
        local_aa = _BASE_WORLD[root].T @ world_aa  # the same rotation in the joint's own frame
        at = 3 + 3 * FREE.index(root)
        params = params.at[at : at + 3].set(local_aa)
    return params


def _solve_frame(start, targets, weights, pelvis, steps: int):
    """`steps` Levenberg-Marquardt steps from params `start`; -> params [NUM_PARAMS]."""

    def cost(p):
        return jnp.sum(_residuals(p, targets, weights, pelvis) ** 2)

    def step(_, state):
        p, damping = state
        r = _residuals(p, targets, weights, pelvis)
        jac = jax.jacfwd(_residuals)(p, targets, weights, pelvis)
        jtj = jac.T @ jac
        delta = jnp.linalg.solve(jtj + damping * (jnp.diag(jnp.diag(jtj)) + 1e-6 * jnp.eye(NUM_PARAMS)), -jac.T @ r)
        better = cost(p + delta) < jnp.sum(r**2)
        return jnp.where(better, p + delta, p), jnp.where(better, damping * 0.1, damping * 10.0)

    return jax.lax.fori_loop(0, steps, step, (start, jnp.float32(1e-3)))[0]


@functools.partial(jax.jit, static_argnames="steps")
def _solve_chunk(targets, weights, pelvis, steps: int):
    """Independent solves of a chunk of frames [c, ...], each from `_initial_params`."""

    def solve(t, w, p):
        return _solve_frame(_initial_params(t, p), t, w, p, steps)

    return jax.vmap(solve)(targets, weights, pelvis)


def solve_ik(
    targets: np.ndarray, weights: np.ndarray, pelvis: np.ndarray, steps: int = 25, chunk: int = 16
) -> np.ndarray:
    """Inverse kinematics of every frame: targets [n, 4, 3] (LIMBS order) with weights [n, 4] (1 for
    a limb on its hold, less for one in flight), pelvis [n, 3] metres, camera frame.

    Each frame is solved on its own from the same kind of start (`_initial_params`) by a fixed
    number of steps, so the pose is a deterministic function of that frame's targets (repeated
    frames are solved once). Frames go in fixed-size chunks (one compile per process).
    Returns params [n, NUM_PARAMS] float32.
    """
    rows = np.concatenate([targets.reshape(len(targets), -1), weights, pelvis], axis=1).astype(np.float32)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    pad = -len(unique) % chunk
    unique = np.concatenate([unique, np.repeat(unique[-1:], pad, 0)])
    t, w, p = unique[:, :12].reshape(-1, 4, 3), unique[:, 12:16], unique[:, 16:]
    chunks = range(0, len(unique), chunk)
    out = [np.asarray(_solve_chunk(t[i : i + chunk], w[i : i + chunk], p[i : i + chunk], steps)) for i in chunks]
    return np.concatenate(out)[inverse.reshape(-1)]


# ---------------------------------------------------------------- the route and the move plan
@dataclasses.dataclass(frozen=True)
class Timing:
    """Frames of the plan at a frame rate: `move` per limb move (the first `reach` of them the limb
    travels, then the pelvis follows) and `pause` still frames at the start and at the end."""

    move: int
    reach: int
    pause: int

    @classmethod
    def at(cls, fps: float, move_frames_at_24: int = 8) -> Timing:
        move = max(2, round(move_frames_at_24 * fps / 24))
        return cls(move=move, reach=max(1, round(0.6 * move)), pause=max(1, round(4 * fps / 24)))

    def frames(self, num_holds: int) -> int:
        """Clip length for a route of num_holds holds: 2 (num_holds - 2) moves and two pauses."""
        return 2 * self.pause + 2 * (num_holds - 2) * self.move


VIEW_HEIGHT = 3.0  # metres of wall the frame shows vertically
_FOOT_DROP, _FOOT_SPREAD, _SNAP = 0.85, 0.18, 0.25  # metres: feet below the lower hand, off centre; hold snap radius
_IN_FLIGHT_WEIGHT = 0.2
_BOTTOM, _TOP = 1.0, 2.85  # metres above the frame's bottom edge: lowest and highest route hold
_MIN_STEP, _MAX_STEP = 0.2, 0.3  # metres between successive route holds, vertically
MAX_HOLDS = 1 + int((_TOP - _BOTTOM) / _MIN_STEP)


def make_route(rng: np.random.Generator, num_holds: int, view_width: float) -> np.ndarray:
    """Route holds [num_holds, 3] = (x, y, r) metres, x from the view's centre, y UP from its bottom edge.

    The holds zigzag upwards (even holds left, odd holds right) and span most of the view's height.
    A wall's route is set by a few visible numbers (where it starts, how it drifts sideways, how
    wide its zigzag is) plus a little per-hold jitter: the climb then depends on what the route
    images show at the scale the tokens resolve, which keeps the benchmark learnable.
    """
    if not 3 <= num_holds <= MAX_HOLDS:
        raise UserError(f"a route needs 3 to {MAX_HOLDS} holds to fit a {VIEW_HEIGHT:g} m view, got {num_holds}")
    step = min(_MAX_STEP, (_TOP - _BOTTOM) / (num_holds - 1))
    rises = step * rng.uniform(0.95, 1.0, num_holds - 1)
    y = _BOTTOM + rng.uniform(0, _TOP - _BOTTOM - rises.sum()) + np.concatenate([[0.0], np.cumsum(rises)])
    centre = rng.uniform(-0.25, 0.25) * view_width + np.linspace(0, rng.uniform(-0.5, 0.5), num_holds)
    side = np.where(np.arange(num_holds) % 2 == 0, -1.0, 1.0)
    x = centre + side * rng.uniform(0.08, 0.35) + rng.uniform(-0.02, 0.02, num_holds)
    gaps = np.hypot(np.diff(x), np.diff(y))
    nearest = np.minimum(np.concatenate([[np.inf], gaps]), np.concatenate([gaps, [np.inf]]))
    r = np.minimum(rng.uniform(0.08, 0.16, num_holds), 0.45 * nearest - 0.02)
    return np.stack([x, y, r], axis=1)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-frame targets of the climb (metres, camera frame, wall at z = 0).

    targets [n, 4, 3]: where each limb (LIMBS order) should be; pelvis [n, 3]: where the pelvis
    should be; holds [n, 4] int: the route hold a limb rests on (SMEAR: a foot on the bare wall,
    or the limb is moving: see `resting`); resting [n, 4] bool: the limb is still on its hold.
    """

    targets: np.ndarray
    pelvis: np.ndarray
    holds: np.ndarray
    resting: np.ndarray

    @property
    def weights(self) -> np.ndarray:
        """[n, 4] IK weight of each limb's target: a limb in flight only pulls as far as it can reach."""
        return np.where(self.resting, 1.0, _IN_FLIGHT_WEIGHT)


def _pelvis_for(limbs: np.ndarray) -> np.ndarray:
    """The pelvis position [3] (y up) for limb positions [4, 2] (y up): between the hands and the feet."""
    hands, feet = limbs[:2].mean(0), limbs[2:].mean(0)
    y = 0.5 * (hands[1] - 0.75) + 0.5 * (feet[1] + 0.7)
    return np.array([0.5 * (hands[0] + feet[0]), y, -0.2])


def _foot_target(route: np.ndarray, limbs: np.ndarray, foot: int, taken: set[int]) -> tuple[np.ndarray, int]:
    """Where foot (2 left, 3 right) goes for hands at limbs[:2]: a free route hold near the
    natural spot if one is within _SNAP metres, else a smear on the bare wall at that spot."""
    spot = np.array([limbs[:2, 0].mean() + (-1 if foot == 2 else 1) * _FOOT_SPREAD, limbs[:2, 1].min() - _FOOT_DROP])
    dist = np.hypot(*(route[:, :2] - spot).T)
    dist[list(taken)] = np.inf
    dist[route[:, 1] < spot[1] - 0.1] = np.inf  # never a hold much lower than the natural spot
    best = int(np.argmin(dist))
    return (route[best, :2].copy(), best) if dist[best] < _SNAP else (spot, SMEAR)


def _smoothstep(s: float) -> float:
    """0 below 0, 1 above 1, and a smooth S-curve between."""
    s = min(max(s, 0.0), 1.0)
    return s * s * (3 - 2 * s)


def make_plan(route: np.ndarray, timing: Timing) -> Plan:
    """The climb of a route [k, 3] (metres, y up, from `make_route`) as per-frame targets.

    Start: left hand on hold 0, right hand on hold 1, feet below. Move j (j = 0 .. k-3): the lower
    hand goes from hold j to hold j + 2 (left hand on even holds), then the foot on the other
    side steps up. Each move has timing.move frames: the limb travels (smoothstep, lifted off the
    wall) in the first timing.reach of them, and the pelvis follows over all of them.
    """
    limbs = np.zeros((4, 2))
    on = np.array([0, 1, SMEAR, SMEAR])
    limbs[:2] = route[:2, :2]
    for foot in (2, 3):
        limbs[foot], on[foot] = _foot_target(route, limbs, foot, set(on[on >= 0].tolist()))
    frames = []  # (limbs [4, 2], on [4], moving limb or -1, lift, pelvis [3])
    pelvis = _pelvis_for(limbs)
    frames += [(limbs.copy(), on.copy(), -1, 0.0, pelvis)] * timing.pause
    for j in range(len(route) - 2):
        hand = j % 2
        foot = 3 - hand  # the other side's foot
        for limb in (hand, foot):
            start = limbs.copy()
            if limb == hand:
                goal, hold = route[j + 2, :2], j + 2
            else:
                goal, hold = _foot_target(route, limbs, foot, set(on[on >= 0].tolist()) - {on[foot]})
            end = start.copy()
            end[limb] = goal
            new_pelvis = _pelvis_for(end)
            for i in range(timing.move):
                reach, follow = _smoothstep((i + 1) / timing.reach), _smoothstep((i + 1) / timing.move)
                limbs[limb] = (1 - reach) * start[limb] + reach * end[limb]
                on[limb] = hold if i + 1 >= timing.reach else SMEAR
                moving = limb if i + 1 < timing.reach else -1
                lift = np.sin(np.pi * reach) if moving >= 0 else 0.0
                frames.append((limbs.copy(), on.copy(), moving, lift, (1 - follow) * pelvis + follow * new_pelvis))
            pelvis = new_pelvis
    frames += [(limbs.copy(), on.copy(), -1, 0.0, pelvis)] * timing.pause

    n = len(frames)
    targets = np.zeros((n, 4, 3))
    resting = np.ones((n, 4), bool)
    for f, (lim, _, moving, lift, _) in enumerate(frames):
        targets[f, :, :2] = lim * [1, -1]  # y up -> camera y down
        targets[f, :, 2] = np.where(np.arange(4) < 2, -0.03, -0.05)
        if moving >= 0:
            targets[f, moving, 2] -= 0.12 * lift
            resting[f, moving] = False
    pelvis = np.stack([p for *_, p in frames]) * [1, -1, 1]
    holds = np.stack([o for _, o, *_ in frames])
    return Plan(targets=targets, pelvis=pelvis, holds=np.where(resting, holds, SMEAR), resting=resting)


@dataclasses.dataclass(frozen=True)
class Climb:
    """A solved climb: plan (the targets), rotations [n, 24, 3, 3] float32 (local, SMPL order; joints
    outside MOVING are exactly BASE_POSE), root [n, 3] metres (the pelvis, camera frame) and
    joints [n, 24, 3] metres = forward_kinematics(rotations) + root."""

    plan: Plan
    rotations: np.ndarray
    root: np.ndarray
    joints: np.ndarray


def climb(route: np.ndarray, timing: Timing) -> Climb:
    """Plan and solve the climb of a route [k, 3] (metres, y up, from `make_route`)."""
    plan = make_plan(route, timing)
    params = solve_ik(plan.targets, plan.weights, plan.pelvis)
    rotations = np.asarray(rotations_from_params(jnp.asarray(params)), np.float32)
    root = params[:, :3]
    joints = np.asarray(S.forward_kinematics(rotations)) + root[:, None]
    return Climb(plan=plan, rotations=rotations, root=root, joints=joints)

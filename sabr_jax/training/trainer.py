"""Training state, loss and the pure, sharded train step.

The state is a plain dict of arrays (what Orbax saves):
    params     model parameters, float32 (a pure dict mirroring the DiT's attributes)
    ema        exponential moving average of params
    opt_state  Optax AdamW state
    step       int32 scalar: steps taken
    key        uint32 [2]: the base PRNG key; step s uses fold_in(key, s)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sabr_jax import motion
from sabr_jax.data.pipeline import motion_frames
from sabr_jax.data.sources import resolve_shapes
from sabr_jax.diffusion.gaussian import GaussianDiffusion, frame_weights, space_timesteps
from sabr_jax.errors import UserError
from sabr_jax.model.dit import DiT
from sabr_jax.model.factory import abstract_model, build_model
from sabr_jax.parallel import sharding

# Timesteps of the validation figures (`Trainer.eval_step`), evenly spaced over [0, T).
EVAL_TIMESTEPS = 8


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = cfg.optim
    if o.schedule == "constant":
        decay = optax.constant_schedule(o.lr)
    elif o.schedule == "cosine":
        decay = optax.cosine_decay_schedule(o.lr, max(cfg.total_steps - o.warmup_steps, 1))
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {o.schedule!r}")
    lr = optax.join_schedules([optax.linear_schedule(0.0, o.lr, o.warmup_steps), decay], [o.warmup_steps])
    adamw = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm), adamw) if o.clip_norm > 0 else adamw


def roll_video(batch: dict) -> dict:
    """batch with every example's video tokens [B, L, P, Dv] those of the example before it
    (roll by one along the batch axis); masks and motion unchanged."""
    return dict(batch, video=jnp.roll(batch["video"], 1, axis=0))


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, leaf by leaf."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


@dataclasses.dataclass
class Trainer:
    """Everything static about a run: the model's graph, optimiser, schedule, mesh, shardings.

    Construction first fills in cfg's unset data.num_patches and model.video_dim, in place,
    from the dataset it names (sabr_jax.data.sources.resolve_shapes), so that whatever uses
    cfg afterwards (the pipeline, the saved checkpoint config, an export) sees the values
    the model is built with.
    """

    cfg: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh

    def __post_init__(self):
        cfg = resolve_shapes(self.cfg)
        shards = sharding.batch_shards(self.mesh)
        if cfg.batch_size % (cfg.grad_accum * shards):
            raise UserError(
                f"batch_size {cfg.batch_size} must be divisible by grad_accum ({cfg.grad_accum}) x the batch shards "
                f"(mesh data x fsdp = {shards}): each micro-batch is split evenly over the devices"
            )
        self.graphdef, abstract_params = nnx.split(abstract_model(cfg))
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion)
        self.tx = optimizer(cfg)
        params_spec = sharding.param_specs(abstract_params, self.mesh)
        opt_shapes = jax.eval_shape(self.tx.init, nnx.to_pure_dict(abstract_params))
        opt_spec = optax.tree_map_params(
            self.tx,
            lambda _, spec: spec,
            opt_shapes,
            params_spec,
            transform_non_params=lambda _: P(),
            is_leaf=lambda x: isinstance(x, P),
        )
        spec = {"params": params_spec, "ema": params_spec, "opt_state": opt_spec, "step": P(), "key": P()}
        self.state_sharding = jax.tree.map(
            lambda s: NamedSharding(self.mesh, s), spec, is_leaf=lambda x: isinstance(x, P)
        )
        self.batch_sharding = sharding.batch_sharding(self.mesh)

    # -------------------------------------------------------------- state
    def _init_fn(self, seed: int):
        def init():
            params = nnx.to_pure_dict(nnx.state(build_model(self.cfg, seed)))
            return {
                "params": params,
                "ema": params,
                "opt_state": self.tx.init(params),
                "step": jnp.zeros((), jnp.int32),
                "key": jax.random.PRNGKey(seed),
            }

        return init

    def init_state(self, seed: int) -> dict:
        """Fresh state, created directly in its sharded layout."""
        return jax.jit(self._init_fn(seed), out_shardings=self.state_sharding)()

    def abstract_state(self) -> dict:
        """Shapes, dtypes and shardings of the state (for restoring and ahead-of-time compiles)."""
        shapes = jax.eval_shape(self._init_fn(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sharding
        )

    def model(self, params) -> DiT:
        return nnx.merge(self.graphdef, params)

    # -------------------------------------------------------------- loss and step
    def draw(self, key, batch) -> dict:
        """The step's random inputs for the whole global batch: diffusion step t [B], noise
        like motion, condition-dropout flags [B].

        Drawn once per step for the global batch and laid out like it, so neither the
        device count nor the grad_accum split changes them (threefry keys are partitionable:
        the values do not depend on the sharding).
        """
        x0 = batch["motion"]
        b = x0.shape[0]
        t_key, noise_key, drop_key = jax.random.split(key, 3)
        rand = {
            "t": jax.random.randint(t_key, (b,), 0, self.diffusion.num_steps),
            "noise": jax.random.normal(noise_key, x0.shape, x0.dtype),
            "drop": jax.random.bernoulli(drop_key, self.cfg.cond_drop_prob, (b,)),
        }
        return jax.tree.map(lambda x: self._constrain(x, sharding.BATCH), rand)

    def _constrain(self, x, *spec):
        """with_sharding_constraint to P(*spec) on this trainer's mesh, inside jit."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def loss(self, params, batch, rand, weights=None):
        """batch: motion [B, L, 161] (normalised), video [B, L, P, Dv], frame_mask, context_mask
        [B, L] bool, and optionally motion_mask [B, L] bool (sabr_jax.data.pipeline; absent:
        every motion frame is tracked); rand: the step's random inputs for these examples
        (see `draw`); weights [B, L]: each frame's weight in the loss (`loss_weights`; None:
        those of this batch).

        The loss counts the motion frames (frame_mask, not context_mask) whose motion_mask is
        True. Motion frames whose motion_mask is False (the tracker lost the climber) are
        left out of the loss exactly as padding is, but stay in the sequence: their video
        tokens condition the model and they take part in attention, with the motion the
        pipeline gives them (the interpolation of the tracked frames around them,
        `motion.fill_gaps`) as the noised input.
        """
        weights = self.loss_weights(batch) if weights is None else weights
        x0, frame_mask, context_mask = batch["motion"], batch["frame_mask"], batch["context_mask"]
        t = rand["t"]
        x_t = self.diffusion.q_sample(x0, t, rand["noise"])
        drop = rand["drop"] if self.cfg.cond_drop_prob > 0 else None
        model = self.model(params)
        out = model(x_t, t, frame_mask, context_mask, video_emb=model.embed_video(batch["video"], drop))
        return self.diffusion.loss(out, x0, x_t, t, weights, self.feature_weights)

    def loss_weights(self, batch) -> jax.Array:
        """[B, L] float32: each frame's weight in the loss of `batch` (`diffusion.frame_weights`
        with cfg.loss_weighting over the counted frames, see `loss`); they sum to 1 over the batch."""
        counted = motion_frames(batch)
        if "motion_mask" in batch:
            counted = counted & batch["motion_mask"]
        return frame_weights(counted, self.cfg.loss_weighting)

    @functools.cached_property
    def feature_weights(self) -> np.ndarray | None:
        """[161] weights of the x0 term: `placement_weight` on the bbox and camera features (where
        the body is in the frame), 1 on the rest; None when placement_weight is 1."""
        if self.cfg.placement_weight == 1.0:
            return None
        weights = np.ones(motion.MOTION_DIM, np.float32)
        weights[motion.BBOX.start : motion.CAMERA.stop] = self.cfg.placement_weight
        return weights

    def eval_step(self, params, batch: dict, key) -> dict:
        """Validation figures of one batch: x0 MSE (normalised units; 1.0 = predicting the mean)
        of `params` on the motion frames, with the training loss's masking and weighting
        (cfg.loss_weighting: by default the mean over all counted frames of the global batch).

        The noise (from `key`, one draw for the whole global batch, like `draw`) and the
        timesteps (EVAL_TIMESTEPS evenly spaced over [0, T), both ends included) are fixed
        by the arguments, so the same params give the same figures. No condition dropout.
        Returns scalars:
            val_x0_mse           mean over the timesteps
            val_x0_mse_t999      at t = T-1 alone (pure noise in: what the video alone tells)
            val_x0_mse_shuffled  mean over the timesteps with every example's video tokens
                                 (context positions included) those of the previous example
                                 (`roll_video`); its own masks and motion kept
        """
        noise = self._constrain(jax.random.normal(key, batch["motion"].shape, batch["motion"].dtype), sharding.BATCH)
        b = noise.shape[0]
        ts = jnp.asarray(space_timesteps(self.diffusion.num_steps, EVAL_TIMESTEPS), jnp.int32)

        def mse(args):
            t, shuffled = args
            video = jnp.where(shuffled, roll_video(batch)["video"], batch["video"])
            rand = {"t": jnp.full((b,), t), "noise": noise, "drop": jnp.zeros((b,), bool)}
            return self.loss(params, dict(batch, video=video), rand)[1]["mse"]

        # One compiled forward pass, mapped over (t, shuffled): [2, K].
        grid = jax.lax.map(mse, (jnp.tile(ts, 2), jnp.repeat(jnp.array([False, True]), len(ts))))
        grid = grid.reshape(2, len(ts))
        return {"val_x0_mse": grid[0].mean(), "val_x0_mse_t999": grid[0, -1], "val_x0_mse_shuffled": grid[1].mean()}

    def split_micro(self, tree):
        """[B, ...] -> [A, B/A, ...] for grad_accum = A: micro-batch a is rows a, a+A, a+2A, ...

        Strided, not blocked: with the batch sharded over data x fsdp (each device holding
        a contiguous block of rows), every micro-batch then takes B/(A*n) rows from every
        device, so the split moves no data between devices; the constraint keeps XLA from
        choosing another layout.
        """
        a = self.cfg.grad_accum

        def split(x):
            x = x.reshape(x.shape[0] // a, a, *x.shape[1:]).swapaxes(0, 1)
            return self._constrain(x, None, sharding.BATCH)

        return jax.tree.map(split, tree)

    def gradients(self, params, batch: dict, rand: dict):
        """((loss, terms), gradients) of the global batch, summed over its grad_accum micro-batches.

        The frames' loss weights are computed once on the global batch (`loss_weights`) and
        split with it, so each micro-batch contributes its share (by default its counted
        frames over the batch's): the sum is the one-big-batch loss and gradient, exactly
        (up to float round-off), whatever the frames each micro-batch holds.
        """
        weights = self.loss_weights(batch)
        grad_fn = jax.value_and_grad(self.loss, has_aux=True)
        if self.cfg.grad_accum == 1:
            return grad_fn(params, batch, rand, weights)
        micro = self.split_micro((batch, rand, weights))

        def accumulate(total, inputs):
            return jax.tree.map(jnp.add, total, grad_fn(params, *inputs)), None

        shapes = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro))
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        return jax.lax.scan(accumulate, zero, micro)[0]

    def train_step(self, state: dict, batch: dict) -> tuple[dict, dict]:
        """One optimiser step on the global batch (split into grad_accum micro-batches).

        A step whose loss or gradient norm is not finite changes nothing but `step` (params,
        EMA and optimiser state keep their values); its metrics say so: `finite` = 0,
        `loss_finite`, and `grad_leaf_finite` (one flag per parameter, in the order of
        `param_names`).
        """
        key = jax.random.fold_in(state["key"], state["step"])
        rand = self.draw(jax.random.fold_in(key, 0), batch)  # (the draws of earlier versions, for accum=1)
        (loss, terms), grads = self.gradients(state["params"], batch, rand)

        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new = {"params": params, "ema": ema_update(state["ema"], params, self.cfg.ema_decay), "opt_state": opt_state}
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
        new.update(step=state["step"] + 1, key=state["key"])
        metrics = {
            "loss": loss,
            **terms,
            "grad_norm": grad_norm,
            "finite": finite.astype(jnp.float32),
            "loss_finite": jnp.isfinite(loss).astype(jnp.float32),
            "grad_leaf_finite": jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]),
        }
        return new, metrics

    @functools.cached_property
    def jit_eval_step(self):
        """The pure eval step: EMA (or any) params, global batch and key in; figures replicated."""
        return jax.jit(
            self.eval_step,
            in_shardings=(self.state_sharding["params"], self.batch_sharding, sharding.replicated(self.mesh)),
            out_shardings=sharding.replicated(self.mesh),
        )

    @functools.cached_property
    def param_names(self) -> list[str]:
        """'/'-joined paths of the parameters, in the order of `grad_leaf_finite`."""
        paths = jax.tree_util.tree_flatten_with_path(self.abstract_state()["params"])[0]
        return ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in paths]

    @functools.cached_property
    def jit_train_step(self):
        """The pure train step: state (donated) and global batch in, explicit shardings."""
        return jax.jit(
            self.train_step,
            in_shardings=(self.state_sharding, self.batch_sharding),
            out_shardings=(self.state_sharding, sharding.replicated(self.mesh)),
            donate_argnums=0,
        )

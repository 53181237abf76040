"""The base configuration: the paper's training recipe. `configs/*.py` start from it.

Every key is documented here; command lines override any of them with
`--config.KEY=VALUE` (e.g. `--config.model.layout=frame`). `validate(cfg)` checks a
config before sabr-train and sabr-demo use it.
"""

import functools
import json
import math
import os

import ml_collections

from sabr_jax.data.route_oracle import ROUTE_TOKENS
from sabr_jax.diffusion.gaussian import LOSS_WEIGHTINGS, SAMPLING_METHODS
from sabr_jax.errors import UserError
from sabr_jax.model.attention import IMPLEMENTATIONS
from sabr_jax.model.dit_config import DTYPES, LAYOUTS, REMAT_POLICIES

# data.num_patches and model.video_dim follow from how the data was prepared (encoder, --pool).
# UNSET (0) leaves them to the data: with data.source='tfds' they are read from the prepared
# dataset (sabr_jax.data.sources.resolve_shapes, which the Trainer calls); otherwise (the
# in-memory synthetic source, a dry run without data) they are PAPER_SHAPES, DINOv2-L with
# registers at 280x490: 20x35 patch tokens of width 1024. A set value must match the dataset.
UNSET = 0
PAPER_SHAPES = {"data.num_patches": 700, "model.video_dim": 1024}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, data order and diffusion noise all derive from it
    c.total_steps = 100_000
    c.log_every = 100  # steps between console/TensorBoard/metrics.jsonl records
    c.checkpoint_every = 5_000  # steps between checkpoints (one is always written at the end)
    c.keep_checkpoints = 3  # the newest K checkpoints are kept
    c.eval_every = 0  # steps between validation figures (EMA params, held-out clips; in that step's record); 0: never. Also at the last step
    c.eval_batches = 2  # global batches of the validation split, drawn once, that every evaluation averages over
    # with eval_every > 0, WORKDIR/best holds the EMA parameters of the evaluation with the lowest validation x0 MSE
    c.early_stop_evals = 0  # > 0: stop once this many evaluations in a row found no lower validation x0 MSE
    c.export_from = "newest"  # what sabr-train --export and sabr-demo export: 'newest' (the last EMA) or 'best'
    c.batch_size = 16  # global batch, whatever the number of devices
    c.grad_accum = 1  # micro-batches per step (the global batch is split into them)
    c.ema_decay = 0.9999
    c.cond_drop_prob = 0.0  # > 0 trains the unconditional branch for classifier-free guidance
    # 'frame': the loss is the mean over every counted frame of the global batch (the paper's per-frame MSE: a clip
    # weighs in proportion to its frames); 'clip': each clip's mean over its frames, then the mean over clips
    c.loss_weighting = "frame"
    c.placement_weight = 1.0  # weight of the bbox and camera features (7 of 161) in the x0 loss; the rest weigh 1
    c.on_nonfinite = "stop"  # a step with a non-finite loss or gradient: 'stop' or 'skip' it
    c.max_consecutive_skips = 10  # on_nonfinite='skip': stop after this many non-finite steps in a row
    c.peak_flops_per_device = 0.0  # FLOP/s of one device for MFU (e.g. 989e12 for an H100 in bf16); 0: no MFU

    c.model = ml_collections.ConfigDict(
        dict(
            layout="slots",  # 'slots' (27 tokens per frame) or 'frame' (the authors' one token per frame)
            width=384,
            heads=6,
            depth=12,
            mlp_ratio=4.0,
            video_dim=UNSET,  # video-token width: the DINOv2 width (S 384, B 768, L 1024); UNSET (0): the dataset's (see UNSET)
            cross_window=0,  # slots layout: frame t cross-attends to the tokens of frames t-w..t+w
            cross_route=False,  # every frame also cross-attends to the route images' tokens (the first data.context_frames positions)
            route_adaln=False,  # the route images' tokens, pooled by attention to one vector, join the timestep in every adaLN
            patch_grid=(),  # (rows, cols) of the video tokens (DINOv2's 20x35; (10, 18) with --pool 2): a fixed 2D
            # sin-cos position is added to them, so that the model knows where a token is; () adds none (the authors' model)
            video_norm=False,  # standardise each channel of a frame's video tokens over its patches (what differs between them)
            cross_norm_affine=False,  # a learned scale and bias in the norm before the cross-attention (the authors': none)
            # cheaper video conditioning (docs/performance.md): N > 0 condenses each frame's tokens to N latents once
            # per forward (a resampler), so the blocks project keys/values from N tokens, not data.num_patches
            video_latents=0,
            kv_share=False,  # the two blocks of a pair share one video key/value projection (half the projections)
            dtype="bfloat16",  # compute dtype; parameters and optimiser state stay float32
            remat="full",  # per-block rematerialisation: 'none', 'full' or 'dots'
            attention="auto",  # attention kernel: 'auto' (per platform), 'xla', 'cudnn', 'splash'
        )
    )
    c.diffusion = ml_collections.ConfigDict(dict(num_steps=1000, beta_start=1e-4, beta_end=2e-2))
    c.sample = ml_collections.ConfigDict(
        dict(
            steps=250,  # respaced from diffusion.num_steps
            method="ddpm",  # 'ddpm' (learned variance) or 'ddim'
            eta=0.0,  # DDIM noise
            guidance_scale=1.0,  # classifier-free guidance; 1 = none (needs cond_drop_prob > 0 in training)
            # video keys/values computed once per video for the first K blocks, the others at every step:
            # 'all', 'none', an even block count K as a string (--config.sample.kv_cache=14), or 'auto': the
            # most that fit this device's memory (sabr_jax.diffusion.kv_cache.plan_kv_cache; sabr-sample --dry_run shows it)
            kv_cache="auto",
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=1e-4,
            schedule="constant",  # 'constant' or 'cosine' (decays to 0 at total_steps)
            warmup_steps=0,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            clip_norm=0.0,  # global gradient-norm clipping; 0 = none
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="synthetic",  # 'synthetic' (generated in memory) or 'tfds' (a prepared dataset in data.dir)
            dir="",
            max_frames=1100,  # time positions per example: context frames + motion window + padding
            context_frames=16,  # at most this many route frames are used as the prompt
            num_patches=UNSET,  # video tokens per frame (20x35 DINOv2 patches; 180 with sabr-prepare --pool 2); UNSET (0): the dataset's
            num_workers=0,  # Grain worker processes (0: read in the training process)
            # 'images': the route images' tokens; 'oracle': the route's hold centres as exact tokens instead, a
            # diagnosis of what the DiT learns when reading the route costs nothing (sabr_jax.data.route_oracle)
            route_tokens="images",
            train_clips=0,  # > 0: train on the first N clips of the train split only (data-scaling studies); 0: all
            num_clips=64,
            min_clip_frames=48,
            max_clip_frames=1200,  # synthetic source only
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices
    return c


def demo_config() -> ml_collections.ConfigDict:
    """A tiny model on the in-memory synthetic source (sabr_jax.data.synthetic_source): for tests and benchmarks."""
    c = base_config()
    c.total_steps = 400
    c.log_every = 50
    c.checkpoint_every = 200
    c.eval_every = 100
    c.batch_size = 8
    c.ema_decay = 0.99
    c.cond_drop_prob = 0.1
    c.model.update(width=64, heads=4, depth=4, video_dim=32, dtype="float32", remat="none", patch_grid=(2, 4))
    c.optim.update(lr=1e-3, warmup_steps=50, clip_norm=1.0)
    c.sample.update(steps=50)
    c.data.update(max_frames=32, context_frames=4, num_patches=8, num_clips=64, min_clip_frames=24, max_clip_frames=96)
    return c


def synthclimb_config(demo: bool = True) -> ml_collections.ConfigDict:
    """SynthClimb (sabr_jax.data.synthclimb.synth): `demo=True` is what sabr-demo runs (a tiny model, trains
    on 2 CPU cores in minutes); `demo=False` is configs/synthclimb.py, 512 walls and 6000 steps (docs/synthclimb.md: 115 min
    on the same CPU, shared with other work; about 1 h at its fastest step rate).

    The `synth` block says how sabr-demo writes and prepares the benchmark: clips (one wall
    each; train and validation are split by clip, so they never share a wall), frame size,
    route images per clip, and the encoder (a DINOv2 path, or seeded random weights).
    """
    c = base_config()
    c.synth = ml_collections.ConfigDict(
        dict(
            # walls; validation_fraction of them are held out. 512, not 128: at 2000 steps the demo's model
            # overfits 102 train walls and reads the route far better from 460 (docs/learning.md)
            clips=512,
            validation_fraction=0.1,
            size=(112, 196),  # video H, W in pixels
            holds=6,  # route holds per wall; the climb lasts 8 + 16 * (holds - 2) frames at 24 FPS
            encoder="random-tiny",  # a DINOv2-with-registers checkpoint path, or seeded random weights (random-tiny, random-s)
            encoder_size=(112, 196),  # encoder input H, W (multiples of 14): an 8x14 patch grid
            pool=2,  # sabr-prepare --pool: 2x2 average pooling of the patch tokens (8x14 -> 4x7 = 28 per frame)
            pan=False,  # slow camera pan/zoom
            mirror=False,  # sabr-prepare --mirror: the train walls' mirror images too
        )
    )
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 500
    c.export_from = "best"  # the EMA of the lowest validation x0 MSE (WORKDIR/train/best)
    c.checkpoint_every = 500
    c.placement_weight = 20.0
    c.batch_size = 8
    c.ema_decay = 0.995
    # video_dim and data.num_patches are left to the prepared dataset (they follow synth.encoder and synth.pool);
    # patch_grid follows synth.encoder_size and synth.pool (a mismatch is an error when training starts)
    c.model.update(
        layout="frame",
        width=64,
        heads=4,
        depth=4,
        dtype="float32",
        remat="none",
        patch_grid=(4, 7),
        cross_route=True,
        route_adaln=True,
        video_norm=True,
        cross_norm_affine=True,  # docs/synthclimb.md: without it the demo's model does not read the video in 2000 steps
    )
    c.optim.update(lr=1e-3, warmup_steps=100, clip_norm=1.0)
    c.sample.update(steps=50)
    c.data.update(source="tfds", max_frames=80, context_frames=2)
    if not demo:  # measured: docs/synthclimb.md, "The longer run"
        c.synth.update(clips=512, validation_fraction=0.1)
        c.total_steps = 6000
        c.eval_every = 1000
        c.checkpoint_every = 1000
        c.model.update(width=96, heads=4, depth=4)
        c.sample.update(steps=100)
    return c


def get_config(name: str = "synthclimb_demo") -> ml_collections.ConfigDict:
    """`--config path/to/sabr_jax/config.py:NAME` (how sabr-demo embeds its default)."""
    presets = {
        "base": base_config,
        "demo": demo_config,
        "synthclimb_demo": lambda: synthclimb_config(demo=True),
        "synthclimb": lambda: synthclimb_config(demo=False),
    }
    if name not in presets:
        raise ValueError(f"unknown config preset {name!r}; one of {sorted(presets)}")
    return presets[name]()


# Keys added after the first checkpoints were written, with the value that reproduces what a run
# written before them did: a saved config (a checkpoint's or an export's) that lacks one reads it so
# (`upgrade`), so that old exports keep loading and old checkpoints keep resuming.
ADDED_KEYS = {
    "model.cross_route": False,
    "model.route_adaln": False,
    "model.patch_grid": (),
    "model.video_norm": False,
    "model.cross_norm_affine": False,
    "model.video_latents": 0,
    "model.kv_share": False,
    "placement_weight": 1.0,
    "loss_weighting": "clip",  # each clip's mean over its frames, then the mean over clips
    "max_consecutive_skips": 10,
    "eval_every": 0,
    "eval_batches": 2,
    "early_stop_evals": 0,
    "export_from": "newest",
    "data.route_tokens": "images",
    "data.train_clips": 0,
}


def upgrade(saved: dict) -> dict:
    """A saved config (JSON dict) with every key of ADDED_KEYS it lacks set to its old value."""
    saved = json.loads(json.dumps(saved))  # a copy
    for key, value in ADDED_KEYS.items():
        *groups, name = key.split(".")
        section = saved
        for group in groups:
            section = section.setdefault(group, {})
        section.setdefault(name, list(value) if isinstance(value, tuple) else value)
    return saved


# What validate() checks: keys with a fixed set of values (those of the modules that act on them),
# integer keys >= 1 and >= 0.
CHOICES = {
    "on_nonfinite": ("stop", "skip"),
    "export_from": ("newest", "best"),
    "loss_weighting": LOSS_WEIGHTINGS,
    "model.layout": LAYOUTS,
    "model.dtype": DTYPES,
    "model.remat": tuple(REMAT_POLICIES),
    "model.attention": ("auto", *IMPLEMENTATIONS),
    "sample.method": SAMPLING_METHODS,
    "optim.schedule": ("constant", "cosine"),
    "data.source": ("synthetic", "tfds"),
    "data.route_tokens": ROUTE_TOKENS,
}
POSITIVE_INTS = (
    "total_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_batches",
    "batch_size",
    "grad_accum",
    "max_consecutive_skips",
    "model.width",
    "model.heads",
    "model.depth",
    "diffusion.num_steps",
    "sample.steps",
    "data.max_frames",
    "data.num_clips",
    "data.min_clip_frames",
    "data.max_clip_frames",
)
NON_NEGATIVE_INTS = (
    "eval_every",
    "early_stop_evals",
    "model.cross_window",
    "model.video_latents",
    "optim.warmup_steps",
    "data.context_frames",
    "data.num_workers",
    "data.train_clips",
    *PAPER_SHAPES,
)  # (0: UNSET)


def shape_mismatches(cfg: ml_collections.ConfigDict, num_patches: int, video_dim: int, whose: str) -> list[str]:
    """What differs between the token shapes cfg sets (data.num_patches, model.video_dim, model.patch_grid;
    UNSET ones take the tokens') and tokens of `num_patches` per frame, `video_dim` wide; `whose` names
    them in the messages ("the dataset's"). Empty when they fit."""
    problems = []
    if cfg.data.num_patches and cfg.data.num_patches != num_patches:
        problems.append(f"data.num_patches={cfg.data.num_patches} but {whose} tokens are {num_patches} per frame")
    if cfg.model.video_dim and cfg.model.video_dim != video_dim:
        problems.append(f"model.video_dim={cfg.model.video_dim} but {whose} tokens are {video_dim} wide")
    grid = tuple(cfg.model.patch_grid or ())
    if grid and math.prod(grid) != num_patches:
        problems.append(
            f"model.patch_grid={grid} has {math.prod(grid)} positions but {whose} tokens are {num_patches} per frame"
        )
    return problems


def validate(cfg: ml_collections.ConfigDict, *, data_dir: bool = True) -> ml_collections.ConfigDict:
    """Return cfg if its values are valid; else raise UserError naming the key, its value and
    what is expected. data_dir=False skips the check that data.source='tfds' has an existing
    data.dir (a dry run reads no data; sabr-demo writes its own)."""
    g, expect = _checker(cfg)
    validate_model(cfg)
    for key in (*CHOICES, *POSITIVE_INTS, *NON_NEGATIVE_INTS):
        _check_value(g, expect, key)
    expect(
        g("sample.steps") <= g("diffusion.num_steps"),
        "sample.steps",
        f"at most diffusion.num_steps={g('diffusion.num_steps')}",
    )
    expect(
        g("data.context_frames") < g("data.max_frames"),
        "data.context_frames",
        f"fewer than data.max_frames={g('data.max_frames')}",
    )
    expect(
        g("data.min_clip_frames") <= g("data.max_clip_frames"),
        "data.min_clip_frames",
        f"at most data.max_clip_frames={g('data.max_clip_frames')}",
    )
    expect(
        g("data.route_tokens") == "images" or g("data.source") == "tfds",
        "data.route_tokens",
        "'images' with data.source='synthetic' (the oracle reads the holds.json of prepared clips)",
    )
    expect(0 <= g("ema_decay") <= 1, "ema_decay", "a number in [0, 1]")
    expect(0 <= g("cond_drop_prob") < 1, "cond_drop_prob", "a probability in [0, 1)")
    expect(g("optim.lr") > 0, "optim.lr", "a number > 0")
    expect(
        0 < g("diffusion.beta_start") <= g("diffusion.beta_end") < 1,
        "diffusion.beta_start",
        f"0 < diffusion.beta_start <= diffusion.beta_end={g('diffusion.beta_end')} < 1",
    )
    sizes = [g(f"mesh.{axis}") for axis in ("data", "fsdp", "tensor")]
    expect(
        all(_is_int(s) and (s >= 1 or s == -1) for s in sizes) and sizes.count(-1) <= 1,
        "mesh",
        "data, fsdp and tensor sizes >= 1, at most one of them -1 (all remaining devices)",
    )
    if data_dir and g("data.source") == "tfds":
        expect(
            bool(g("data.dir")),
            "data.dir",
            "the --data_dir of sabr-prepare, as data.source='tfds' reads a prepared dataset",
        )
        expect(os.path.isdir(g("data.dir")), "data.dir", "an existing folder: the --data_dir of sabr-prepare")
    return cfg


def validate_model(cfg: ml_collections.ConfigDict) -> None:
    """The part of `validate` that the model's keys need (sabr_jax.model.factory checks it
    before it builds a model): UserError naming the key, its value and what is expected."""
    g, expect = _checker(cfg)
    for key in MODEL_KEYS:
        _check_value(g, expect, key)
    expect(g("model.width") % g("model.heads") == 0, "model.width", f"a multiple of model.heads={g('model.heads')}")
    expect(g("model.depth") % 2 == 0, "model.depth", "an even number (spatial/temporal block pairs)")
    expect(
        g("model.cross_window") == 0 or g("model.layout") == "slots",
        "model.cross_window",
        "0 with model.layout='frame'",
    )
    grid = g("model.patch_grid")
    expect(
        grid in ((), None)
        or (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(_is_int(v) and v >= 1 for v in grid)),
        "model.patch_grid",
        "() or (rows, cols) of integers >= 1",
    )
    expect(
        g("data.context_frames") >= 1 or not (g("model.cross_route") or g("model.route_adaln")),
        "data.context_frames",
        ">= 1 with model.cross_route or model.route_adaln (they read the route images)",
    )


MODEL_KEYS = tuple(f"model.{key}" for key in base_config().model)


def _check_value(g, expect, key: str) -> None:
    """The check of CHOICES, POSITIVE_INTS or NON_NEGATIVE_INTS that `key` has, if any."""
    if key in CHOICES:
        expect(g(key) in CHOICES[key], key, "one of " + ", ".join(map(repr, CHOICES[key])))
    elif key in POSITIVE_INTS:
        expect(_is_int(g(key)) and g(key) >= 1, key, "an integer >= 1")
    elif key in NON_NEGATIVE_INTS:
        expect(_is_int(g(key)) and g(key) >= 0, key, "an integer >= 0")


def _checker(cfg: ml_collections.ConfigDict):
    """(get, expect): cfg's value at a dotted key, and a check raising UserError with that value."""
    g = functools.partial(_get, cfg)

    def expect(ok: bool, key: str, expected: str) -> None:
        if not ok:
            value = g(key)
            raise UserError(
                f"config.{key}={value.to_dict() if hasattr(value, 'to_dict') else value!r}: expected {expected}"
            )

    return g, expect


def _get(cfg: ml_collections.ConfigDict, key: str):
    """cfg's value at a dotted key; UserError if the config lacks it."""
    value = cfg
    for part in key.split("."):
        if part not in value:
            raise UserError(f"config.{key} is missing (every config starts from sabr_jax.config.base_config())")
        value = value[part]
    return value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

"""The base configuration: the paper's training recipe. `configs/*.py` start from it.

Every key is documented here; command lines override any of them with
`--config.KEY=VALUE` (e.g. `--config.model.layout=frame`).
"""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # parameters, data order and diffusion noise all derive from it
    c.total_steps = 100_000
    c.log_every = 100  # steps between console/TensorBoard/metrics.jsonl records
    c.checkpoint_every = 5_000  # steps between checkpoints (one is always written at the end)
    c.keep_checkpoints = 3  # the newest K checkpoints are kept
    c.eval_every = 0  # steps between validation figures (EMA params, held-out clips; in that step's record); 0: never. Also at the last step
    c.eval_batches = 2  # global batches of the validation split, drawn once, that every evaluation averages over
    c.batch_size = 16  # global batch, whatever the number of devices
    c.grad_accum = 1  # micro-batches per step (the global batch is split into them)
    c.ema_decay = 0.9999
    c.cond_drop_prob = 0.0  # > 0 trains the unconditional branch for classifier-free guidance
    c.placement_weight = 1.0  # weight of the bbox and camera features (7 of 161) in the x0 loss; the rest weigh 1
    c.on_nonfinite = "stop"  # a step with a non-finite loss or gradient: 'stop' or 'skip' it
    c.peak_flops_per_device = 0.0  # FLOP/s of one device for MFU (e.g. 989e12 for an H100 in bf16); 0: no MFU

    c.model = ml_collections.ConfigDict(dict(
        layout="slots",  # 'slots' (27 tokens per frame) or 'frame' (the authors' one token per frame)
        width=384, heads=6, depth=12, mlp_ratio=4.0,
        video_dim=384,  # video-token width: the DINOv2 width (S 384, B 768, L 1024)
        cross_window=0,  # slots layout: frame t cross-attends to the tokens of frames t-w..t+w
        cross_route=False,  # every frame also cross-attends to the route images' tokens (the first data.context_frames positions)
        route_adaln=False,  # the route images' tokens, pooled by attention to one vector, join the timestep in every adaLN
        patch_grid=(),  # (rows, cols) of the video tokens (DINOv2's 20x35; (10, 18) with --pool 2): a fixed 2D
        # sin-cos position is added to them, so that the model knows where a token is; () adds none (the authors' model)
        video_norm=False,  # standardise each channel of a frame's video tokens over its patches (what differs between them)
        dtype="bfloat16",  # compute dtype; parameters and optimiser state stay float32
        remat="full",  # per-block rematerialisation: 'none', 'full' or 'dots'
        attention="auto",  # attention kernel: 'auto' (per platform), 'xla', 'cudnn', 'splash'
    ))
    c.diffusion = ml_collections.ConfigDict(dict(num_steps=1000, beta_start=1e-4, beta_end=2e-2))
    c.sample = ml_collections.ConfigDict(dict(
        steps=250,  # respaced from diffusion.num_steps
        method="ddpm",  # 'ddpm' (learned variance) or 'ddim'
        eta=0.0,  # DDIM noise
        guidance_scale=1.0,  # classifier-free guidance; 1 = none (needs cond_drop_prob > 0 in training)
        cache_kv=True,  # compute the video keys/values once per video (more memory, much faster)
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, schedule="constant",  # 'constant' or 'cosine' (decays to 0 at total_steps)
        warmup_steps=0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
        clip_norm=0.0,  # global gradient-norm clipping; 0 = none
    ))
    c.data = ml_collections.ConfigDict(dict(
        source="synthetic",  # 'synthetic' (generated in memory) or 'tfds' (a prepared dataset in data.dir)
        dir="",
        max_frames=1100,  # time positions per example: context frames + motion window + padding
        context_frames=16,  # at most this many route frames are used as the prompt
        num_patches=700,  # video tokens per frame (20x35 DINOv2 patches; 180 with sabr-prepare --pool 2)
        num_workers=0,  # Grain worker processes (0: read in the training process)
        num_clips=64, min_clip_frames=48, max_clip_frames=1200,  # synthetic source only
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: all remaining devices
    return c


def demo_config() -> ml_collections.ConfigDict:
    """A tiny model on the in-memory synthetic source (sabr_jax.data.synthetic): for tests and benchmarks."""
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
    """SynthClimb (sabr_jax.data.synth): `demo=True` is what sabr-demo runs (a tiny model, trains
    on 2 CPU cores in minutes); `demo=False` is configs/synthclimb.py, about an hour on the same CPU.

    The `synth` block says how sabr-demo writes and prepares the benchmark: clips (one wall
    each; train and validation are split by clip, so they never share a wall), frame size,
    route images per clip, and the encoder (a DINOv2 path, or seeded random weights).
    """
    c = base_config()
    c.synth = ml_collections.ConfigDict(dict(
        clips=128,  # walls; validation_fraction of them are held out
        validation_fraction=0.2,
        size=(112, 196),  # video H, W in pixels
        holds=6,  # route holds per wall; the climb lasts 8 + 16 * (holds - 2) frames at 24 FPS
        encoder="random-tiny",  # a DINOv2-with-registers checkpoint path, or seeded random weights (random-tiny, random-s)
        encoder_size=(112, 196),  # encoder input H, W (multiples of 14): an 8x14 patch grid
        pool=2,  # sabr-prepare --pool: 2x2 average pooling of the patch tokens (8x14 -> 4x7 = 28 per frame)
        pan=False,  # slow camera pan/zoom
    ))
    c.total_steps = 2000
    c.log_every = 100
    c.eval_every = 500
    c.checkpoint_every = 500
    c.placement_weight = 20.0
    c.batch_size = 8
    c.ema_decay = 0.995
    c.model.update(layout="frame", width=64, heads=4, depth=4, video_dim=32, dtype="float32", remat="none", patch_grid=(4, 7),
                   cross_route=True, route_adaln=True, video_norm=True)
    c.optim.update(lr=1e-3, warmup_steps=100, clip_norm=1.0)
    c.sample.update(steps=50)
    c.data.update(source="tfds", max_frames=80, context_frames=2, num_patches=28)
    if not demo:  # about an hour on 2 CPU cores (estimated from the demo's step time; not yet run)
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
        "base": base_config, "demo": demo_config,
        "synthclimb_demo": lambda: synthclimb_config(demo=True), "synthclimb": lambda: synthclimb_config(demo=False),
    }
    if name not in presets:
        raise ValueError(f"unknown config preset {name!r}; one of {sorted(presets)}")
    return presets[name]()

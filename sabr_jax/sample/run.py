"""What `sabr-sample` does (the command line and its documentation: sabr_jax.cli.sample).

    sample_video(CHECKPOINT, VIDEO, OUT, route_color="cyan")

Stages, each announced by a line of `log`: load the export and its encoder settings;
decode and encode the video (sabr_jax.sample.inputs); make the route images (--context or
--route_color, sabr_jax.sample.route_color) and encode them; read the tracks to complete
(--complete); sample each motion with the jitted sampler; write each sample's files
(sabr_jax.sample.outputs), the overlay with a progress bar.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from sabr_jax.body import smpl
from sabr_jax.data import tracks as tr
from sabr_jax.data import video as vid
from sabr_jax.encoders.frames import FrameEncoder, make_encoder
from sabr_jax.errors import UserError
from sabr_jax.sample import export, inputs, outputs
from sabr_jax.sample.route_color import parse_colour, route_context, spread

ROUTE_DIR = "route"  # OUT/<this>/<c>.png: the route images --route_color made


@contextlib.contextmanager
def _input_errors():
    """A video or tracks file that cannot be used is the user's input: a one-line UserError."""
    try:
        yield
    except (vid.VideoError, tr.TrackError) as error:
        raise UserError(str(error)) from None


def sample_video(
    checkpoint: str,
    video: str,
    out: str,
    *,
    context: str | None = None,
    route_color: str | None = None,
    samples: int = 1,
    steps: int | None = None,
    method: str | None = None,
    guidance: float | None = None,
    complete: str | None = None,
    keep_seconds: float | None = None,
    smpl_path: str | None = None,
    encoder: str | None = None,
    seed: int = 0,
    log: Callable[[str], object] = print,
) -> list[str]:
    """Sample `samples` motions for `video` and write OUT (sabr_jax.sample.outputs.LAYOUT);
    returns the sample folders. Arguments as sabr-sample's flags (sabr_jax.cli.sample)."""
    start = time.time()
    export_dir = export.find_export(checkpoint)
    log(f"[1/5] loading {export_dir}")
    model = export.load(export_dir, steps, method, guidance)
    cfg = model.cfg
    if cfg.data.route_tokens != "images":
        raise UserError(
            f"{export_dir} was trained with data.route_tokens={cfg.data.route_tokens!r} (a diagnosis: the route as "
            "exact tokens from holds.json): it cannot sample from a video's route images"
        )
    settings = export.encoder_settings(model.meta, cfg, encoder)
    rgb = parse_colour(route_color) if route_color is not None else None
    with _input_errors():
        info = vid.probe(video)
    body = smpl.load_or_builtin(smpl_path)
    log(f"      {body.description}")
    log(f"      encoder {settings.encoder} (seed {settings.seed}, pool {settings.pool}, {settings.precision})")
    frame_encoder = FrameEncoder(make_encoder(settings), settings)
    frame_hw = vid.oriented(settings.frame_size, info["height"], info["width"])
    inputs.check_tokens(
        cfg,
        frame_encoder.video_dim,
        frame_encoder.pooled_grid(frame_hw),
        f"the encoder {settings.encoder} (pool {settings.pool}, encoder_size {settings.encoder_size})",
    )
    images = None
    if context is not None:
        with _input_errors():
            names, images, _ = vid.read_context(context, settings.frame_size, cfg.data.context_frames)
        if not names:
            raise UserError(f"--context={context}: no .png route image in it")
    num_context = len(images) if images is not None else cfg.data.context_frames if rgb else 0
    if num_context == 0 and (cfg.model.cross_route or cfg.model.route_adaln):
        raise UserError("this model reads route images: give --context DIR or --route_color COLOR")

    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".frames-") as spool:  # the decoded frames, both sizes
        log(f"[2/5] encoding {video} ({info['width']}x{info['height']} upright, {info['fps'] or '?'} FPS)")
        started = time.time()
        with _input_errors():
            encoded = inputs.encode_video(video, settings, frame_encoder, cfg.data.max_frames - num_context, spool)
        frames = len(encoded.tokens)
        if frames == 0:
            raise UserError(f"{video}: no frame decoded")
        if frames < settings.min_frames:
            raise UserError(
                f"{video}: {frames} frame{'s' * (frames > 1)} at {settings.fps} FPS ({frames / settings.fps:.2f} s), "
                f"too short to sample: the model needs at least {settings.min_frames} "
                f"({settings.min_frames / settings.fps:.2f} s), the shortest clip sabr-prepare let into its training "
                "data (--min_frames)"
            )
        total = encoded.stats["output_frames"]
        if total > frames:
            log(
                f"      WARNING: the video lasts {total / settings.fps:.1f} s ({total} frames) but the model takes at most "
                f"{frames} frames after {num_context} route images: only its first {frames / settings.fps:.1f} s are used"
            )
        log(f"      {frames} frames at {settings.fps} FPS encoded ({time.time() - started:.1f} s)")

        log(f"[3/5] route images: {num_context}")
        route_tokens = np.zeros((0, *encoded.tokens.shape[1:]), np.float32)
        if rgb:
            images = route_context(
                encoded.frames[spread(frames, num_context)],
                rgb,
                route_color,
                lambda line: log(f"      WARNING: {line}"),
            )
            os.makedirs(os.path.join(out, ROUTE_DIR), exist_ok=True)
            for c, image in enumerate(images):
                Image.fromarray(image).save(os.path.join(out, ROUTE_DIR, f"{c:03d}.png"))
            log(f"      the holds of colour {route_color}, saved in {os.path.join(out, ROUTE_DIR)}")
        if images is not None:
            route_tokens = inputs.encode_images(images, frame_encoder)

        motion = known = None
        if complete is not None:
            keep = round(keep_seconds * settings.fps)
            with _input_errors():
                motion, known = inputs.known_motion(complete, video, encoded, keep, settings.frame_tolerance)
            log(f"[4/5] completing {complete}: {known.sum()} of the first {keep} frames kept from the tracks")
            if known.sum() < keep:
                log(f"      {keep - known.sum()} of them are sampled: the tracker did not see the climber there")
        batch = inputs.make_batch(encoded.tokens, route_tokens, cfg, model.stats, motion, known)
        completion = (batch.pop("known"), batch.pop("known_mask")) if known is not None else (None, None)

        log(
            f"[4/5] sampling {samples} x {cfg.sample.steps} {cfg.sample.method} steps (guidance {cfg.sample.guidance_scale}) on {batch['frame_mask'].shape[1]} positions"
        )
        folders = []
        for k in range(samples):
            started = time.time()
            (normalised,) = model.sampler(
                model.params, batch, jax.random.fold_in(jax.random.PRNGKey(seed), k), *completion
            )
            raw = model.stats.denormalize(normalised)
            if known is not None:
                raw[known] = motion[known]  # exactly the tracker's values, not their normalised round trip
            log(f"      sample {k}: {time.time() - started:.1f} s")
            folder = os.path.join(out, f"sample_{k}")
            arrays = outputs.motion_arrays(raw, encoded.image_hw, settings.fps, known)
            with tqdm(total=frames, desc=f"[5/5] sample_{k}/overlay.mp4", unit="frame") as bar:
                outputs.write_sample(
                    folder, arrays, body, encoded.source_frames, lambda done, _: bar.update(done - bar.n)
                )
            folders.append(folder)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            f"# sabr-sample output\n\nvideo {os.path.abspath(video)}, export {os.path.abspath(export_dir)}\n\n```\n{outputs.LAYOUT}```\n"
        )
    log(f"done in {time.time() - start:.0f} s: {', '.join(folders)} (layout: {os.path.join(out, 'README.md')})")
    return folders

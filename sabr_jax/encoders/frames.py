"""sabr-prepare's encoder: the frozen DINOv2 the settings name, run over a clip's frames in
fixed-size batches split over the host's local devices, with decoding overlapping encoding.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sabr_jax.data import video as vid
from sabr_jax.data.prepare.settings import Settings
from sabr_jax.encoders.dinov2 import PATCH, RANDOM_ENCODERS


def make_encoder(settings: Settings):
    """The frozen DINOv2 the settings name: a checkpoint path or a seeded random one."""
    import jax
    import jax.numpy as jnp

    from sabr_jax.encoders import dinov2

    dtype_name = settings.encoder_dtype
    if dtype_name == "auto":
        dtype_name = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dtype = jnp.dtype(dtype_name)
    if settings.encoder in RANDOM_ENCODERS:
        size = settings.encoder.split("-", 1)[1]
        if size == "tiny":  # tests and the CPU demo: Dv = 32 like configs/demo.py
            size = dinov2.Dinov2Config(width=32, depth=2, num_heads=2)
        return dinov2.random_encoder(size, seed=settings.seed, dtype=dtype)
    return dinov2.load(settings.encoder, dtype=dtype)


class FrameEncoder:
    """uint8 frames -> (pooled) patch tokens, in fixed-size batches split over local devices.

    Batches are padded to one shape (one compilation). Dispatch is asynchronous: the
    previous batch is fetched from the device only after the next one is launched, so
    decoding overlaps encoding.
    """

    def __init__(self, encoder, settings: Settings):
        import jax
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        self.encoder, self.settings = encoder, settings
        devices = jax.local_devices()
        self.batch = -(-settings.batch_size // len(devices)) * len(devices)
        self.video_dim = encoder.config.width
        if len(devices) > 1:
            mesh = Mesh(np.array(devices), ("data",))
            self.sharding = NamedSharding(mesh, PartitionSpec("data"))
            encoder.state = jax.device_put(encoder.state, NamedSharding(mesh, PartitionSpec()))
        else:
            self.sharding = devices[0]
        self.calls = 0

    def grid(self, frame_hw: tuple[int, int]) -> tuple[int, int]:
        h, w = vid.oriented(self.settings.encoder_size, *frame_hw)
        return h // PATCH, w // PATCH

    def pooled_grid(self, frame_hw) -> tuple[int, int]:
        gh, gw = self.grid(frame_hw)
        p = self.settings.pool
        return -(-gh // p), -(-gw // p)

    def _launch(self, frames: np.ndarray):
        import jax

        from sabr_jax.encoders import dinov2

        n = len(frames)
        if n < self.batch:
            frames = np.concatenate([frames, np.zeros((self.batch - n, *frames.shape[1:]), np.uint8)])
        size = vid.oriented(self.settings.encoder_size, *frames.shape[1:3])
        pixels = dinov2.preprocess(jax.device_put(frames, self.sharding), size=size)
        self.calls += 1
        return self.encoder(pixels)["patch_tokens"], n, frames.shape[1:3]

    def _fetch(self, launched) -> np.ndarray:
        tokens, n, hw = launched
        tokens = np.asarray(tokens[:n], dtype=np.float32)
        return vid.pool_tokens(tokens, self.grid(hw), self.settings.pool)[0]

    def stream(self, frames, sink: Callable[[np.ndarray], None]) -> None:
        """Encode an iterable of uint8 [h, w, 3] frames; `sink` gets token batches in order."""
        pending, batch = None, []
        for frame in frames:
            batch.append(frame)
            if len(batch) == self.batch:
                launched = self._launch(np.stack(batch))
                batch = []
                if pending is not None:
                    sink(self._fetch(pending))
                pending = launched
        if batch:
            launched = self._launch(np.stack(batch))
            if pending is not None:
                sink(self._fetch(pending))
            pending = launched
        if pending is not None:
            sink(self._fetch(pending))

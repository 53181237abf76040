"""What `sabr-prepare` makes of the clips: `Settings`, checked when made, and the fingerprint
of a prepared clip (a change of it re-encodes the clip)."""

from __future__ import annotations

import dataclasses
import os

from sabr_jax.data import video as vid
from sabr_jax.data.store import prepared as prep
from sabr_jax.encoders.dinov2 import PATCH, RANDOM_ENCODERS
from sabr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Settings:
    """sabr-prepare's settings (its flags of the same names say more); UserError when one is invalid."""

    encoder: str  # a checkpoint path or one of RANDOM_ENCODERS
    precision: str = "bfloat16"  # token storage: 'bfloat16' or 'float32'
    pool: int = 1  # 1: all 20x35 patches; 2: 2x2 average pooling (ceil mode, 10x18)
    fps: int = vid.OUTPUT_FPS
    frame_size: tuple[int, int] = vid.FRAME_SIZE  # landscape (H, W) of the decoded frames
    encoder_size: tuple[int, int] = (280, 490)  # landscape (H, W) of the encoder input
    frame_tolerance: int = 0  # accepted |track frames - video frames|
    max_seconds: float = 45.0  # longer clips are cut into equal parts no longer than this
    min_frames: int = 12  # clips with fewer frames showing the climber are skipped
    # a frame with unusable tracker values (NaN, inf) is masked like a tracker-lost one; a clip where more than
    # this fraction of the climber's detected frames are so is skipped
    max_bad_fraction: float = 0.5
    context_frames: int = 16  # route images kept per clip (natural name order); more are dropped, with a warning
    validation_fraction: float = 0.1
    split_seed: int = 0
    batch_size: int = 16  # frames per encoder call (rounded up to a multiple of the local devices)
    encoder_dtype: str = "auto"  # 'auto' (bfloat16 on accelerators, float32 on CPU), 'float32', 'bfloat16'
    seed: int = 0  # for random encoders
    mirror: bool = False  # also prepare each train clip's left-right mirror image, <clip_id>.mirror, in train only

    def __post_init__(self):
        if self.encoder not in RANDOM_ENCODERS and not os.path.exists(self.encoder):
            raise UserError(
                f"encoder {self.encoder}: no such file or folder; expected DINOv2-with-registers weights (a HuggingFace "
                f"folder, a .safetensors file or a torch-hub .pth) or one of {', '.join(RANDOM_ENCODERS)}"
            )
        if self.precision not in prep.DTYPES:
            raise UserError(f"precision {self.precision!r}: expected one of {sorted(prep.DTYPES)}")
        if self.pool < 1:
            raise UserError(f"pool must be >= 1, got {self.pool}")
        for h in self.encoder_size:
            if h % PATCH:
                raise UserError(f"encoder_size must be multiples of {PATCH}, got {self.encoder_size}")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if not 0 <= self.max_bad_fraction <= 1:
            raise UserError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.context_frames < 0:
            raise UserError(f"context_frames must be >= 0, got {self.context_frames}")
        for name in ("fps", "max_seconds", "batch_size"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name} must be > 0, got {getattr(self, name)}")

    def clip_fingerprint(self) -> dict:
        """What a prepared clip depends on: a change re-encodes it (so does a new prepared-clip
        format, sabr_jax.data.store.prepared.FORMAT)."""
        encoder = self.encoder if self.encoder in RANDOM_ENCODERS else os.path.abspath(self.encoder)
        return {
            "encoder": encoder,
            "seed": self.seed if self.encoder in RANDOM_ENCODERS else None,
            "precision": self.precision,
            "pool": self.pool,
            "fps": self.fps,
            "frame_size": list(self.frame_size),
            "encoder_size": list(self.encoder_size),
            "frame_tolerance": self.frame_tolerance,
            "context_frames": self.context_frames,
            "format": prep.FORMAT,
        }

"""SABR-S: width 384, 6 heads, 12 blocks, on DINOv2-S tokens (the paper's small model)."""

from sabr_jax.config import base_config


def get_config():
    c = base_config()
    c.model.update(width=384, heads=6, depth=12, video_dim=384)
    return c

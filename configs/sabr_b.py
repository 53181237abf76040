"""SABR-B: width 768, 12 heads, 12 blocks, on DINOv2-B tokens."""

from sabr_jax.config import base_config


def get_config():
    c = base_config()
    c.model.update(width=768, heads=12, depth=12, video_dim=768)
    return c

"""SABR-L: width 1024, 16 heads, 24 blocks, on DINOv2-L tokens (the paper's model, ~600M parameters)."""

from sabr_jax.config import base_config


def get_config():
    c = base_config()
    c.model.update(width=1024, heads=16, depth=24, video_dim=1024)
    return c

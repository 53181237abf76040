"""The embedded default (what sabr-demo runs): a tiny model on synthetic clips, trains on 2 CPU cores in minutes."""

from sabr_jax.config import demo_config


def get_config():
    return demo_config()

"""SynthClimb, the longer run (about an hour on 2 CPU cores): more walls, a wider model, more steps.

    sabr-demo --config configs/synthclimb.py --workdir runs/synthclimb
"""

from sabr_jax.config import synthclimb_config


def get_config():
    return synthclimb_config(demo=False)

"""SynthClimb, the longer run (1-2 h on 2 CPU cores; docs/synthclimb.md): more walls, a wider model, more steps.

sabr-demo --config configs/synthclimb.py --workdir runs/synthclimb
"""

from sabr_jax.config import synthclimb_config


def get_config():
    return synthclimb_config(demo=False)

"""A tiny model on the in-memory synthetic source (sabr_jax.data.synthetic_source): tests, benchmarks, dry runs.

sabr-demo's embedded default is the SynthClimb demo (`sabr_jax/config.py:synthclimb_demo`, a model of the
same size trained on prepared SynthClimb walls); configs/synthclimb.py is its longer run.
"""

from sabr_jax.config import demo_config


def get_config():
    return demo_config()

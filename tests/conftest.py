"""Test set-up: JAX on the CPU (libtpu, when installed for ahead-of-time compiles, stays quiet)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from sample_clip import wall  # noqa: E402,F401  (the fixture, shared by the sampling tests)

"""Test set-up: JAX on the CPU (libtpu, when installed for ahead-of-time compiles, stays quiet)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

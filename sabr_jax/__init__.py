"""sabr_jax: a JAX/Flax reimplementation of SABR-CLIMB, a video-to-motion diffusion transformer."""

__version__ = "0.1.0"

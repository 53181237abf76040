"""The model: the SABR-CLIMB diffusion transformer (`dit`), its layers, attention kernels and
frame-aligned cross-attention, its hyperparameters (`dit_config`) and the one builder from a run
config (`factory`)."""

"""Data: the one input pipeline (`pipeline`: windows, padding, masks, batches) and its clip
sources (`sources`, `synthetic_source`), video decoding (`video`) and tracker files (`tracks`),
the stored dataset (`store/`), clips to a dataset (`prepare/`) and SynthClimb (`synthclimb/`)."""

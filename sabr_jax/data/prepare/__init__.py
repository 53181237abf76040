"""Clips to a dataset (what `sabr-prepare` runs): the settings (`settings`) and the run (`build`):
decode, encode with DINOv2, motion vectors from the tracks, split by clip, the TFDS dataset."""

"""Frozen video encoders: DINOv2 with registers in Flax (`dinov2`, its model, checkpoint loader
and resize), and the encoder run over video frames in batches (`frames`)."""

"""The diffusion: the Gaussian schedule and its math (`gaussian`: q_sample, posterior, hybrid
loss, reverse steps), the jitted samplers with completion and guidance (`sampling`), and the
sampler's video key/value cache plan (`kv_cache`)."""

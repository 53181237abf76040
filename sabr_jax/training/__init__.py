"""Training: the train state and the pure sharded step (`trainer`), the loop with its guards
(`loop`), Orbax checkpoints and exports (`checkpoint`), the workdir lock, the metrics log and the
ahead-of-time dry run (`dry_run`)."""

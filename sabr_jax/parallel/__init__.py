"""Parallelism: the device mesh and the one table of sharding rules (`sharding`), joining a
multi-host job (`distributed`), and what a program costs in FLOPs and bytes (`flops`)."""

"""Evaluation: the paper's movement and route-adherence metrics (metrics), `sabr-eval` (evaluate), figures (plots)."""

"""Evaluation: the paper's movement and route-adherence metrics (`metrics`), the held-out table of
an export against the baselines (`evaluate`, what `sabr-eval` runs) and figures (`plots`)."""

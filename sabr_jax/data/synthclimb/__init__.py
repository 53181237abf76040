"""SynthClimb, the procedural climbing benchmark: walls and holds (`wall`), the climber's IK
motion along the route (`climber`), clips in the user's layout (`synth`), and the demo's
benchmark (`benchmark`: walls written and prepared from a config)."""

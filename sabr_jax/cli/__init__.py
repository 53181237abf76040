"""The console scripts (sabr-train, sabr-demo, sabr-synth, sabr-prepare, sabr-eval, sabr-sample):
the only modules that define absl flags. `console` is what they share: `--verbose`, and input
errors printed as one line."""

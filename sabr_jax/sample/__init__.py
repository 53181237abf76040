"""Sampling a climb for a video (what `sabr-sample` runs): an export loaded (`export`), the
video and route images made into the model's batch (`inputs`), route images from a hold colour
(`route_color`), the run itself (`run`) and each sample's files (`outputs`)."""

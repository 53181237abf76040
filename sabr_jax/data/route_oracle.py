"""A diagnosis, not an input a user has: the route given to the model as exact tokens.

With `data.route_tokens='oracle'` the route images' tokens of every clip are replaced by tokens
that state the route exactly, through the same interface (the context positions, [C, P, Dv]):
token k of each context frame encodes the k-th route hold in climbing order (its centre as
fractions of the frame, x / W and y / H, in Fourier features), the other P - K tokens are zero.
The video frames' tokens are unchanged. A model trained so shows how well the DiT learns the
route -> climb mapping in a budget when reading the route costs nothing: the bound that the
route images' tokens are measured against (docs/synthclimb.md). It needs holds.json
annotations (SynthClimb has them); holds are taken in frame 0's view.
"""

from __future__ import annotations

import numpy as np

from sabr_jax.errors import UserError

ROUTE_TOKENS = ("images", "oracle")  # config data.route_tokens


def hold_tokens(holds: dict, num_context: int, num_patches: int, video_dim: int) -> np.ndarray:
    """float32 [num_context, num_patches, video_dim]: hold k of holds["route"] (pixels of an
    holds["image_size"] frame) in token k of every context frame as [sin, cos](pi 2^j x / W) and
    the same of y / H for j = 0 .. video_dim / 4 - 1 (then zero-padded to video_dim); zero tokens
    beyond the route's holds."""
    route = np.asarray(holds["route"], np.float64).reshape(-1, 3)
    if len(route) > num_patches:
        raise UserError(f"the route has {len(route)} holds, more than the {num_patches} tokens of a frame")
    height, width = holds["image_size"]
    where = np.stack([route[:, 0] / width, route[:, 1] / height], axis=1)  # [K, 2] in [0, 1]
    freqs = np.pi * 2.0 ** np.arange(video_dim // 4)
    angles = where[:, :, None] * freqs  # [K, 2, F]
    features = np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).reshape(len(route), -1)
    tokens = np.zeros((num_context, num_patches, video_dim), np.float32)
    tokens[:, : len(route), : features.shape[1]] = features
    return tokens


class RouteOracle:
    """A ClipSource (sabr_jax.data.pipeline) that reads `source`'s clips with their route images'
    tokens replaced by `hold_tokens` of the clip's holds.json annotation (its index entry's
    "holds"); every other attribute is the wrapped source's."""

    def __init__(self, source):
        self.source = source
        missing = [source.clip_id(i) for i in range(len(source)) if not source.clips[i].get("holds")]
        if missing:
            raise UserError(
                f"data.route_tokens='oracle' needs holds.json for every clip; {source.path} split {source.split!r} "
                f"has none for {len(missing)} clips: {', '.join(missing[:5])}"
            )

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name):
        if name == "source":  # (not set yet: unpickling in a Grain worker)
            raise AttributeError(name)
        return getattr(self.source, name)

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        clip = self.source.read(index, start, stop)
        context = clip["context"]
        tokens = hold_tokens(self.source.clips[index]["holds"], *context.shape)
        return clip | {"context": tokens.astype(context.dtype)}

"""A deterministic synthetic clip source, generated in memory from a seed (the demo's data).

Each clip is a smooth "climb", SynthClimb's random person (`synth.random_person`, its
bystanders): joint rotations oscillate around a per-clip pose, the bbox rises up the image,
the camera breathes, the betas are constant. Its video tokens are a
fixed random linear "rendering" of the motion (each patch token sees some of the token
slots) plus a static per-clip wall and noise, so the tokens carry information about the
motion and learning is measurable. The context
tokens render the clip's route: the motion at evenly spaced moments of the climb.
Clip i depends only on (seed, first_clip + i): any process can read any clip without
coordination, and sources with disjoint clip ranges (train, validation) share one world.
"""

from __future__ import annotations

import functools

import numpy as np

from sabr_jax import motion as M
from sabr_jax.data.synthclimb import synth

FPS = 24.0


class SyntheticClips:
    """A `ClipSource` (see sabr_jax.data.pipeline) of `num_clips` generated clips."""

    def __init__(
        self,
        num_clips: int,
        *,
        seed: int = 0,
        first_clip: int = 0,
        min_frames: int = 24,
        max_frames: int = 96,
        context_frames: int = 4,
        num_patches: int = 8,
        video_dim: int = 32,
        noise: float = 0.1,
    ):
        if not 1 <= min_frames <= max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}")
        self.num_clips, self.seed, self.first_clip = num_clips, seed, first_clip
        self.min_frames, self.max_frames, self.context_frames = min_frames, max_frames, context_frames
        self.num_patches, self.video_dim, self.noise = num_patches, video_dim, noise
        renderer = np.random.default_rng([seed, 2**31 - 1])
        # [P, Dv, 161]: how each patch token sees the motion vector, each feature centred and
        # weighed by 1 / its spread, so that every feature is as visible as every other.
        self._render = renderer.normal(0, 1 / np.sqrt(M.MOTION_DIM), (num_patches, video_dim, M.MOTION_DIM)).astype(
            np.float32
        )
        # Patch p sees only the slots s with s % P == p (a body part), as a real patch sees
        # only part of the scene; a fixed per-patch code tells the patches apart.
        slot_of_feature = np.repeat(np.arange(M.NUM_SLOTS), [width for _, width in M.SLOTS])
        self._render *= slot_of_feature[None, None, :] % num_patches == np.arange(num_patches)[:, None, None]
        self._patch_code = renderer.normal(0, 1.0, (num_patches, video_dim)).astype(np.float32)
        reference = np.concatenate([self._motion(np.random.default_rng([seed, 2**31 - 2, i])) for i in range(8)])
        self._center = reference.mean(0)
        self._render /= np.maximum(reference.std(0), 1e-2)

    def __len__(self) -> int:
        return self.num_clips

    def num_frames(self, index: int) -> int:
        return int(self._rng(index).integers(self.min_frames, self.max_frames + 1))

    def num_context(self, index: int) -> int:
        return self.context_frames

    def read(self, index: int, start: int, stop: int) -> dict[str, np.ndarray]:
        clip = self._clip(index)
        if not 0 <= start <= stop <= len(clip["motion"]):
            raise IndexError(f"frames {start}:{stop} out of range for clip {index} of {len(clip['motion'])} frames")
        return {
            "motion": clip["motion"][start:stop],
            "motion_mask": np.ones(stop - start, bool),
            "video": clip["video"][start:stop],
            "context": clip["context"],
        }

    def _rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} out of range [0, {self.num_clips})")
        return np.random.default_rng([self.seed, self.first_clip + index])

    def _motion(self, rng: np.random.Generator) -> np.ndarray:
        """A smooth climb [n, 161]; the first draw of `rng` is its length n."""
        n = int(rng.integers(self.min_frames, self.max_frames + 1))
        person = synth.random_person(rng, n, FPS, height=1, width=1)  # a 1x1 image: the bbox in image fractions
        rot6d = M.matrix_to_rot6d(person["rotations"]).reshape(n, -1)
        return np.concatenate([person["bbox"], person["camera_bbox"], rot6d, person["betas"]], axis=1).astype(
            np.float32
        )

    @functools.lru_cache(maxsize=64)  # noqa: B019 - sources live as long as the run; 64 clips at most
    def _clip(self, index: int) -> dict[str, np.ndarray]:
        rng = self._rng(index)
        vectors = self._motion(rng)
        n = len(vectors)
        wall = rng.normal(0, 0.2, (self.num_patches, self.video_dim)).astype(np.float32)
        video = self._view(vectors) + wall + rng.normal(0, self.noise, (n, self.num_patches, self.video_dim))
        route = vectors[np.linspace(0, n - 1, self.context_frames).round().astype(int)]
        context = self._view(route) + wall
        return {"motion": vectors, "video": video.astype(np.float32), "context": context.astype(np.float32)}

    def _view(self, vectors: np.ndarray) -> np.ndarray:
        """[n, 161] -> [n, P, Dv] token 'rendering'."""
        return np.einsum("pdf,nf->npd", self._render, vectors - self._center) + self._patch_code

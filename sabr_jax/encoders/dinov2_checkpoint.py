"""Loading public DINOv2-with-registers checkpoints into a `Dinov2Encoder` (`load`).

Reads a HuggingFace folder or `.safetensors` file
(`facebook/dinov2-with-registers-*`, also the in-memory names of
transformers >= 5) or a torch-hub `dinov2_vit{s,b,l,g}14_reg4_pretrain.pth`
state dict, and converts it to our parameter layout (`Dinov2Model`): the
architecture comes from a `config.json` beside the weights or from the tensor
shapes, every tensor is checked by name and shape (`CheckpointError` names
the culprit), and the model is built without a random init.

Nothing we read may execute code: `.safetensors` files are read with the numpy
API (no torch needed), `.pth` files with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from sabr_jax.encoders.dinov2_model import Dinov2Config, Dinov2Encoder, Dinov2Model

__all__ = ["CheckpointError", "load"]


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor, has one of the wrong shape, or cannot be understood."""


# --------------------------------------------------------------------------
# Name maps: checkpoint tensors -> our parameters
# --------------------------------------------------------------------------

# Checkpoint names (after the common prefix is stripped) of each part of the
# model, as (HuggingFace `Dinov2WithRegistersModel`: the names on the Hub and
# written by `save_pretrained`; torch-hub `facebookresearch/dinov2`: the
# `*_reg4_pretrain.pth` state dicts). "{}" is the block index; a tuple names
# the tensors that are concatenated along the output axis into one of our
# kernels (q, k, v -> qkv; SwiGLU [gate; up] -> fc1).
_HF_HUB_NAMES = {
    "patch": ("embeddings.patch_embeddings.projection", "patch_embed.proj"),
    "cls": ("embeddings.cls_token", "cls_token"),
    "registers": ("embeddings.register_tokens", "register_tokens"),
    "pos": ("embeddings.position_embeddings", "pos_embed"),
    "norm": ("layernorm", "norm"),
    "block": ("encoder.layer.{}.", "blocks.{}."),
    "qkv": (tuple(f"attention.attention.{n}" for n in ("query", "key", "value")), ("attn.qkv",)),
    "proj": ("attention.output.dense", "attn.proj"),
    "mlp_fc1": (("mlp.fc1",), ("mlp.fc1",)),
    "mlp_fc2": ("mlp.fc2", "mlp.fc2"),
    "swiglu_fc1": (("mlp.weights_in",), ("mlp.w12",)),
    "swiglu_fc2": ("mlp.weights_out", "mlp.w3"),
    "ls1": ("layer_scale1.lambda1", "ls1.gamma"),
    "ls2": ("layer_scale2.lambda1", "ls2.gamma"),
}
_HF = {part: names[0] for part, names in _HF_HUB_NAMES.items()}
_LAYOUTS = {
    "hf": _HF,
    # The in-memory names of transformers >= 5, found in a raw `state_dict()` dump.
    "hf-modern": _HF
    | {
        "qkv": tuple(f"attention.{n}_proj" for n in "qkv"),
        "proj": "attention.o_proj",
        "swiglu_fc1": ("mlp.gate_proj", "mlp.up_proj"),
        "swiglu_fc2": "mlp.down_proj",
    },
    "hub": {part: names[1] for part, names in _HF_HUB_NAMES.items()},
}
# Tensors that the checkpoints carry and inference does not use.
_UNUSED = {"embeddings.mask_token", "mask_token"}


# Our parameter names (see Dinov2Model / Dinov2Blocks) -> how to build them.
# A `_Source` lists the checkpoint tensors (name, expected shape) that make one
# of our arrays and the function that combines them into our layout.
@dataclasses.dataclass(frozen=True)
class _Source:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    convert: Callable[..., np.ndarray]


def _concat_linear_t(*ws: np.ndarray) -> np.ndarray:
    """torch Linear weights [out, in] -> our kernel [in, sum(out)] (several, e.g. q, k, v: fused)."""
    return np.concatenate([w.T for w in ws], axis=1)


def _concat(*bs: np.ndarray) -> np.ndarray:
    return np.concatenate(bs)


def _conv_to_patch_kernel(w: np.ndarray) -> np.ndarray:
    """Conv weight [D, 3, p, p] -> [p * p * 3, D] matching our (py, px, c) patch flattening."""
    d = w.shape[0]
    return w.transpose(2, 3, 1, 0).reshape(-1, d)


def _vector(x: np.ndarray) -> np.ndarray:
    """[1, 1, D] -> [D]."""
    return x.reshape(-1)


def _rows(x: np.ndarray) -> np.ndarray:
    """[1, T, D] -> [T, D]."""
    return x.reshape(-1, x.shape[-1])


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _sources(c: Dinov2Config, layout: str) -> tuple[dict[str, _Source], dict[str, Callable[[int], _Source]]]:
    """Our top-level arrays and per-block arrays (by block index) for a checkpoint layout."""
    names = _LAYOUTS[layout]
    d, h, p = c.width, c.hidden, c.patch_size
    top = {
        "patch_kernel": _Source((names["patch"] + ".weight",), ((d, 3, p, p),), _conv_to_patch_kernel),
        "patch_bias": _Source((names["patch"] + ".bias",), ((d,),), _same),
        "cls_token": _Source((names["cls"],), ((1, 1, d),), _vector),
        "register_tokens": _Source((names["registers"],), ((1, c.num_registers, d),), _rows),
        "pos_embed": _Source((names["pos"],), ((1, 1 + c.pos_grid**2, d),), _rows),
        "norm_scale": _Source((names["norm"] + ".weight",), ((d,),), _same),
        "norm_bias": _Source((names["norm"] + ".bias",), ((d,),), _same),
    }
    pre = names["block"]

    def per_block(suffixes, shape, convert=_same):
        """Block i's tensors `pre + suffix`, each of `shape`, combined by `convert`."""
        return lambda i: _Source(tuple(pre.format(i) + s for s in suffixes), (shape,) * len(suffixes), convert)

    def norm(ours, module):
        return {
            f"{ours}_scale": per_block([module + ".weight"], (d,)),
            f"{ours}_bias": per_block([module + ".bias"], (d,)),
        }

    def linear(ours, modules, out, inp):
        """torch Linear(s) [out, in], concatenated on the output axis -> our kernel [in, out], bias."""
        part = out // len(modules)
        return {
            f"{ours}_kernel": per_block([m + ".weight" for m in modules], (part, inp), _concat_linear_t),
            f"{ours}_bias": per_block([m + ".bias" for m in modules], (part,), _concat),
        }

    per_layer = {
        **norm("norm1", "norm1"),
        **linear("qkv", names["qkv"], 3 * d, d),
        **linear("proj", (names["proj"],), d, d),
        **norm("norm2", "norm2"),
        **linear("fc1", names[f"{c.ffn}_fc1"], 2 * h if c.ffn == "swiglu" else h, d),
        **linear("fc2", (names[f"{c.ffn}_fc2"],), d, h),
    }
    if c.layerscale:
        per_layer |= {"ls1": per_block([names["ls1"]], (d,)), "ls2": per_block([names["ls2"]], (d,))}
    return top, per_layer


# --------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------


class _Tensors:
    """Lazy name -> numpy array access to a checkpoint, with shapes available up front."""

    def __init__(self, path: str, shapes: dict[str, tuple[int, ...]], get: Callable[[str], np.ndarray]):
        self.path, self.shapes, self._get = path, shapes, get

    def __getitem__(self, name: str) -> np.ndarray:
        return self._get(name)


def _open_safetensors(path: str) -> _Tensors:
    from safetensors import safe_open  # numpy API: no torch needed

    handle = safe_open(path, framework="numpy")
    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    return _Tensors(path, shapes, handle.get_tensor)


def _open_torch(path: str) -> _Tensors:
    import torch  # only this path needs torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):  # common wrappers around a state dict
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, found {type(state).__name__}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def get(name):
        t = state[name].detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()

    return _Tensors(path, {k: tuple(v.shape) for k, v in state.items()}, get)


def _normalise_names(tensors: _Tensors) -> tuple[str, dict[str, str]]:
    """Detect the layout and map canonical names to the file's names.

    Strips a common prefix (e.g. "dinov2_with_registers." or "backbone.") found
    in front of the CLS token, and flattens the hub's chunked block names
    ("blocks.<chunk>.<i>.") to "blocks.<i>.".
    """
    cls_names = [k for k in tensors.shapes if k.endswith("cls_token")]
    if len(cls_names) != 1:
        raise CheckpointError(
            f"{tensors.path}: cannot find a single CLS token tensor ('cls_token' or "
            f"'embeddings.cls_token'); found {cls_names or 'none'}. Is this a DINOv2 checkpoint?"
        )
    cls_name = cls_names[0]
    if cls_name.endswith("embeddings.cls_token"):
        layout, prefix = "hf", cls_name[: -len("embeddings.cls_token")]
        if any(k.endswith("attention.q_proj.weight") for k in tensors.shapes):
            layout = "hf-modern"
    else:
        layout, prefix = "hub", cls_name[: -len("cls_token")]
    names = {}
    for name in tensors.shapes:
        if name.startswith(prefix):
            canonical = name[len(prefix) :]
            if layout == "hub":
                canonical = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", canonical)
            names[canonical] = name
    return layout, names


def _infer_config(layout: str, shapes: Mapping[str, tuple[int, ...]], num_heads: int | None) -> Dinov2Config:
    """Architecture from tensor shapes (canonical names). Heads: width / 64 unless given."""
    names = _LAYOUTS[layout]
    cls, patch, reg, pos = names["cls"], names["patch"] + ".weight", names["registers"], names["pos"]
    layer_re = "^" + re.escape(names["block"]).replace(re.escape("{}"), r"(\d+)")
    for name in (cls, patch, reg, pos):
        if name not in shapes:
            raise CheckpointError(f"tensor '{name}' is missing")
    width = shapes[cls][-1]
    depth = 1 + max((int(m.group(1)) for k in shapes if (m := re.match(layer_re, k))), default=-1)
    if depth == 0:
        raise CheckpointError("no transformer blocks found")

    # Decide the FFN type and LayerScale from any block, so that a tensor missing
    # from one block is reported as missing rather than changing the architecture.
    def first(pattern):
        return next((shapes[k] for k in sorted(shapes) if re.search(pattern, k)), None)

    swiglu_fused = first(r"\.mlp\.(w12|weights_in)\.weight$")  # [2 * hidden, D]
    swiglu_gate = first(r"\.mlp\.gate_proj\.weight$")  # [hidden, D]
    mlp_fc1 = first(r"\.mlp\.fc1\.weight$")  # [hidden, D]
    swiglu = swiglu_fused is not None or swiglu_gate is not None
    if swiglu_gate is not None:
        hidden = swiglu_gate[0]
    elif swiglu_fused is not None:
        hidden = swiglu_fused[0] // 2
    elif mlp_fc1 is not None:
        hidden = mlp_fc1[0]
    else:
        raise CheckpointError("no FFN weights found (mlp.fc1 / mlp.w12 / mlp.weights_in)")
    layerscale = first(r"\.(ls1\.gamma|layer_scale1\.lambda1)$") is not None
    pos_grid = math.isqrt(shapes[pos][-2] - 1)
    return Dinov2Config(
        width=width,
        depth=depth,
        num_heads=num_heads or max(width // 64, 1),
        patch_size=shapes[patch][-1],
        mlp_ratio=4.0 if swiglu else hidden / width,
        num_registers=shapes[reg][-2] if len(shapes[reg]) > 1 else 1,
        ffn="swiglu" if swiglu else "mlp",
        layerscale=layerscale,
        pos_grid=pos_grid,
        ffn_hidden=hidden,
    )


def _config_from_hf_json(config_path: str) -> Dinov2Config:
    with open(config_path) as f:
        cfg = json.load(f)
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{config_path}: hidden_act {cfg['hidden_act']!r} is not supported (gelu)")
    if not cfg.get("qkv_bias", True):
        raise CheckpointError(f"{config_path}: qkv_bias=false is not supported")
    image, patch = cfg.get("image_size", 518), cfg.get("patch_size", 14)
    image = image[0] if isinstance(image, (list, tuple)) else image
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if cfg.get("head_dim", width // heads) * heads != width:
        raise CheckpointError(f"{config_path}: head_dim * num_attention_heads != hidden_size")
    return Dinov2Config(
        width=width,
        depth=cfg["num_hidden_layers"],
        num_heads=heads,
        patch_size=patch,
        mlp_ratio=float(cfg.get("mlp_ratio", 4)),
        num_registers=cfg.get("num_register_tokens", 4),
        ffn="swiglu" if cfg.get("use_swiglu_ffn", False) else "mlp",
        # HF always has LayerScale; a checkpoint without it is an error worth reporting.
        layerscale=True,
        eps=float(cfg.get("layer_norm_eps", 1e-6)),
        pos_grid=image // patch,
    )


def _read_arrays(
    tensors: _Tensors, layout: str, names: Mapping[str, str], config: Dinov2Config
) -> dict[str, np.ndarray]:
    """Our parameter name -> numpy array (blocks stacked), with name/shape checks."""
    top, per_layer = _sources(config, layout)
    used = set()

    def build(source: _Source) -> np.ndarray:
        parts = []
        for canonical, expected in zip(source.names, source.shapes):
            if canonical not in names:
                raise CheckpointError(
                    f"{tensors.path}: tensor '{canonical}' is missing (expected shape {expected}, "
                    f"{layout} layout, {config.depth} blocks)"
                )
            found = tensors.shapes[names[canonical]]
            if tuple(found) != tuple(expected):
                raise CheckpointError(
                    f"{tensors.path}: tensor '{names[canonical]}' has shape {tuple(found)}, "
                    f"expected {tuple(expected)} (for {config})"
                )
            used.add(canonical)
            parts.append(np.asarray(tensors[names[canonical]], dtype=np.float32))
        return source.convert(*parts)

    arrays = {name: build(source) for name, source in top.items()}
    for name, source_of in per_layer.items():
        arrays["blocks." + name] = np.stack([build(source_of(i)) for i in range(config.depth)])
    unused = sorted(set(names) - used - _UNUSED)
    if unused:
        warnings.warn(f"{tensors.path}: ignoring {len(unused)} unused tensors, e.g. {unused[:5]}", stacklevel=2)
    return arrays


def _model_from_arrays(config: Dinov2Config, arrays: Mapping[str, np.ndarray], dtype, param_dtype) -> Dinov2Model:
    """Build a Dinov2Model without random init and fill it with `arrays`."""
    model = nnx.eval_shape(lambda: Dinov2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        name = ".".join(str(k) for k in path)
        expected = variable.get_value().shape
        if arrays[name].shape != expected:  # guarded by _read_arrays; an internal invariant
            raise AssertionError(f"{name}: {arrays[name].shape} != {expected}")
        flat.append((path, variable.replace(jnp.asarray(arrays[name], dtype=param_dtype))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load(
    path: str | os.PathLike, *, dtype=jnp.float32, param_dtype=None, num_heads: int | None = None
) -> Dinov2Encoder:
    """Load a public DINOv2-with-registers checkpoint into a ready, frozen encoder.

    Args:
      path: one of
        * a HuggingFace model folder (`config.json` + `model.safetensors`),
          e.g. a download of `facebook/dinov2-with-registers-large`;
        * a `.safetensors` file in that layout (a `config.json` beside it is
          used when present, otherwise the architecture comes from the tensor
          shapes);
        * a torch-hub state dict `dinov2_vit{s,b,l,g}14_reg4_pretrain.pth`
          (needs torch; read with `weights_only=True`, so nothing executes).
      dtype: compute dtype (float32; bfloat16 on accelerators).
      param_dtype: parameter storage dtype; default: `dtype`.
      num_heads: attention heads when they cannot be read from a config.json
        (default width / 64, true of every public DINOv2).

    Returns:
      a `Dinov2Encoder`: `encoder(pixels)` -> {patch_tokens, cls_token,
      register_tokens}.

    Raises:
      CheckpointError: a tensor is missing or misshapen (the message names the
        tensor, the expected and found shapes and the file), or the file is
        not a DINOv2 checkpoint.
      FileNotFoundError: `path` does not exist.
    """
    path = os.fspath(path)
    config_json = None
    if os.path.isdir(path):
        config_json = os.path.join(path, "config.json")
        weights = os.path.join(path, "model.safetensors")
        if not os.path.exists(weights):
            raise FileNotFoundError(f"{path}: no model.safetensors in this folder")
        if not os.path.exists(config_json):
            config_json = None
    elif os.path.exists(path):
        weights = path
        sibling = os.path.join(os.path.dirname(path), "config.json")
        if path.endswith(".safetensors") and os.path.exists(sibling):
            config_json = sibling
    else:
        raise FileNotFoundError(path)

    tensors = _open_safetensors(weights) if weights.endswith(".safetensors") else _open_torch(weights)
    layout, names = _normalise_names(tensors)
    shapes = {canonical: tensors.shapes[name] for canonical, name in names.items()}
    if layout.startswith("hf") and config_json is not None:
        config = _config_from_hf_json(config_json)
    else:
        try:
            config = _infer_config(layout, shapes, num_heads)
        except CheckpointError as e:
            raise CheckpointError(f"{weights}: {e}") from None
    arrays = _read_arrays(tensors, layout, names, config)
    param_dtype = param_dtype or dtype
    return Dinov2Encoder(_model_from_arrays(config, arrays, dtype, param_dtype))

"""DINOv2-with-registers encoder: parity with the reference, loaders, preprocessing, errors.

Reference models are small random `transformers.Dinov2WithRegistersModel`s
with every parameter randomised (LayerScale, position embedding and register
tokens included, so that a wrong convention changes the output). They reach
our code only through `dinov2.load`, exactly as a user's download would:
a `save_pretrained` folder, its bare `.safetensors` file, or a torch-hub style
`.pth` state dict written with this file's own name map.
"""

from __future__ import annotations

import dataclasses
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from sabr_jax.encoders import dinov2
from sabr_jax.encoders.resize import resize_matrix

LANDSCAPE = (280, 490)
PORTRAIT = (490, 280)


# --------------------------------------------------------------------------
# Reference helpers (torch / transformers)
# --------------------------------------------------------------------------


def _hf_model(seed: int, **config):
    """A randomised HF Dinov2WithRegistersModel (eval mode, fp32)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **config)
    torch.manual_seed(seed)
    model = transformers.Dinov2WithRegistersModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("embeddings.") and "patch_embeddings" not in name:
                p.normal_()  # cls, mask, register tokens, position embedding
            elif "layer_scale" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("weight") and p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            else:  # biases
                p.normal_(0.0, 0.2)
    return model


def _hf_outputs(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Reference tokens for NHWC pixels, split like our encoder's output."""
    import torch

    with torch.no_grad():
        hidden = model(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state
    hidden = hidden.numpy()
    r = model.config.num_register_tokens
    return {"cls_token": hidden[:, 0], "register_tokens": hidden[:, 1 : 1 + r], "patch_tokens": hidden[:, 1 + r :]}


def _hub_state_dict(model) -> dict:
    """The HF model's weights under the torch-hub dinov2 names (our own map, not the loader's).

    Hub conventions: pos_embed [1, 1 + 37*37, D] includes the CLS position;
    cls_token [1, 1, D]; register_tokens [1, R, D]; mask_token [1, D]; fused
    attn.qkv ([q; k; v] on the output axis); LayerScale as ls{1,2}.gamma;
    SwiGLU as mlp.w12 ([gate; up]) and mlp.w3.
    """
    import torch

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hub = {
        "cls_token": sd["embeddings.cls_token"],
        "register_tokens": sd["embeddings.register_tokens"],
        "mask_token": sd["embeddings.mask_token"],
        "pos_embed": sd["embeddings.position_embeddings"],
        "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": sd["layernorm.weight"],
        "norm.bias": sd["layernorm.bias"],
    }
    for i in range(model.config.num_hidden_layers):
        hf, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for t in ("weight", "bias"):
            hub[b + f"norm1.{t}"] = sd[hf + f"norm1.{t}"]
            hub[b + f"norm2.{t}"] = sd[hf + f"norm2.{t}"]
            hub[b + f"attn.qkv.{t}"] = torch.cat([sd[hf + f"attention.{n}_proj.{t}"] for n in "qkv"])
            hub[b + f"attn.proj.{t}"] = sd[hf + f"attention.o_proj.{t}"]
            if model.config.use_swiglu_ffn:
                hub[b + f"mlp.w12.{t}"] = torch.cat([sd[hf + f"mlp.gate_proj.{t}"], sd[hf + f"mlp.up_proj.{t}"]])
                hub[b + f"mlp.w3.{t}"] = sd[hf + f"mlp.down_proj.{t}"]
            else:
                hub[b + f"mlp.fc1.{t}"] = sd[hf + f"mlp.fc1.{t}"]
                hub[b + f"mlp.fc2.{t}"] = sd[hf + f"mlp.fc2.{t}"]
        hub[b + "ls1.gamma"] = sd[hf + "layer_scale1.lambda1"]
        hub[b + "ls2.gamma"] = sd[hf + "layer_scale2.lambda1"]
    return hub


def _pixels(seed: int, size: tuple[int, int], n: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *size, 3)).astype(np.float32)


def _assert_matches(encoder, model, pixels, atol=1e-4):
    ours = {k: np.asarray(v) for k, v in encoder(jnp.asarray(pixels)).items()}
    ref = _hf_outputs(model, pixels)
    assert set(ours) == set(ref)
    for key in ref:
        assert ours[key].shape == ref[key].shape, key
        np.testing.assert_allclose(ours[key], ref[key], atol=atol, rtol=0, err_msg=key)


# --------------------------------------------------------------------------
# Small reference checkpoints, written once per module
# --------------------------------------------------------------------------


def _saved_hf_model(tmp_path_factory, name: str, seed: int, **config):
    """A randomised HF model and the `save_pretrained` folder it was written to."""
    model = _hf_model(seed, **config)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """ViT with width 128, 2 heads (head_dim 64), 2 blocks, 9x9 position grid."""
    return _saved_hf_model(
        tmp_path_factory, "tiny_hf", 0, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=126
    )


@pytest.fixture(scope="module")
def tiny_swiglu(tmp_path_factory):
    """The ViT-g block type (SwiGLU FFN) at width 128."""
    return _saved_hf_model(
        tmp_path_factory,
        "tiny_swiglu_hf",
        1,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=70,
        use_swiglu_ffn=True,
    )


@pytest.fixture(scope="module")
def large2(tmp_path_factory):
    """ViT-L/14 shapes and names (width 1024, 16 heads, 4 registers, 37x37 grid), 2 blocks."""
    return _saved_hf_model(
        tmp_path_factory, "large2_hf", 2, hidden_size=1024, num_hidden_layers=2, num_attention_heads=16, image_size=518
    )


# --------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [LANDSCAPE, PORTRAIT], ids=["280x490", "490x280"])
def test_hf_folder_parity(tiny, size):
    model, folder = tiny
    encoder = dinov2.load(folder)
    assert encoder.config.width == 128 and encoder.config.depth == 2 and encoder.config.pos_grid == 9
    _assert_matches(encoder, model, _pixels(0, size))


@pytest.mark.parametrize("size", [LANDSCAPE, PORTRAIT], ids=["280x490", "490x280"])
def test_hf_safetensors_file_parity(tiny, tmp_path, size):
    """A bare .safetensors file (no config.json beside it): architecture from the shapes."""
    model, folder = tiny
    file = tmp_path / "dinov2.safetensors"
    shutil.copy(folder / "model.safetensors", file)
    encoder = dinov2.load(file)
    assert encoder.config.num_heads == 2  # width / 64
    _assert_matches(encoder, model, _pixels(1, size))


def test_hub_pth_parity(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    model, _ = tiny
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(_hub_state_dict(model), path)
    encoder = dinov2.load(path)
    for i, size in enumerate([LANDSCAPE, PORTRAIT]):
        _assert_matches(encoder, model, _pixels(10 + i, size))


def test_modern_hf_state_dict_parity(tiny, tmp_path):
    """A raw transformers>=5 state_dict dump (q_proj/k_proj/... names) loads too."""
    pytest.importorskip("torch")
    from safetensors.torch import save_file

    model, _ = tiny
    path = tmp_path / "raw.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    _assert_matches(dinov2.load(path), model, _pixels(2, LANDSCAPE, n=1))


def _load_folder_and_pth(model, folder, pth):
    """Our encoders from the HF folder and from the same weights saved as a torch-hub `pth`."""
    torch = pytest.importorskip("torch")
    torch.save(_hub_state_dict(model), pth)
    return [dinov2.load(path) for path in (folder, pth)]


def test_large_shapes_parity(large2, tmp_path):
    """ViT-L/14 names and shapes (reduced to 2 blocks) through the HF folder and the hub .pth."""
    model, folder = large2
    for encoder in _load_folder_and_pth(model, folder, tmp_path / "dinov2_vitl14_reg4_pretrain.pth"):
        c = encoder.config
        assert (c.width, c.num_heads, c.num_registers, c.pos_grid, c.hidden) == (1024, 16, 4, 37, 4096)
        for i, size in enumerate([LANDSCAPE, PORTRAIT]):
            _assert_matches(encoder, model, _pixels(20 + i, size, n=1))


def test_swiglu_parity(tiny_swiglu, tmp_path):
    """ViT-g's SwiGLU FFN (hidden = 2/3 * 4 * D rounded up to 8) via HF folder and hub .pth."""
    model, folder = tiny_swiglu
    for encoder in _load_folder_and_pth(model, folder, tmp_path / "dinov2_vitg14_reg4_pretrain.pth"):
        assert encoder.config.ffn == "swiglu" and encoder.config.hidden == 344
        _assert_matches(encoder, model, _pixels(30, LANDSCAPE))


def test_interpolation_matrices_match_torch():
    """resize_matrix == torch interpolate(antialias=True) on the unit basis: down and up."""
    torch = pytest.importorskip("torch")
    for kind, mode in (("cubic", "bicubic"), ("linear", "bilinear")):
        for n_in, n_out in ((37, 20), (37, 35), (9, 35), (368, 280), (640, 490)):
            basis = torch.eye(n_in)[:, None, :, None].repeat(1, 1, 1, 2)  # n_in images of n_in x 2
            ref = torch.nn.functional.interpolate(
                basis, size=(n_out, 2), mode=mode, antialias=True, align_corners=False
            )[:, 0, :, 0].T.numpy()
            np.testing.assert_allclose(resize_matrix(n_in, n_out, kind), ref, atol=2e-6, rtol=0)


# --------------------------------------------------------------------------
# Preprocessing on a real decoded frame
# --------------------------------------------------------------------------


def _decoded_frame(tmp_path, height: int, width: int) -> np.ndarray:
    """Encode a synthetic RGB image to H.264 mp4 with PyAV and decode it back (uint8 [H, W, 3])."""
    av = pytest.importorskip("av")
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = (
        np.stack(
            [
                127 + 120 * np.sin(x / 7.0) * np.cos(y / 11.0),
                (x * 255 / width + 40 * ((x // 16 + y // 16) % 2)) % 256,
                255 * (np.hypot(x - width / 2, y - height / 2) < min(height, width) / 3),
            ],
            axis=-1,
        )
        .clip(0, 255)
        .astype(np.uint8)
    )
    path = str(tmp_path / f"synthetic_{height}x{width}.mp4")
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=24)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for _ in range(2):
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(path) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
    return frame


@pytest.mark.parametrize("shape", [(368, 640), (640, 368)], ids=["landscape", "portrait"])
def test_preprocess_matches_torch(tmp_path, shape):
    torch = pytest.importorskip("torch")
    frame = _decoded_frame(tmp_path, *shape)
    ours = np.asarray(dinov2.preprocess(jnp.asarray(frame[None])))
    expected_size = PORTRAIT if shape[0] > shape[1] else LANDSCAPE
    assert ours.shape == (1, *expected_size, 3) and ours.dtype == np.float32

    x = torch.from_numpy(frame).permute(2, 0, 1)[None].float() / 255.0
    x = torch.nn.functional.interpolate(x, size=expected_size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(dinov2.IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(dinov2.IMAGENET_STD)[:, None, None]
    ref = ((x - mean) / std).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


# --------------------------------------------------------------------------
# Random encoder, batching, bf16 (no torch needed)
# --------------------------------------------------------------------------

TINY = dinov2.Dinov2Config(width=64, depth=2, num_heads=1, pos_grid=5)


def test_encode_frames_batches_and_pads():
    encoder = dinov2.random_encoder(TINY, seed=3)
    frames = np.random.default_rng(0).integers(0, 256, size=(5, 92, 160, 3), dtype=np.uint8)
    tokens = dinov2.encode_frames(encoder, frames, batch_size=2)
    assert tokens.shape == (5, 700, 64) and tokens.dtype == np.float32
    direct = np.asarray(encoder(dinov2.preprocess(jnp.asarray(frames)))["patch_tokens"])
    np.testing.assert_allclose(tokens, direct, atol=1e-5, rtol=0)
    portrait = dinov2.encode_frames(encoder, frames.transpose(0, 2, 1, 3)[:1])
    assert portrait.shape == (1, 700, 64)


def test_random_encoder_is_seeded():
    pixels = jnp.asarray(_pixels(4, (28, 42), n=1))
    a = dinov2.random_encoder(TINY, seed=7)(pixels)["patch_tokens"]
    b = dinov2.random_encoder(TINY, seed=7)(pixels)["patch_tokens"]
    c = dinov2.random_encoder(TINY, seed=8)(pixels)["patch_tokens"]
    assert a.shape == (1, 6, 64)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))
    assert dinov2.CONFIGS["l"].hidden == 4096 and dinov2.CONFIGS["g"].hidden == 4096


def test_bfloat16_compute_is_close():
    pixels = jnp.asarray(_pixels(5, (56, 70), n=2))
    f32 = dinov2.random_encoder(TINY, seed=1)
    bf16 = dinov2.random_encoder(TINY, seed=1, dtype=jnp.bfloat16)
    out = bf16(pixels)
    assert out["patch_tokens"].dtype == jnp.bfloat16
    assert bf16.state["blocks"]["qkv_kernel"][...].dtype == jnp.bfloat16
    ref = np.asarray(f32(pixels)["patch_tokens"])
    err = np.abs(np.asarray(out["patch_tokens"], np.float32) - ref).max()
    assert err < 0.1, err


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def _hub_arrays(c: dinov2.Dinov2Config) -> dict[str, np.ndarray]:
    """A hub-layout state dict of zeros for config c (numpy; written as .safetensors)."""
    d, h, p = c.width, c.hidden, c.patch_size
    arrays = {
        "cls_token": (1, 1, d),
        "register_tokens": (1, c.num_registers, d),
        "mask_token": (1, d),
        "pos_embed": (1, 1 + c.pos_grid**2, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
        "norm.weight": (d,),
        "norm.bias": (d,),
    }
    for i in range(c.depth):
        for name, shape in {
            "norm1": (d,),
            "norm2": (d,),
            "ls1.gamma": (d,),
            "ls2.gamma": (d,),
            "attn.qkv.weight": (3 * d, d),
            "attn.qkv.bias": (3 * d,),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "mlp.fc1.weight": (h, d),
            "mlp.fc1.bias": (h,),
            "mlp.fc2.weight": (d, h),
            "mlp.fc2.bias": (d,),
        }.items():
            if name.startswith("norm"):
                arrays[f"blocks.{i}.{name}.weight"] = shape
                arrays[f"blocks.{i}.{name}.bias"] = shape
            else:
                arrays[f"blocks.{i}.{name}"] = shape
    return {k: np.zeros(s, np.float32) for k, s in arrays.items()}


def test_loader_accepts_hub_layout_safetensors(tmp_path):
    from safetensors.numpy import save_file

    save_file(_hub_arrays(TINY), tmp_path / "ok.safetensors")
    encoder = dinov2.load(tmp_path / "ok.safetensors", num_heads=1)
    assert encoder.config == dataclasses.replace(TINY, mlp_ratio=4.0, ffn_hidden=256)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.numpy import save_file

    arrays = _hub_arrays(TINY)
    del arrays["blocks.1.attn.proj.weight"]
    path = tmp_path / "missing.safetensors"
    save_file(arrays, path)
    with pytest.raises(dinov2.CheckpointError, match=r"blocks\.1\.attn\.proj\.weight.*missing.*\(64, 64\)") as e:
        dinov2.load(path)
    assert str(path) in str(e.value)


def test_wrong_shape_is_named(tmp_path):
    from safetensors.numpy import save_file

    arrays = _hub_arrays(TINY)
    arrays["blocks.0.mlp.fc2.weight"] = np.zeros((64, 200), np.float32)
    path = tmp_path / "misshapen.safetensors"
    save_file(arrays, path)
    with pytest.raises(dinov2.CheckpointError, match=r"blocks\.0\.mlp\.fc2\.weight.*\(64, 200\).*expected \(64, 256\)"):
        dinov2.load(path)


def test_missing_tensor_in_pth_is_named(tiny, tmp_path):
    torch = pytest.importorskip("torch")
    model, _ = tiny
    state = _hub_state_dict(model)
    del state["blocks.0.ls2.gamma"]
    path = tmp_path / "missing.pth"
    torch.save(state, path)
    with pytest.raises(dinov2.CheckpointError, match=r"blocks\.0\.ls2\.gamma.*missing"):
        dinov2.load(path)


def test_not_a_checkpoint(tmp_path):
    from safetensors.numpy import save_file

    save_file({"foo": np.zeros(3, np.float32)}, tmp_path / "foo.safetensors")
    with pytest.raises(dinov2.CheckpointError, match="CLS token"):
        dinov2.load(tmp_path / "foo.safetensors")

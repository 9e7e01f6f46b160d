"""Every released TiTok config builds with exactly the official state-dict keys and shapes."""
from __future__ import annotations

import json

import pytest
import torch

from tests.titok_fixtures import TITOK_REF
from tokenizer import CheckpointError, build_tokenizer
from tokenizer.maskgit_vqgan import PixelDecoder, PixelDecoderConfig, PixelQuantizer

KEYS = TITOK_REF / "keys"
SUPPORTED = ["titok_s128", "titok_b64", "titok_l32", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k"]
VAE = ["titok_bl64_vae_c16", "titok_bl128_vae_c16", "titok_ll32_vae_c16"]


def layout(name: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    d = json.loads((KEYS / f"{name}.keys.json").read_text())
    return d.get("config"), {k["key"]: tuple(k["shape"]) for k in d["keys"]}


def meta_state(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("name", SUPPORTED)
def test_released_config_layout(name):
    config, expected = layout(name)
    with torch.device("meta"):
        model = build_tokenizer(config)
    assert meta_state(model) == expected


@pytest.mark.parametrize("name", SUPPORTED)
def test_encoder_only_layout_is_the_non_decoder_subset(name):
    config, expected = layout(name)
    with torch.device("meta"):
        model = build_tokenizer(config, parts="encoder")
    assert meta_state(model) == {k: s for k, s in expected.items() if not k.startswith(model.decoder_prefixes)}


def test_pixel_decoder_matches_standalone_maskgit_vqgan():
    _, expected = layout("maskgit_vqgan_f16_256")
    with torch.device("meta"):
        dec, quant = PixelDecoder(PixelDecoderConfig()), PixelQuantizer()
    assert meta_state(dec) == {k[len("decoder."):]: s for k, s in expected.items() if k.startswith("decoder.")}
    assert meta_state(quant) == {k[len("quantize."):]: s for k, s in expected.items() if k.startswith("quantize.")}


@pytest.mark.parametrize("name", VAE + ["tatitok_bl32_vae"])
def test_vae_variants_are_refused_clearly(name):
    config, _ = layout(name)
    with pytest.raises(CheckpointError, match="not supported"):
        build_tokenizer(config)


def test_unknown_size_and_unknown_config_are_refused():
    config, _ = layout("titok_b64")
    config["model"]["vq_model"]["vit_enc_model_size"] = "huge"
    with pytest.raises(CheckpointError, match="unknown vit_enc_model_size 'huge'"):
        build_tokenizer(config)
    with pytest.raises(CheckpointError, match="unknown tokenizer config"):
        build_tokenizer({"model": {"generator": {}}})

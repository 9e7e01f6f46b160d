"""TiTok against the official reference vectors (../shared/reference/titok)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.titok_fixtures import TITOK_REF, TITOK_VARIANTS, write_titok_checkpoint
from tokenizer import load_tokenizer
from tokenizer.vit import set_fused_attention


@pytest.fixture(scope="module", params=TITOK_VARIANTS)
def case(request, tmp_path_factory):
    torch.set_num_threads(1)
    ckpt = write_titok_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    io = load_file(str(TITOK_REF / f"{request.param}.io.safetensors"))
    return request.param, load_tokenizer(str(ckpt)), io


def close(actual, expected, atol, rtol=0.0):
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def test_token_ids_exact(case):
    _, tok, io = case
    ids = tok.encode(io["image"])
    assert ids.dtype == torch.int64
    assert torch.equal(ids, io["tokens"].squeeze(1))


def test_encoder_latents(case):
    _, tok, io = case
    with torch.no_grad():
        rows = tok.encoder.latent_rows(io["image"], tok.latent_tokens)
        close(rows, io["encoder_latent_rows"], 1e-5)
        close(tok.encode_latent(io["image"]), io["encoder_latent"], 1e-5)


def test_codebook_lookup(case):
    _, tok, io = case
    close(tok.quantize.lookup(io["tokens"].squeeze(1)), io["codebook_latent"], 1e-5)
    # the straight-through value of the official encode equals the lookup up to ~1e-7
    close(tok.quantize.lookup(io["tokens"].squeeze(1)), io["quantized_latent"], 1e-5)


def test_decoder_intermediates(case):
    variant, tok, io = case
    with torch.no_grad():
        close(tok.decoder.patch_rows(io["codebook_latent"]), io["decoder_patch_rows"], 5e-5)
        if variant == "tiny_vq_two_stage":
            logits = tok.decoder(io["codebook_latent"])
            close(logits, io["decoder_logits"], 5e-5)
            assert torch.equal(logits.flatten(2).argmax(1), io["vqgan_codes_argmax"])
            close(tok.pixel_quantize.mix(logits), io["pixel_decoder_input"], 5e-5)


def test_decoded_pixels(case):
    _, tok, io = case
    with torch.no_grad():
        img = tok.decode_tokens(io["tokens"])  # [B,1,N] accepted like the official API
        close(img, io["decoded_from_tokens"], 1e-4, 1e-4)
        close(img.clamp(0, 1), io["recon_image"], 1e-4, 1e-4)
        close(tok.decode_latent(io["quantized_latent"]), io["decoded_from_encode"], 1e-4, 1e-4)


def test_math_attention_path_matches(case):
    """The eager reference attention (benchmark baseline) gives the same ids and latents."""
    _, tok, io = case
    set_fused_attention(tok, False)
    try:
        with torch.no_grad():
            assert torch.equal(tok.encode(io["image"]), io["tokens"].squeeze(1))
            close(tok.encode_latent(io["image"]), io["encoder_latent"], 1e-5)
    finally:
        set_fused_attention(tok, True)

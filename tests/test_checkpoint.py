"""Checkpoint loading: formats, strictness, safety, encoder-only loads, fingerprints, fast path."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.titok_fixtures import TITOK_REF, titok_config, write_titok_checkpoint
from tokenizer import CheckpointError, load_tokenizer

VARIANT = "tiny_vq_two_stage"


@pytest.fixture
def ckpt(tmp_path):
    return write_titok_checkpoint(VARIANT, tmp_path / "ckpt")


@pytest.fixture(scope="module")
def io():
    return load_file(str(TITOK_REF / f"{VARIANT}.io.safetensors"))


def weights() -> dict[str, torch.Tensor]:
    return load_file(str(TITOK_REF / f"{VARIANT}.safetensors"))


def write(dest, state_dict=None, config=None, as_bin=False):
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config or titok_config(VARIANT)))
    sd = weights() if state_dict is None else state_dict
    if as_bin:
        torch.save(sd, dest / "pytorch_model.bin")
    else:
        save_file(sd, dest / "model.safetensors")
    return dest


def test_bin_checkpoint_loads_like_safetensors(tmp_path, ckpt, io):
    a = load_tokenizer(str(ckpt))
    b = load_tokenizer(str(write(tmp_path / "bin", as_bin=True)))
    assert torch.equal(b.encode(io["image"]), io["tokens"].squeeze(1))
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64


def test_file_url_and_fingerprint_depends_on_weights(tmp_path, ckpt):
    a = load_tokenizer("file://" + str(ckpt))
    sd = weights()
    sd["quantize.embedding.weight"] = sd["quantize.embedding.weight"] + 1e-3
    b = load_tokenizer(str(write(tmp_path / "other", sd)))
    assert a.fingerprint != b.fingerprint


def test_pickle_with_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    dest = tmp_path / "evil"
    dest.mkdir()
    (dest / "config.json").write_text(json.dumps(titok_config(VARIANT)))
    torch.save({"latent_tokens": Evil()}, dest / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="needs code execution"):
        load_tokenizer(str(dest))
    assert not marker.exists()


def test_missing_unexpected_and_wrong_shape_keys_are_named(tmp_path):
    sd = weights()
    del sd["encoder.ln_post.weight"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["quantize.embedding.weight"] = torch.zeros(65, 12)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(str(write(tmp_path / "bad", sd)))
    msg = str(e.value)
    assert "missing keys: encoder.ln_post.weight" in msg
    assert "unexpected keys: encoder.extra.weight" in msg
    assert "quantize.embedding.weight: checkpoint (65, 12) vs model (64, 12)" in msg


def test_missing_files_and_bad_json(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_tokenizer(str(tmp_path / "nowhere"))
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_tokenizer(str(ckpt))
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_tokenizer(str(ckpt))


def test_corrupt_safetensors(tmp_path, ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_tokenizer(str(ckpt))


def test_encoder_only_load(ckpt, io):
    enc = load_tokenizer(str(ckpt), parts="encoder")
    full = load_tokenizer(str(ckpt))
    assert not any(k.startswith(enc.decoder_prefixes) for k in enc.state_dict())
    assert torch.equal(enc.encode(io["image"]), io["tokens"].squeeze(1))
    assert enc.fingerprint == full.fingerprint  # the same checkpoint, whatever is loaded
    with pytest.raises(RuntimeError, match="encoder-only"):
        enc.decode_tokens(io["tokens"])


def test_encoder_only_still_strict_on_encoder_keys(tmp_path):
    sd = weights()
    del sd["encoder.conv_out.bias"]
    with pytest.raises(CheckpointError, match="encoder.conv_out.bias"):
        load_tokenizer(str(write(tmp_path / "bad", sd)), parts="encoder")


def test_uint8_fast_path_matches_float_encode(ckpt, io):
    tok = load_tokenizer(str(ckpt), parts="encoder")
    u8 = (io["image"] * 255).round().to(torch.uint8)
    ids = tok.encode_uint8(u8)
    assert ids.dtype == torch.uint16
    assert torch.equal(ids.long(), io["tokens"].squeeze(1))
    bf16 = tok.encode_uint8(u8, precision="bf16")
    assert bf16.dtype == torch.uint16 and bf16.shape == ids.shape
    assert (bf16 == ids).float().mean() >= 0.9  # measured 1.0 on both fixtures
    with pytest.raises(ValueError, match="uint8"):
        tok.encode_uint8(io["image"])
    with pytest.raises(ValueError, match=r"\[B,3,64,64\]"):
        tok.encode(torch.zeros(1, 3, 32, 32))


def test_load_from_s3(s3, ckpt, io):
    import fsspec

    url = f"s3://{s3.bucket()}/ckpts/tiny"
    fs = fsspec.filesystem("s3", **s3.storage_options)
    fs.put(str(ckpt) + "/", url + "/", recursive=True)
    explicit = load_tokenizer(url, storage_options=s3.storage_options, parts="encoder")
    from_env = load_tokenizer(url)  # endpoint and keys from the AWS_* environment
    assert torch.equal(explicit.encode(io["image"]), io["tokens"].squeeze(1))
    assert explicit.fingerprint == from_env.fingerprint == load_tokenizer(str(ckpt)).fingerprint
    with pytest.raises(CheckpointError, match="no config.json"):
        load_tokenizer(url + "-missing", storage_options=s3.storage_options)

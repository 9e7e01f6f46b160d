"""Loading generators: a pretok run directory (``generator.run``) or an official TiTok folder.

``load_generator`` reads a pretok run directory's latest commit (its EMA weights unless
``weights="raw"``), a single pretok step folder, or an official TiTok generator folder as published
(config.json with ``model.generator`` + model.safetensors or pytorch_model.bin), from any source the
tokenizer loader accepts: a hub repo id (``yucornetto/generator_titok_l32_imagenet[@rev]``),
``hf://``, a local folder or an fsspec URL.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load as load_safetensors

from tokenizer.checkpoint import read_checkpoint
from tokenizer.errors import CheckpointError
from tokenizer.interpolation import resolve_interpolations
from tokenizer.sources import open_source

from .model import GeneratorConfig, MaskGITTransformer
from .run import CONFIG, EMA, LATEST, MODEL
from .sample import SamplerConfig

FORMAT = "pretok-generator"
WEIGHTS = ("ema", "raw")
# Buffers some transformers versions saved with BertModel; not parameters of the model.
_IGNORED_KEYS = ("model.embeddings.position_ids",)


def generator_config(config: dict) -> GeneratorConfig:
    """The model config of a pretok or an official TiTok generator ``config.json``."""
    if config.get("format") == FORMAT:
        return GeneratorConfig(**config["generator"])
    if "generator" in config.get("model", {}):
        return GeneratorConfig.from_official(config)
    raise ValueError("not a generator config: expected a pretok checkpoint or an official model.generator block")


def sampler_defaults(config: dict) -> SamplerConfig:
    """Sampling settings an official config recommends; plain defaults for pretok checkpoints."""
    if config.get("format") != FORMAT and "generator" in config.get("model", {}):
        return SamplerConfig.from_official(resolve_interpolations(config)["model"]["generator"])
    return SamplerConfig()


def _run_weights(src: str, weights: str, storage_options: dict | None) -> tuple[dict, bytes, str] | None:
    """(config, weight bytes, file name) of a run directory's latest commit; None when ``src`` is no run."""
    files = open_source(src, storage_options)
    latest = None if files.file else files.read(LATEST)
    if latest is None:
        return None
    folder = json.loads(latest)["dir"]
    config = json.loads(files.read(f"{folder}/{CONFIG}") or b"null")
    name = EMA if weights == "ema" else MODEL
    blob = files.read(f"{folder}/{name}")
    if config is None or blob is None:
        raise CheckpointError(f"{files.source}: {LATEST} names {folder}, which lacks {CONFIG} or {name}")
    return config, blob, f"{files.source}/{folder}/{name}"


def load_generator(
    src: str | os.PathLike,
    device: str | torch.device = "cpu",
    storage_options: dict | None = None,
    weights: str = "ema",
) -> tuple[MaskGITTransformer, dict]:
    """Model (eval mode, on ``device``) and its config.json from a pretok run directory (its latest
    commit; the EMA weights, or the raw ones with ``weights="raw"``), a pretok step folder or an
    official generator folder (these have raw weights only), from any source ``tokenizer.sources`` accepts."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, not {weights!r}")
    run = _run_weights(str(src), weights, storage_options)
    if run is not None:
        config, blob, where = run
        try:
            state_dict = load_safetensors(blob)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{where} is not a valid safetensors file: {e}") from e
    else:
        ckpt = read_checkpoint(str(src), storage_options)
        config, state_dict = ckpt.config, ckpt.state_dict()
    model = MaskGITTransformer(generator_config(config))
    model.load_state_dict({k: v for k, v in state_dict.items() if k not in _IGNORED_KEYS}, strict=True)
    return model.to(device).eval(), config

"""``load_tokenizer``: build the right model for a checkpoint and load it strictly."""
from __future__ import annotations

import torch

from .base import ImageTokenizer
from .checkpoint import Checkpoint, check_state_dict, fingerprint, read_checkpoint
from .errors import CheckpointError
from .flextok.config import is_flextok_config

PARTS = ("all", "encoder")


def build_tokenizer(config: dict, parts: str = "all") -> ImageTokenizer:
    """Instantiate (randomly initialised) the tokenizer a config describes."""
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, not {parts!r}")
    if is_flextok_config(config):
        from .flextok import FlexTok

        return FlexTok.from_config(config, parts=parts)
    if isinstance(config.get("model"), dict) and "vq_model" in config["model"]:
        from .titok import TiTok

        return TiTok.from_config(config, parts=parts)
    raise CheckpointError(
        "unknown tokenizer config: expected a TiTok config (model.vq_model) or a FlexTok config "
        "(the hub config.json nodes vae/encoder/decoder/..., or a _target_ naming flextok)"
    )


def load_tokenizer(
    src: str | Checkpoint, device: str | torch.device = "cpu", parts: str = "all",
    storage_options: dict | None = None,
) -> ImageTokenizer:
    """Load a tokenizer from any source ``tokenizer.sources`` accepts (hub repo id, ``hf://``,
    folder, fsspec URL, bare ``model.safetensors``) or from a :class:`Checkpoint` already read.

    ``parts="encoder"`` skips decoder weights (pipeline actors). The model is returned in
    ``eval()`` mode on ``device`` with ``fingerprint`` set, computed from the weights it loaded.
    """
    ckpt = read_checkpoint(src, storage_options)
    model = build_tokenizer(ckpt.config, parts=parts)
    state_dict = ckpt.state_dict()
    skipped = model.decoder_prefixes if parts == "encoder" else ()
    check_state_dict(model, state_dict, skipped)
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(skipped)}, strict=True)
    model.fingerprint = fingerprint(ckpt.config, state_dict)
    return model.to(device).eval().requires_grad_(False)

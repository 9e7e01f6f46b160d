"""``load_tokenizer``: build the right model for a checkpoint and load it strictly."""
from __future__ import annotations

import torch

from .base import ImageTokenizer
from .checkpoint import CheckpointError, check_state_dict, read_checkpoint

PARTS = ("all", "encoder")


def build_tokenizer(config: dict, parts: str = "all") -> ImageTokenizer:
    """Instantiate (randomly initialised) the tokenizer a config describes."""
    if parts not in PARTS:
        raise ValueError(f"parts must be one of {PARTS}, not {parts!r}")
    if "flextok" in str(config.get("_target_", "")).lower():
        from .flextok import FlexTok

        return FlexTok.from_config(config, parts=parts)
    if "vq_model" in config.get("model", {}):
        from .titok import TiTok

        return TiTok.from_config(config, parts=parts)
    raise CheckpointError(
        "unknown tokenizer config: expected a TiTok config (model.vq_model) "
        "or a FlexTok config (_target_ naming flextok)"
    )


def load_tokenizer(
    src: str, device: str | torch.device = "cpu", parts: str = "all", storage_options: dict | None = None
) -> ImageTokenizer:
    """Load a tokenizer from a directory or fsspec URL holding config.json + weights.

    ``parts="encoder"`` skips decoder weights (pipeline actors). The model is returned in
    ``eval()`` mode on ``device`` with ``fingerprint`` set.
    """
    ckpt = read_checkpoint(src, storage_options)
    model = build_tokenizer(ckpt.config, parts=parts)
    skipped = model.decoder_prefixes if parts == "encoder" else ()
    check_state_dict(model, ckpt.state_dict, skipped)
    model.load_state_dict({k: v for k, v in ckpt.state_dict.items() if not k.startswith(skipped)}, strict=True)
    model.fingerprint = ckpt.fingerprint
    return model.to(device).eval().requires_grad_(False)

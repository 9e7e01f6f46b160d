"""The VAE config a FlexTok checkpoint points to (``vae.hf_hub_path``), read with the checkpoint.

The official wrapper builds its VAE with ``AutoencoderKL.from_pretrained(hf_hub_path)``, so the
architecture (and the scaling factor when the node has none) lives in that repo's ``config.json``;
the FlexTok weights hold the VAE's tensors. Reading it when the checkpoint is read keeps the
:class:`~tokenizer.checkpoint.Checkpoint` self-contained: actors never need the hub.
"""
from __future__ import annotations

import json

from ..errors import CheckpointError
from ..sources import open_source
from .config import is_flextok_config, missing_vae_config


def attach_vae_config(config: dict, storage_options: dict | None = None) -> dict:
    """``config`` plus ``vae_config`` from ``vae.hf_hub_path`` (any source form) when it needs one;
    unchanged for other configs, a null ``hf_hub_path`` or an inline ``vae_config``."""
    if not is_flextok_config(config) or "vae_config" in config:
        return config
    path = (config.get("vae") or {}).get("hf_hub_path")
    if not path:
        return config
    try:
        blob = open_source(str(path), storage_options).read("config.json")
    except CheckpointError as e:
        raise missing_vae_config(path, str(e)) from None
    if blob is None:
        raise missing_vae_config(path, "it has no config.json")
    try:
        vae_config = json.loads(blob)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise missing_vae_config(path, f"its config.json is not valid JSON ({e})") from None
    return {**config, "vae_config": vae_config}

"""Reading tokenizer checkpoints (config + weights) from any source ``tokenizer.sources`` accepts.

A :class:`Checkpoint` is the checkpoint in memory: the config and the weight file's bytes exactly
as stored. It is what crosses a cluster: the driver reads it once and ships it (one ``ray.put``),
every actor builds its model from those bytes and checks the fingerprint, so no node needs hub or
storage access and all of them hold byte-identical weights.

Weights load without executing code: safetensors, or ``torch.load(weights_only=True)``. The
config comes from ``config.json`` beside the weights or, failing that, from the safetensors header
(``tokenizer.header_config``).
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as load_safetensors_bytes

from .errors import CheckpointError
from .flextok.hub_vae import attach_vae_config
from .header_config import config_from_metadata, safetensors_metadata
from .sources import SourceFiles, open_source

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

__all__ = ["Checkpoint", "CheckpointError", "WEIGHT_FILES", "check_state_dict", "fingerprint", "read_checkpoint"]


def fingerprint(config: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical config JSON and every tensor (name, dtype, shape, bytes).

    Independent of the weight file's format and of which parts are later loaded. ``config`` is
    the config as published (before defaults and ``${...}`` interpolations are applied), so the
    same download always gives the same fingerprint.
    """
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Checkpoint:
    """A checkpoint in memory. ``config`` is the published config (for a FlexTok whose VAE lives
    in another repo, plus that VAE's config under ``vae_config``); ``weights`` the bytes of the
    weight file ``weights_name``; ``source`` where it was read (no credentials; a hub source names
    its commit); ``name`` a short name."""

    config: dict
    weights: bytes = field(repr=False)
    weights_name: str
    source: str
    name: str

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors, parsed from ``weights`` on each call (nothing cached, nothing executed)."""
        return _parse_weights(self.weights, self.weights_name, f"{self.source} ({self.weights_name})")

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.config, self.state_dict())


def read_checkpoint(src: str | Checkpoint, storage_options: dict | None = None) -> Checkpoint:
    """Read the checkpoint ``src`` names (a Checkpoint is returned as it is)."""
    if isinstance(src, Checkpoint):
        return src
    files = open_source(src, storage_options)
    # A folder's small config.json first (a hub source then pins its commit before any large download).
    config = None if files.file else _config_json(files)
    weights_name, blob = _read_weights(files, config is not None)
    if config is None:
        config = _header_config(files, weights_name, blob)
    return Checkpoint(attach_vae_config(config, storage_options), blob, weights_name, files.source, files.name)


def _config_json(files: SourceFiles) -> dict | None:
    text = files.read("config.json")
    if text is None:
        return None
    try:
        config = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"config.json of {files.source} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"config.json of {files.source} is not a JSON object")
    return config


def _read_weights(files: SourceFiles, has_config: bool) -> tuple[str, bytes]:
    for name in (files.file,) if files.file else WEIGHT_FILES:
        blob = files.read(name)
        if blob is not None:
            return name, blob
    if files.file:
        raise CheckpointError(f"no such weight file: {files.source}")
    raise CheckpointError(
        f"no {'weights' if has_config else 'config.json or weights'} in {files.source}: "
        f"expected {' or '.join(WEIGHT_FILES)}"
    )


def _header_config(files: SourceFiles, weights_name: str, blob: bytes) -> dict:
    """The config in a safetensors header; for a named weight file without one, the config.json beside it."""
    if weights_name.endswith(".safetensors"):
        config = config_from_metadata(safetensors_metadata(blob, files.source), files.source)
        if config is not None:
            return config
    config = _config_json(files) if files.file else None
    if config is None:
        in_header = f" and no config in the header of {weights_name}" if weights_name.endswith(".safetensors") else ""
        raise CheckpointError(f"no config.json in {files.source}{in_header}")
    return config


def _parse_weights(blob: bytes, name: str, where: str) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        try:
            return load_safetensors_bytes(blob)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{where} is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{where} refused: it is a pickle that needs code execution to load "
            f"(only plain tensors are accepted; convert it to safetensors). Detail: {e}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{where} is not a readable torch checkpoint: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{where} does not hold a flat state dict of tensors")
    return obj


def check_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], skipped_prefixes: tuple[str, ...] = ()
) -> None:
    """Fail before any work when keys are missing, unexpected or of the wrong shape.

    Keys under ``skipped_prefixes`` (decoder weights in an encoder-only load) are allowed in the
    checkpoint but not loaded.
    """
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if not k.startswith(skipped_prefixes)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(given)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    )
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    if problems:
        raise CheckpointError("checkpoint does not match the model config; " + "; ".join(problems))

"""Reading tokenizer checkpoints (config.json + weights) from a directory or any fsspec URL.

Weights load without executing code: safetensors, or ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import pickle
from dataclasses import dataclass

import fsspec
import torch
from safetensors.torch import load as load_safetensors_bytes

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked; the message names the problem."""


@dataclass
class Checkpoint:
    config: dict
    state_dict: dict[str, torch.Tensor]
    weights_url: str

    @property
    def fingerprint(self) -> str:
        """sha256 over the canonical config JSON and every tensor (name, dtype, shape, bytes).

        Independent of the file format and of which parts are later loaded.
        """
        h = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode())
        for name in sorted(self.state_dict):
            t = self.state_dict[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()


def _join(src: str, name: str) -> str:
    return src.rstrip("/") + "/" + name


def read_checkpoint(src: str, storage_options: dict | None = None) -> Checkpoint:
    """Read ``config.json`` and the first of ``WEIGHT_FILES`` found under ``src``."""
    fs, root = fsspec.core.url_to_fs(src, **(storage_options or {}))
    config_path = _join(root, "config.json")
    if not fs.exists(config_path):
        raise CheckpointError(f"no config.json in {src}")
    with fs.open(config_path, "rb") as f:
        try:
            config = json.loads(f.read())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{src}/config.json is not valid JSON: {e}") from e
    for name in WEIGHT_FILES:
        path = _join(root, name)
        if fs.exists(path):
            with fs.open(path, "rb") as f:
                blob = f.read()
            return Checkpoint(config, _parse_weights(blob, name, _join(src, name)), _join(src, name))
    raise CheckpointError(f"no weights in {src}: expected one of {', '.join(WEIGHT_FILES)}")


def _parse_weights(blob: bytes, name: str, url: str) -> dict[str, torch.Tensor]:
    if name.endswith(".safetensors"):
        try:
            return load_safetensors_bytes(blob)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{url} is not a valid safetensors file: {e}") from e
    try:
        obj = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{url} refused: it is a pickle that needs code execution to load "
            f"(only plain tensors are accepted; convert it to safetensors). Detail: {e}"
        ) from e
    except Exception as e:
        raise CheckpointError(f"{url} is not a readable torch checkpoint: {e}") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{url} does not hold a flat state dict of tensors")
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

"""Generator checkpoints: a directory of safetensors + JSON.

```
CKPT/config.json           {"format": "pretok-generator", "generator": GeneratorConfig, ...caller metadata}
CKPT/model.safetensors     model state dict (official ImageBert key names)
CKPT/optimizer.safetensors optimizer tensors "state.{param}.{name}"; param groups in the metadata
CKPT/state.json            TrainState: step, epoch, batches of that epoch consumed
```
A save writes a fresh sibling directory and swaps it in, so a crash never mixes two steps.
``load_generator`` also reads an official TiTok generator folder as published (config.json with
``model.generator`` + model.safetensors or pytorch_model.bin), from any source the tokenizer
loader accepts: a hub repo id (``yucornetto/generator_titok_l32_imagenet[@rev]``), ``hf://``, a
local folder or an fsspec URL.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from tokenizer.checkpoint import read_checkpoint
from tokenizer.interpolation import resolve_interpolations

from .model import GeneratorConfig, MaskGITTransformer
from .sample import SamplerConfig

FORMAT = "pretok-generator"
CONFIG, MODEL, OPTIMIZER, STATE = "config.json", "model.safetensors", "optimizer.safetensors", "state.json"
# Buffers some transformers versions saved with BertModel; not parameters of the model.
_IGNORED_KEYS = ("model.embeddings.position_ids",)


@dataclass
class TrainState:
    step: int = 0    # optimizer steps done
    epoch: int = 0   # epoch of the next batch
    batch: int = 0   # batches of ``epoch`` already consumed


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    return tensors, meta


def _optimizer_state_dict(path: str) -> dict:
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        state: dict[int, dict] = {}
        for key in f.keys():
            _, param, name = key.split(".", 2)
            state.setdefault(int(param), {})[name] = f.get_tensor(key)
    for key, value in json.loads(meta["scalars"]).items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    groups = json.loads(meta["param_groups"])
    for group in groups:  # JSON turned AdamW's betas tuple into a list
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    path: str | os.PathLike,
    model: MaskGITTransformer,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    metadata: dict | None = None,
) -> None:
    """Write the checkpoint to ``path`` (local directory), replacing any previous one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.mkdir(parents=True)
    model_sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_sd, str(tmp / MODEL))
    tensors, meta = _optimizer_tensors(optimizer)
    save_file(tensors, str(tmp / OPTIMIZER), metadata=meta)
    config = {"format": FORMAT, "generator": model.config.to_dict(), **(metadata or {})}
    (tmp / CONFIG).write_text(json.dumps(config, indent=1))
    (tmp / STATE).write_text(json.dumps(asdict(state)))
    old = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.old")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def has_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / STATE).is_file()


def read_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / CONFIG).read_text())


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


def _model_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if (path / MODEL).is_file():
        sd = load_file(str(path / MODEL))
    elif (path / "pytorch_model.bin").is_file():
        sd = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{path} has neither {MODEL} nor pytorch_model.bin")
    return {k: v for k, v in sd.items() if k not in _IGNORED_KEYS}


def load_checkpoint(
    path: str | os.PathLike, model: MaskGITTransformer, optimizer: torch.optim.Optimizer | None = None
) -> TrainState:
    """Load weights (strict) and, when given, the optimizer state into existing objects."""
    path = Path(path)
    config = generator_config(read_config(path))
    if config != model.config:
        raise ValueError(f"checkpoint {path} holds {config}, the model is {model.config}")
    model.load_state_dict(_model_state_dict(path), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_state_dict(str(path / OPTIMIZER)))
    return TrainState(**json.loads((path / STATE).read_text())) if (path / STATE).is_file() else TrainState()


def load_generator(
    src: str | os.PathLike, device: str | torch.device = "cpu", storage_options: dict | None = None
) -> tuple[MaskGITTransformer, dict]:
    """Model (eval mode, on ``device``) and its config.json (as published) from a pretok checkpoint
    or an official generator folder, from any source ``tokenizer.sources`` accepts."""
    ckpt = read_checkpoint(str(src), storage_options)
    model = MaskGITTransformer(generator_config(ckpt.config))
    state_dict = {k: v for k, v in ckpt.state_dict().items() if k not in _IGNORED_KEYS}
    model.load_state_dict(state_dict, strict=True)
    return model.to(device).eval(), ckpt.config

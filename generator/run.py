"""A training run directory on any fsspec URL: atomic step checkpoints and the metrics log.

```
CKPT/latest.json                  {"step": k, "dir": "step-0000000k"}   replaced last: the commit
CKPT/step-0000000k/config.json    {"format": "pretok-generator", "generator": ..., "train": ..., "data": ...}
CKPT/step-0000000k/model.safetensors      raw weights (official ImageBert key names)
CKPT/step-0000000k/ema.safetensors        EMA of the weights, same keys
CKPT/step-0000000k/optimizer.safetensors  "state.{param}.{name}" tensors; param groups in the metadata
CKPT/step-0000000k/state.json             TrainState
CKPT/metrics.jsonl                one JSON object per step up to the commit (rewritten at each commit)
CKPT/curves.png                   the curves, drawn at the end of a run
```
A commit writes the step folder, then metrics.jsonl, then swaps latest.json; a crash at any point
leaves the previous commit intact (readers only follow latest.json). No pickles anywhere.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass

import fsspec
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from tokenizer.header_config import safetensors_metadata

LATEST, METRICS, CURVES = "latest.json", "metrics.jsonl", "curves.png"
CONFIG, MODEL, EMA, OPTIMIZER, STATE = "config.json", "model.safetensors", "ema.safetensors", \
    "optimizer.safetensors", "state.json"


@dataclass
class TrainState:
    step: int = 0     # optimizer steps done
    epoch: int = 0    # epoch of the next global batch
    batch: int = 0    # global batches of ``epoch`` already consumed
    samples: int = 0  # samples trained on


def step_dir(step: int) -> str:
    return f"step-{step:08d}"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param}.{name}"] = value
    return tensors, {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}


def optimizer_state_dict(blob: bytes, where: str) -> dict:
    meta = safetensors_metadata(blob, where)
    state: dict[int, dict] = {}
    for key, value in load_safetensors(blob).items():
        _, param, name = key.split(".", 2)
        state.setdefault(int(param), {})[name] = value
    for key, value in json.loads(meta["scalars"]).items():
        param, name = key.split(".", 1)
        state.setdefault(int(param), {})[name] = value
    groups = json.loads(meta["param_groups"])
    for group in groups:  # JSON turned AdamW's betas tuple into a list
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


class RunDir:
    """The run directory ``url`` (local path or fsspec URL)."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def latest(self) -> dict | None:
        """``{"step", "dir"}`` of the last commit, None for an empty run directory."""
        path = self._path(LATEST)
        return json.loads(self.fs.cat_file(path)) if self.fs.exists(path) else None

    def read_json(self, folder: str, name: str) -> dict:
        return json.loads(self.fs.cat_file(self._path(folder, name)))

    def read_bytes(self, folder: str, name: str) -> bytes:
        return self.fs.cat_file(self._path(folder, name))

    def load_tensors(self, folder: str, name: str) -> dict[str, torch.Tensor]:
        return load_safetensors(self.read_bytes(folder, name))

    def metrics(self, upto: int) -> list[dict]:
        """The logged records of steps <= ``upto`` (later ones belong to no commit)."""
        path = self._path(METRICS)
        if not self.fs.exists(path):
            return []
        records = [json.loads(line) for line in self.fs.cat_file(path).decode().splitlines() if line.strip()]
        return [r for r in records if r["step"] <= upto]

    def _write(self, path: str, data: bytes) -> None:
        """Whole-file write; on a local disk through a temporary name and a rename (S3 puts are atomic)."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)

    def commit(
        self,
        state: TrainState,
        config: dict,
        model: dict[str, torch.Tensor],
        ema: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        records: list[dict],
        keep: int = 2,
    ) -> None:
        """Write step ``state.step`` and make it the latest; keep the newest ``keep`` step folders."""
        folder = step_dir(state.step)
        tensors, meta = optimizer_tensors(optimizer)
        files = {
            MODEL: save_safetensors(_cpu(model)),
            EMA: save_safetensors(_cpu(ema)),
            OPTIMIZER: save_safetensors(tensors, metadata=meta),
            CONFIG: json.dumps(config, indent=1).encode(),
            STATE: json.dumps(asdict(state)).encode(),
        }
        for name, data in files.items():
            self._write(self._path(folder, name), data)
        self._write(self._path(METRICS), "".join(json.dumps(r) + "\n" for r in records).encode())
        self._write(self._path(LATEST), json.dumps({"step": state.step, "dir": folder}).encode())
        self._prune(keep)

    def _prune(self, keep: int) -> None:
        folders = sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))
        steps = [f for f in folders if f.startswith("step-")]
        for old in steps[:-keep]:
            self.fs.rm(self._path(old), recursive=True)

    def write_file(self, name: str, data: bytes) -> None:
        self._write(self._path(name), data)

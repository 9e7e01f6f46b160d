"""A real Hugging Face hub cache in a folder, in the layout ``huggingface_hub`` writes it.

```
ROOT/models--org--name/blobs/<sha256 (weights) or git blob sha1 (small files)>
ROOT/models--org--name/snapshots/<commit>/<path>   -> relative symlink to ../../blobs/<id>
ROOT/models--org--name/refs/<branch or tag>         the commit hash, no newline
```
``use_hub_cache`` points the library at it offline, as ``HF_HUB_CACHE=ROOT HF_HUB_OFFLINE=1`` in the
environment would (the library reads both at import, so the already imported constants are set too).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors.torch import save

LFS_SUFFIXES = (".safetensors", ".bin")
TOKEN_CANARY = "hf_pretokCanary0123456789abcdefXYZ"  # a distinctive HF_TOKEN that must never be echoed


def _blob_id(path: str, data: bytes) -> str:
    if path.endswith(LFS_SUFFIXES):  # LFS files are stored under their sha256
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git blob id


@dataclass(frozen=True)
class HubCache:
    root: Path

    def add(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """One commit of model repo ``repo_id`` holding ``files`` (path in repo -> bytes), with the
        ref ``revision`` pointing at it; returns the commit hash."""
        repo = self.root / f"models--{repo_id.replace('/', '--')}"
        blob_ids = {path: _blob_id(path, data) for path, data in files.items()}
        commit = hashlib.sha1(json.dumps([repo_id, sorted(blob_ids.items())]).encode()).hexdigest()
        for path, data in files.items():
            blob = repo / "blobs" / blob_ids[path]
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = repo / "snapshots" / commit / path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
        return commit

    def add_checkpoint(self, repo_id: str, config: dict | None, state_dict: dict, revision: str = "main",
                       metadata: dict[str, str] | None = None) -> str:
        """A checkpoint repo: ``config.json`` (unless None) + ``model.safetensors`` with header ``metadata``
        (default ``{"format": "pt"}``, what ``PyTorchModelHubMixin`` writes)."""
        files = {"model.safetensors": save(state_dict, metadata={"format": "pt"} if metadata is None else metadata)}
        if config is not None:
            files["config.json"] = json.dumps(config, indent=4).encode()
        return self.add(repo_id, files, revision)


def use_hub_cache(monkeypatch: pytest.MonkeyPatch, root: Path) -> HubCache:
    """Make ``root`` the hub cache, offline, for this process and its children."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    root.mkdir(parents=True, exist_ok=True)
    return HubCache(root)

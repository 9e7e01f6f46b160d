"""Where a checkpoint comes from: a local folder, any fsspec URL, or a Hugging Face hub repo.

Accepted forms (``SOURCE_HELP`` says the same for ``--help`` texts):

* ``org/name`` or ``org/name@revision`` - a hub repo id (when no local path of that name exists);
* ``hf://[datasets/|spaces/]org/name[@revision][/path]`` - the same, optionally a folder or a file
  inside the repo (parsed with ``huggingface_hub.parse_hf_uri``, which needs no network);
* a local folder or any fsspec URL (``s3://...``, ``file://...``);
* any of these naming a weight file itself (``.../model.safetensors``): its header may hold the config.

Hub files are fetched one by one with ``huggingface_hub.hf_hub_download``, so the library's rules
apply unchanged: its cache (``HF_HOME`` / ``HF_HUB_CACHE``), ``HF_HUB_OFFLINE=1`` (cache only), and
the token from ``HF_TOKEN`` or ``hf auth login``, which pretok never reads, logs or stores. The first
file fetched pins the commit, so every file of one checkpoint comes from the same commit, and the
display form of a hub source names that commit (``hf://org/name@<sha>``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import fsspec
from huggingface_hub import HfUri, constants, hf_hub_download, parse_hf_uri
from huggingface_hub.errors import (
    GatedRepoError, HfHubHTTPError, HfUriError, LocalEntryNotFoundError, RemoteEntryNotFoundError,
    RepositoryNotFoundError, RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from .errors import CheckpointError

SOURCE_HELP = (
    "a Hugging Face repo id org/name[@revision] (resolved through the hub cache; HF_HUB_OFFLINE=1 and HF_TOKEN "
    "are honoured), an hf://org/name[@revision][/path] URL, a local folder or any fsspec URL (s3://...) with "
    "config.json + model.safetensors (or pytorch_model.bin), or a bare model.safetensors whose header holds the config"
)
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_BARE_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+(@\S+)?")


class SourceFiles:
    """The files of one checkpoint folder, read by name.

    ``file`` is the weight file's name when the source named a file rather than a folder;
    ``source`` is a display form without credentials; ``name`` a short name for the checkpoint.
    """

    file: str | None
    name: str

    @property
    def source(self) -> str:
        raise NotImplementedError

    def read(self, filename: str) -> bytes | None:
        """The file's bytes, None when the folder has no such file."""
        raise NotImplementedError


def _split_file(path: str) -> tuple[str, str | None]:
    """(folder, file name) when ``path`` names a weight file, else (path, None)."""
    path = path.rstrip("/")
    if path.endswith(WEIGHT_SUFFIXES):
        folder, _, name = path.rpartition("/")
        return folder, name
    return path, None


def _redact(url: str) -> str:
    return re.sub(r"(?<=://)[^/@]*@", "", url)


class FsFiles(SourceFiles):
    """A local folder or an fsspec URL."""

    def __init__(self, url: str, storage_options: dict | None = None):
        self.url, self.file = _split_file(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url or ".", **(storage_options or {}))
        self.name = _redact(self.url).rstrip("/").rsplit("/", 1)[-1] or Path.cwd().name

    @property
    def source(self) -> str:
        return _redact(self.url + (f"/{self.file}" if self.file else ""))

    def read(self, filename: str) -> bytes | None:
        path = self.root.rstrip("/") + "/" + filename
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            return f.read()


class HubFiles(SourceFiles):
    """A folder (or a file) of a hub repo, fetched through the hub cache."""

    def __init__(self, uri: HfUri, from_bare_id: bool = False):
        if uri.is_bucket:
            raise CheckpointError(f"{uri.to_uri()}: hub buckets are not supported; use a model repo")
        self.uri, self.from_bare_id = uri, from_bare_id
        self.folder, self.file = _split_file(uri.path_in_repo)
        self.commit: str | None = None
        self.name = (self.folder.rsplit("/", 1)[-1] if self.folder else "") or uri.id.split("/")[1]

    @property
    def source(self) -> str:
        prefix = "" if self.uri.type == "model" else f"{self.uri.type}s/"
        revision = self.commit or self.uri.revision
        return (f"hf://{prefix}{self.uri.id}" + (f"@{revision.replace('/', '%2F')}" if revision else "")
                + (f"/{self.folder}" if self.folder else "") + (f"/{self.file}" if self.file else ""))

    def read(self, filename: str) -> bytes | None:
        path = self._fetch(f"{self.folder}/{filename}" if self.folder else filename)
        return None if path is None else Path(path).read_bytes()

    def _fetch(self, repo_path: str) -> str | None:
        repo = self.uri.id
        try:
            path = hf_hub_download(repo, repo_path, repo_type=self.uri.type, revision=self.commit or self.uri.revision)
        except RemoteEntryNotFoundError:
            return None
        except LocalEntryNotFoundError:
            problem = self._cache_problem()
            if problem:
                raise CheckpointError(problem) from None
            return None  # the cached snapshot has no such file
        except RevisionNotFoundError:
            raise CheckpointError(f"hub repo {repo} has no revision {self.uri.revision!r}") from None
        except (RepositoryNotFoundError, GatedRepoError) as e:
            gated = isinstance(e, GatedRepoError)
            raise CheckpointError(
                f"hub repo {repo} {'is gated' if gated else 'was not found'}{self._not_local()}: private and gated "
                "repos need a token (HF_TOKEN, or `hf auth login`) with access"
            ) from None
        except (HfHubHTTPError, OSError) as e:
            raise CheckpointError(f"cannot fetch {repo_path} from hub repo {repo}: {type(e).__name__}: {e}") from None
        if self.commit is None:
            snapshot = Path(path)
            for _ in repo_path.split("/"):
                snapshot = snapshot.parent
            self.commit = snapshot.name
        return path

    def _not_local(self) -> str:
        return f" (and there is no local folder {self.uri.id})" if self.from_bare_id else ""

    def _cache_problem(self) -> str | None:
        """Why the hub cache cannot serve this repo/revision, or None when it holds that snapshot."""
        repo, cache = self.uri.id, constants.HF_HUB_CACHE
        folder = Path(cache) / repo_folder_name(repo_id=repo, repo_type=self.uri.type)
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub could not be reached"
        if not folder.is_dir():
            return (
                f"hub repo {repo} is not in the local hub cache ({cache}){self._not_local()} and cannot be downloaded "
                f"({why}). Download it where the hub is reachable: `hf download {repo}` (then share that cache via "
                "HF_HOME / HF_HUB_CACHE), or pass a local folder"
            )
        revision = self.commit or self.uri.revision or constants.DEFAULT_REVISION
        if (folder / "refs" / revision).is_file() or (folder / "snapshots" / revision).is_dir():
            return None
        refs = {p.name: p.read_text().strip() for p in (folder / "refs").glob("*") if p.is_file()}
        loose = sorted(p.name[:12] for p in (folder / "snapshots").glob("*")
                       if p.is_dir() and p.name not in refs.values())
        cached = [f"{name} ({commit[:12]})" for name, commit in sorted(refs.items())] + loose
        return (
            f"revision {revision!r} of hub repo {repo} is not in the local hub cache ({cache}; cached: "
            f"{', '.join(cached) or 'none'}) and cannot be downloaded ({why}): "
            f"`hf download {repo} --revision {revision}`"
        )


def hub_uri(src: str) -> tuple[HfUri, bool] | None:
    """(parsed hub location, given as a bare repo id) for a hub source; None for anything else.

    ``hf://`` URLs always name the hub. A bare ``org/name[@revision]`` does when no local path of
    that name exists.
    """
    if src.startswith("hf://"):
        try:
            return parse_hf_uri(src), False
        except HfUriError as e:
            raise CheckpointError(str(e)) from None
    if "://" in src or not _BARE_REPO_ID.fullmatch(src) or os.path.exists(src):
        return None
    try:
        uri = parse_hf_uri("hf://" + src)
    except HfUriError:
        return None
    return (uri, True) if not uri.path_in_repo and uri.type == "model" else None


def open_source(src: str, storage_options: dict | None = None) -> SourceFiles:
    """The files of the checkpoint ``src`` names (see the module docstring for the forms)."""
    hub = hub_uri(src)
    return HubFiles(*hub) if hub else FsFiles(src, storage_options)

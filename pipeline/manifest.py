"""``pretok.json``: what an output dataset was made with, and the check that a run may add to it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata

from tokenizer.checkpoint import Checkpoint, read_checkpoint
from tokenizer.loading import build_tokenizer
from tokenizer.transform import ImageTransform

from .layout import OutputLayout, filesystem
from .ledger import redact_url
from .records import SourceListing
from .sources.storage import storage_errors
from .writer import write_text_atomic

FORMAT_VERSION = 1
MISSING_KEY = "missing"  # a split's named input shards that did not exist (--allow-missing): informative


class ManifestMismatch(RuntimeError):
    """The output already holds tokens made differently; refused unless ``--overwrite``."""


class OutputError(OSError):
    """The output cannot be read or written; the message names its URL, never a credential."""


@dataclass(frozen=True)
class TokenizerInfo:
    family: str
    name: str
    source: str        # where it was loaded from (credentials removed; hub: hf://org/name@<commit>); not compared
    fingerprint: str
    num_tokens: int
    codebook_size: int
    ordered: bool
    image_size: int

    @classmethod
    def from_checkpoint(cls, src: str | Checkpoint, storage_options: dict | None = None) -> "TokenizerInfo":
        """Fingerprint and shape of a checkpoint (a source, or one already read) without allocating
        the model's weights."""
        import torch

        ckpt = read_checkpoint(src, storage_options)
        with torch.device("meta"):
            model = build_tokenizer(ckpt.config, parts="encoder")
        return cls(
            family=model.family,
            name=ckpt.name,
            source=redact_url(ckpt.source),
            fingerprint=ckpt.fingerprint,
            num_tokens=model.num_tokens,
            codebook_size=model.codebook_size,
            ordered=model.ordered,
            image_size=model.image_size,
        )


def _software() -> dict[str, str]:
    out = {}
    for pkg in ("pretok", "torch", "pyarrow", "ray", "pillow", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def build_manifest(
    tok: TokenizerInfo, transform: ImageTransform, precision: str, listing: SourceListing, split: str,
    token_counts: dict | None = None,
) -> dict:
    """``token_counts``: the settings of the ``num_tokens_needed`` column, None when it is off."""
    # Names only: fixing a corrupt input shard (new size) and rerunning must stay possible. Named
    # shards still missing count too, so a rerun once they exist resumes into the same names.
    named = sorted((*listing.shards, *listing.missing), key=lambda s: s.index)
    shard_list = [[s.index, redact_url(s.url), list(s.members)] for s in named]
    split_entry = {
        "input": redact_url(listing.url),
        "format": listing.format,
        "num_shards": listing.num_shards,
        "shard_list_sha256": _sha(shard_list),
    }
    if listing.missing:
        split_entry[MISSING_KEY] = [redact_url(s.url) for s in listing.missing]
    return {
        "format_version": FORMAT_VERSION,
        "tokenizer": tok.__dict__.copy(),
        "transform": transform.describe(),
        "precision": precision,
        "token_counts": token_counts,
        "label_names": list(listing.label_names) if listing.label_names else None,
        "kept": [asdict(f) for f in listing.kept] or None,
        "splits": {split: split_entry},
        "software": _software(),
    }


def run_fingerprint(manifest: dict, split: str) -> str:
    """Identity of the tokens one split holds: tokenizer, transform, precision, token-count
    settings and kept columns (when on) and its inputs.

    Software versions are recorded but not compared, so an upgrade does not block a resume.
    """
    parts = [manifest["tokenizer"]["fingerprint"], manifest["transform"], manifest["precision"],
             split, _split_identity(manifest["splits"][split])]
    for optional in ("token_counts", "kept"):  # absent or null: the fingerprint of earlier versions
        if manifest.get(optional) is not None:
            parts.append(manifest[optional])
    return _sha(parts)


def _split_identity(entry: dict) -> dict:
    """A split's manifest entry without the shards still missing (they may appear later)."""
    return {k: v for k, v in entry.items() if k != MISSING_KEY}


def _mismatch(old: dict, new: dict, split: str) -> list[str]:
    diffs = []
    if old.get("tokenizer", {}).get("fingerprint") != new["tokenizer"]["fingerprint"]:
        diffs.append(f"tokenizer {old.get('tokenizer', {}).get('name')} -> {new['tokenizer']['name']} (fingerprint differs)")
    for field in ("transform", "precision", "token_counts", "label_names", "kept"):
        if old.get(field) != new.get(field):
            diffs.append(f"{field}: {old.get(field)} -> {new.get(field)}")
    if split in old.get("splits", {}) and _split_identity(old["splits"][split]) != _split_identity(new["splits"][split]):
        diffs.append(f"split {split!r} input: {old['splits'][split]} -> {new['splits'][split]}")
    return diffs


def prepare_output(
    layout: OutputLayout, manifest: dict, overwrite: bool, storage_options: dict | None = None
) -> dict:
    """Write (or merge into) ``pretok.json`` before any shard; refuse a differing run.

    With ``overwrite``, previous data, stats and staging files are removed first.
    Returns the manifest now on disk.
    """
    with storage_errors("cannot read output", layout.root, storage_options, OutputError):
        fs, _ = filesystem(layout.root, storage_options)
        old = None
        if fs.exists(layout.manifest_path):
            old = json.loads(fs.cat_file(layout.manifest_path))
        if old is not None and overwrite:
            for d in (layout.data_dir, layout.stats_dir, layout.tmp_dir):
                if fs.exists(d):
                    fs.rm(d, recursive=True)
            old = None
    split = next(iter(manifest["splits"]))
    if old is not None:
        diffs = _mismatch(old, manifest, split)
        if diffs:
            raise ManifestMismatch(
                f"{redact_url(layout.root)} already holds tokens made differently: " + "; ".join(diffs)
                + ". Use a new output folder, or --overwrite to replace its contents."
            )
        manifest = {**old, "splits": {**old["splits"], **manifest["splits"]}, "software": manifest["software"]}
    with storage_errors("cannot write output", layout.root, storage_options, OutputError):
        write_text_atomic(layout.manifest_path, json.dumps(manifest, indent=1, sort_keys=True), storage_options)
    return manifest

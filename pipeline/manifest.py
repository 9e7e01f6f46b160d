"""``pretok.json``: what an output dataset was made with, and the check that a run may add to it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from importlib import metadata

from tokenizer.checkpoint import Checkpoint, check_state_dict, fingerprint, read_checkpoint
from tokenizer.loading import build_tokenizer
from tokenizer.transform import ImageTransform

from .layout import OutputError, OutputLayout, filesystem
from .ledger import redact_url
from .records import SourceListing
from .sources.storage import storage_errors
from .urls import canonical_url
from .writer import write_text_atomic

FORMAT_VERSION = 1
MISSING_KEY = "missing"  # a split's named input shards that did not exist (--allow-missing): informative


class ManifestMismatch(RuntimeError):
    """The output already holds tokens made differently; refused unless ``--overwrite``."""


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
        the model's weights.

        Strict: keys and shapes are checked against the meta-device model (no tensor math), so a
        checkpoint that does not fit its config fails here, before any actor starts."""
        import torch

        ckpt = read_checkpoint(src, storage_options)
        with torch.device("meta"):
            model = build_tokenizer(ckpt.config, parts="encoder")
        state_dict = ckpt.state_dict()  # parsed once: checked, then hashed
        check_state_dict(model, state_dict, model.decoder_prefixes)
        return cls(
            family=model.family,
            name=ckpt.name,
            source=redact_url(ckpt.source),
            fingerprint=fingerprint(ckpt.config, state_dict),
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
    token_counts: dict | None = None, fast_decode: bool = False,
) -> dict:
    """``token_counts``: the settings of the ``num_tokens_needed`` column, None when it is off;
    ``fast_decode``: JPEG DCT-domain downscaling on (recorded as ``decode``, absent when off)."""
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
        "decode": FAST_DECODE if fast_decode else None,
        "label_names": list(listing.label_names) if listing.label_names else None,
        "kept": [asdict(f) for f in listing.kept] or None,
        "splits": {split: split_entry},
        "software": _software(),
    }


def run_fingerprint(manifest: dict, split: str) -> str:
    """Identity of the tokens one split holds: tokenizer, transform, precision, token-count
    settings, kept columns and fast decoding (when on) and its inputs.

    Software versions are recorded but not compared, so an upgrade does not block a resume.
    """
    parts = [manifest["tokenizer"]["fingerprint"], manifest["transform"], manifest["precision"],
             split, _split_identity(manifest["splits"][split])]
    for optional in ("token_counts", "kept", "decode"):  # absent or null: the fingerprint of earlier versions
        if manifest.get(optional) is not None:
            parts.append(manifest[optional])
    return _sha(parts)


def _split_identity(entry: dict) -> dict:
    """A split's manifest entry without the shards still missing (they may appear later)."""
    return {k: v for k, v in entry.items() if k != MISSING_KEY}


SHARED_SETTINGS = ("transform", "precision", "token_counts", "decode", "label_names", "kept")
# What ``--fast-decode`` records: the views are not exactly those of the full-size image.
FAST_DECODE = {"fast_decode": True, "method": "JPEG DCT-domain downscale (PIL Image.draft, by 2/4/8) when the "
               "shorter side is >= 2x the resize target"}


def _shared_diffs(old: dict, new: dict) -> list[str]:
    """Settings every split of one dataset must share, where ``new`` differs from ``old``."""
    diffs = []
    if old.get("tokenizer", {}).get("fingerprint") != new["tokenizer"]["fingerprint"]:
        diffs.append(f"tokenizer {old.get('tokenizer', {}).get('name')} -> {new['tokenizer']['name']} (fingerprint differs)")
    for name in SHARED_SETTINGS:
        if old.get(name) != new.get(name):
            diffs.append(f"{name}: {old.get(name)} -> {new.get(name)}")
    return diffs


def _same_input(old_entry: dict, new_entry: dict) -> bool:
    """True when a stored split entry names the same input, also in an earlier version's spelling
    (relative path, trailing slash, ``s3a://``)."""
    old_entry, new_entry = _split_identity(old_entry), _split_identity(new_entry)
    if old_entry == new_entry:
        return True
    respelled = {**old_entry, "input": redact_url(canonical_url(str(old_entry.get("input", ""))))}
    return respelled == new_entry


def read_manifest(layout: OutputLayout, storage_options: dict | None = None) -> dict | None:
    with storage_errors("cannot read output", layout.root, storage_options, OutputError):
        fs, _ = filesystem(layout.root, storage_options)
        fs.invalidate_cache(layout.manifest_path)
        if not fs.exists(layout.manifest_path):
            return None
        return json.loads(fs.cat_file(layout.manifest_path))


def _remove_split(layout: OutputLayout, storage_options: dict | None) -> None:
    """Delete one split's data, stats and staged files (other splits' files stay)."""
    fs, _ = filesystem(layout.root, storage_options)
    doomed = []
    for folder in (layout.data_dir, layout.stats_dir, layout.tmp_dir):
        fs.invalidate_cache(folder)
        try:
            names = fs.ls(folder, detail=False)
        except FileNotFoundError:
            continue
        doomed += [p for p in names if layout.owns(p.rstrip("/").rsplit("/", 1)[-1])]
    if doomed:
        fs.rm(doomed)


def prepare_output(
    layout: OutputLayout, manifest: dict, overwrite: bool = False, storage_options: dict | None = None,
    overwrite_all: bool = False,
) -> dict:
    """Write (or merge into) ``pretok.json`` before any shard; refuse a run that does not fit.

    Hold the manifest lease. ``overwrite`` replaces this split only (its files and manifest
    entry), refused when the new settings differ from the other splits'; ``overwrite_all``
    replaces every split. A stored split entry that names the same input in an older spelling is
    kept as stored, so its run fingerprint (and the resume) stays valid. Returns the manifest now
    on disk.
    """
    old = read_manifest(layout, storage_options)
    _check_overwrite(layout, manifest, old, overwrite, overwrite_all)
    with storage_errors("cannot write output", layout.root, storage_options, OutputError):
        if overwrite_all:
            fs, _ = filesystem(layout.root, storage_options)
            for d in (layout.data_dir, layout.stats_dir, layout.tmp_dir):
                if fs.exists(d):
                    fs.rm(d, recursive=True)
        elif overwrite:
            _remove_split(layout, storage_options)
    manifest = _merge(layout, manifest, _without_replaced(old, layout.split, overwrite, overwrite_all))
    with storage_errors("cannot write output", layout.root, storage_options, OutputError):
        write_text_atomic(layout.manifest_path, json.dumps(manifest, indent=1, sort_keys=True), storage_options,
                          layout.tmp_dir)
    return manifest


def expected_manifest(
    layout: OutputLayout, manifest: dict, overwrite: bool = False, storage_options: dict | None = None,
    overwrite_all: bool = False,
) -> dict:
    """The manifest ``prepare_output`` would write, with the same refusals; reads only (dry runs)."""
    old = read_manifest(layout, storage_options)
    _check_overwrite(layout, manifest, old, overwrite, overwrite_all)
    return _merge(layout, manifest, _without_replaced(old, layout.split, overwrite, overwrite_all))


def _check_overwrite(layout: OutputLayout, manifest: dict, old: dict | None, overwrite: bool,
                     overwrite_all: bool) -> None:
    split = layout.split
    others = sorted(s for s in (old or {}).get("splits", {}) if s != split)
    if overwrite and not overwrite_all and others and (diffs := _shared_diffs(old, manifest)):
        raise ManifestMismatch(
            f"--overwrite replaces split {split!r} only, but the new settings differ from those of split(s) "
            f"{', '.join(others)} in {redact_url(layout.root)}: " + "; ".join(diffs)
            + ". Use --overwrite-all to replace every split, or a new output folder."
        )


def _without_replaced(old: dict | None, split: str, overwrite: bool, overwrite_all: bool) -> dict | None:
    """The stored manifest once the splits an overwrite replaces are gone (None: nothing left)."""
    if old is None or overwrite_all:
        return None
    if overwrite:
        rest = {s: e for s, e in old["splits"].items() if s != split}
        return {**old, "splits": rest} if rest else None
    return old


def _merge(layout: OutputLayout, manifest: dict, old: dict | None) -> dict:
    """``manifest`` merged into the stored ``old`` one; ManifestMismatch when they do not fit."""
    if old is None:
        return manifest
    split = layout.split
    new_entry = manifest["splits"][split]
    others = sorted(s for s in old["splits"] if s != split)
    diffs = _shared_diffs(old, manifest)
    entry = old["splits"].get(split)
    if entry is not None and not _same_input(entry, new_entry):
        diffs.append(f"split {split!r} input: {entry} -> {new_entry}")
    if diffs:
        only_input = len(diffs) == 1 and diffs[0].startswith("split ")
        remedy = (f"--overwrite to replace split {split!r}" if only_input or not others
                  else "--overwrite-all to replace every split")
        raise ManifestMismatch(
            f"{redact_url(layout.root)} already holds tokens made differently: " + "; ".join(diffs)
            + f". Use a new output folder, or {remedy}."
        )
    if entry is not None:  # kept as stored (spelling), with the shards that are missing now
        entry = {**_split_identity(entry), **({MISSING_KEY: new_entry[MISSING_KEY]} if MISSING_KEY in new_entry else {})}
    splits = {**old["splits"], split: entry if entry is not None else new_entry}
    return {**old, "splits": splits, "software": manifest["software"]}

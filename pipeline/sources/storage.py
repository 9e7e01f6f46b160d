"""Filesystem access and path rules shared by the readers, and the one error type they raise."""
from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import fsspec

# Bytes fetched per remote request; bounds the memory one open shard takes (local files ignore it).
READ_BLOCK_SIZE = 8 << 20
_SECRET_WORDS = ("key", "secret", "token", "password", "credential")
_MAX_DETAIL = 300


class SourceError(ValueError):
    """An input that cannot be listed or read; the message names the URL but never a credential."""


class BadShard(SourceError):
    """A shard whose content no retry can read: corrupt, truncated, of another format, or gone.

    Other ``SourceError``s (network, throttling, permissions) may pass on a retry."""


# Failures that come from the bytes themselves (tar, Parquet/Arrow, text decoding) or a missing file.
_CONTENT_ERRORS = (tarfile.TarError, ValueError, EOFError, FileNotFoundError, IsADirectoryError, NotADirectoryError)


def _is_content_error(e: Exception) -> bool:
    return isinstance(e, BadShard) or (isinstance(e, _CONTENT_ERRORS) and not isinstance(e, SourceError))


def open_input(fs: fsspec.AbstractFileSystem, path: str) -> IO[bytes]:
    """A sequential-read file object that fetches ``READ_BLOCK_SIZE`` bytes at a time."""
    return fs.open(path, "rb", block_size=READ_BLOCK_SIZE)


def is_hidden(relative: str) -> bool:
    """True for a path with a component starting with ``.`` (``.DS_Store``, ``.cache/...``)."""
    return any(part.startswith(".") for part in relative.split("/"))


def _secrets(options: Any, name: str = "") -> Iterator[str]:
    if isinstance(options, dict):
        for key, value in options.items():
            yield from _secrets(value, str(key).lower())
    elif isinstance(options, str) and len(options) >= 4 and any(w in name for w in _SECRET_WORDS):
        yield options


def redact(text: str, storage_options: dict | None) -> str:
    """``text`` without URL user-info or any credential-like value from ``storage_options``."""
    text = re.sub(r"//[^/@\s]*@", "//", text)
    for secret in _secrets(storage_options or {}):
        text = text.replace(secret, "***")
    return text


@contextmanager
def storage_errors(
    action: str, url: str, storage_options: dict | None, error: type[Exception] = SourceError
) -> Iterator[None]:
    """Re-raise any failure inside as ``error("{action} {url}: {what went wrong}")``; as
    ``BadShard`` when ``error`` is ``SourceError`` and the failure lies in the content.

    The original exception is dropped (``from None``) so no unredacted text travels with it.
    """
    try:
        yield
    except Exception as e:  # noqa: BLE001 - every storage failure becomes one clear error
        if isinstance(e, error):
            detail = str(e)
        elif isinstance(e, FileNotFoundError):
            detail = "not found"
        else:
            detail = f"{type(e).__name__}: {e}"[:_MAX_DETAIL]
        cls = BadShard if error is SourceError and _is_content_error(e) else error
        raise cls(redact(f"{action} {url}: {detail}", storage_options)) from None

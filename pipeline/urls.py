"""One spelling per location: what reaches a manifest, a fingerprint or an actor is canonical.

Local paths become absolute (actors on other nodes, or in a ``ray job submit`` working dir, resolve
relative paths elsewhere); trailing slashes go; ``s3a://``/``s3n://``/``S3://`` become ``s3://``.
"""
from __future__ import annotations

import os

_S3_SCHEMES = ("s3", "s3a", "s3n")


def is_local(url: str) -> bool:
    """True for a plain path or a ``file://`` URL."""
    scheme, sep, _ = url.partition("://")
    return not sep or scheme.lower() in ("file", "local")


def canonical_url(url: str) -> str:
    """The canonical spelling of ``url`` (user info, if any, is kept: redact before storing)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return os.path.abspath(os.path.expanduser(url))
    scheme = scheme.lower()
    if scheme in ("file", "local"):
        return os.path.abspath(rest)
    if scheme in _S3_SCHEMES:
        scheme = "s3"
    return f"{scheme}://{rest.rstrip('/')}"

"""Model configs stored in a safetensors header, as the official FlexTok code saves them.

``flextok.utils.checkpoint.save_safetensors`` writes ``__metadata__ = {key: str(value)}`` for each
top-level config key, so values are Python literal reprs (single quotes, ``None``, ``True``). They
are parsed with ``ast.literal_eval`` only. Like the official reader, a value that is not a literal
stays a string when it is a plain dotted name (``str()`` of a string such as a top-level
``_target_`` is the bare text); anything else is refused, naming the key.
"""
from __future__ import annotations

import ast
import json
import re

from .errors import CheckpointError

# The safetensors convention ({"format": "pt"} from save_model / transformers), not a config key.
FORMAT_KEY = "format"
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def safetensors_metadata(blob: bytes, where: str) -> dict[str, str]:
    """The ``__metadata__`` string map of a safetensors file held in ``blob`` (empty when absent)."""
    try:
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is not a valid safetensors file: unreadable header ({e})") from e
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def config_from_metadata(metadata: dict[str, str], where: str) -> dict | None:
    """The config a safetensors header holds, as plain JSON values; None when it holds none."""
    items = {k: v for k, v in metadata.items() if k != FORMAT_KEY}
    if not items:
        return None
    config = {}
    for key, text in items.items():
        try:
            config[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            if not _DOTTED_NAME.fullmatch(text.strip()):
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise CheckpointError(
                    f"{where}: header metadata key {key!r} is not a Python literal ({shown!r}); pretok parses "
                    "configs with ast.literal_eval only and never evaluates code"
                ) from None
            config[key] = text.strip()
        try:
            config[key] = json.loads(json.dumps(config[key]))  # tuples -> lists: one canonical form
        except (TypeError, ValueError) as e:
            raise CheckpointError(
                f"{where}: header metadata key {key!r} holds a value JSON cannot represent: {e}"
            ) from None
    return config

"""Argument types shared by the job CLIs."""
from __future__ import annotations

import argparse
import json


def storage_options(text: str) -> dict:
    """``--storage-options`` parser whose errors never echo the value (it may hold keys)."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}); value not shown") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return options

"""OmegaConf-style ``${a.b.c}`` references in the published configs, resolved as plain lookups.

The official configs are OmegaConf dumps taken without resolving interpolations, e.g.
``model.generator.image_seq_len: "${model.vq_model.num_latent_tokens}"``. A reference is a dotted
path into the same config (list items by index); nothing else (resolvers such as ``${oc.env:X}``,
relative ``${.x}`` paths, expressions) is evaluated.
"""
from __future__ import annotations

import re
from typing import Any

from .errors import CheckpointError

_REFERENCE = re.compile(r"\$\{([^{}]*)\}")
_PATH = re.compile(r"[A-Za-z_][\w-]*(\.[\w-]+)*")


def resolve_interpolations(config: dict) -> dict:
    """A copy of ``config`` in which every ``${path}`` is replaced by the value at ``path``.

    A string that is exactly one reference takes the referenced value with its type (an int stays
    an int); references inside a longer string are replaced by the value's text, as OmegaConf does.
    Unknown paths, unsupported reference syntax and cycles raise :class:`CheckpointError` naming
    the key that holds the reference.
    """

    def lookup(path: str, where: str, chain: tuple[str, ...]) -> Any:
        if not _PATH.fullmatch(path):
            raise CheckpointError(
                f"config key {where}: unsupported interpolation ${{{path}}} (only ${{dotted.path}} references "
                "into the same config are resolved; nothing is evaluated)"
            )
        if path in chain:
            raise CheckpointError(f"config key {where}: cyclic interpolation {' -> '.join((*chain, path))}")
        node: Any = config
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise CheckpointError(f"config key {where}: interpolation ${{{path}}} names no value in this config")
        return resolve(node, path, (*chain, path))

    def resolve(value: Any, where: str, chain: tuple[str, ...]) -> Any:
        if isinstance(value, dict):
            return {k: resolve(v, f"{where}.{k}" if where else str(k), chain) for k, v in value.items()}
        if isinstance(value, list):
            return [resolve(v, f"{where}.{i}", chain) for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _REFERENCE.fullmatch(value)
        if whole:
            return lookup(whole[1].strip(), where, chain)
        if value.count("${") != len(_REFERENCE.findall(value)):
            raise CheckpointError(f"config key {where}: malformed interpolation in {value!r}")
        return _REFERENCE.sub(lambda m: str(lookup(m[1].strip(), where, chain)), value)

    return resolve(config, "", ())

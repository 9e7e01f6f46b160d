"""Passthrough columns chosen with ``--keep``: names, types, and the typed values of each row.

Webdataset ``.json`` sidecar fields are typed from the first shard's first ``SAMPLE_SIDECARS``
samples (``--keep FIELD:TYPE`` fixes a type instead):

- all sampled values bool -> ``bool``; int -> ``int64``; float, or int and float mixed ->
  ``float64``; str -> ``string``; values seen only as null (or not at all with ``:TYPE``) ->
  ``string``;
- objects, arrays, integers beyond int64, and fields whose sampled values mix kinds -> ``json``:
  every value stored as JSON text (a ``string`` column; ``json.loads`` restores it).

The type is then fixed in the Arrow schema and the Features. A later value of another type is
stored as null and counted (``wrong_type``); an absent field or sidecar is null (``missing``); a
sidecar that is not a JSON object nulls every kept field (``invalid_json``). JSON null is null,
not counted. Parquet columns keep their Arrow type and feature; a value that does not fit it (a
later shard with another schema) is null, counted the same way.

A kept name equal to one of our own columns (``RESERVED``) is stored as ``src_{name}``.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import replace

import pyarrow as pa

from pipeline.records import DecodedImage, KeptField
from pipeline.sources.storage import SourceError

RESERVED = ("key", "tokens", "num_tokens_needed", "label", "caption", "width", "height")
CLASH_PREFIX = "src_"
SAMPLE_SIDECARS = 1000  # sidecars of the first shard read at listing time to infer the types
JSON_TYPES = {"bool": "bool", "int64": "int64", "float64": "float64", "string": "string", "json": "string"}
_INT64 = (-(1 << 63), (1 << 63) - 1)

MISSING, WRONG_TYPE, INVALID_JSON = "missing", "wrong_type", "invalid_json"


def parse_keep(specs: Iterable[str]) -> dict[str, str | None]:
    """``["a,b:float64", "c"]`` -> ``{"a": None, "b": "float64", "c": None}`` (name -> forced type)."""
    keep: dict[str, str | None] = {}
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, json_type = item.rpartition(":")
            if not sep or json_type not in JSON_TYPES:
                name, json_type = item, None
            if None not in (keep.get(name), json_type) and keep[name] != json_type:
                raise SourceError(f"--keep {name} is given the types {keep[name]} and {json_type}")
            keep[name] = json_type or keep.get(name)
    return keep


def column_names(sources: Sequence[str]) -> list[str]:
    """Output column of each kept source name; ``SourceError`` when two land on one column."""
    columns = [CLASH_PREFIX + s if s in RESERVED else s for s in sources]
    clashes = sorted({c for c in columns if columns.count(c) > 1} | (set(columns) & set(RESERVED)))
    if clashes:
        raise SourceError(f"kept fields would share the output column(s) {clashes}; keep only one of each")
    return columns


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if _INT64[0] <= value <= _INT64[1] else "json"
    if isinstance(value, float):
        return "float64"
    return "string" if isinstance(value, str) else "json"


def infer_json_type(values: Iterable) -> str:
    """The type of a sidecar field from its sampled values (None and absent values excluded)."""
    kinds = {_kind(v) for v in values if v is not None}
    if not kinds:
        return "string"
    if kinds == {"int64", "float64"}:
        return "float64"
    return kinds.pop() if len(kinds) == 1 else "json"


def parse_sidecar(text: str | None) -> dict | None:
    """The sidecar as a dict; None when it is not a JSON object."""
    try:
        obj = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def json_fields(
    sidecars: Sequence[str | None], keep: dict[str, str | None], keep_all: bool, where: str
) -> tuple[KeptField, ...]:
    """Kept fields of a webdataset typed from sampled ``.json`` sidecars (raw texts).

    ``keep_all`` keeps every field seen (sorted by name) plus those in ``keep``. A field in
    ``keep`` without a type that no sampled sidecar has is an error (a typo, most likely).
    """
    parsed = [d for d in map(parse_sidecar, sidecars) if d is not None]
    seen = sorted({k for d in parsed for k in d})
    wanted = dict.fromkeys(seen) if keep_all else {}
    wanted.update(keep)
    unknown = [k for k, t in keep.items() if t is None and k not in seen]
    if unknown:
        raise SourceError(
            f"--keep {','.join(unknown)}: not a field of the {len(parsed)} .json sidecars sampled from {where} "
            f"(fields: {', '.join(seen) or 'none'}); name its type (--keep FIELD:TYPE) to keep it anyway"
        )
    types = {k: t or infer_json_type(d.get(k) for d in parsed) for k, t in wanted.items()}
    return tuple(
        KeptField(source=k, column=c, feature={"dtype": JSON_TYPES[types[k]], "_type": "Value"}, json_type=types[k])
        for k, c in zip(types, column_names(list(types)))
    )


def _json_value(json_type: str, value) -> tuple[bool, object]:
    """(fits, stored value) of one sidecar value under ``json_type``."""
    if value is None:
        return True, None
    if json_type == "json":
        return True, json.dumps(value, sort_keys=True, ensure_ascii=False)
    kind = _kind(value)
    if json_type == "float64" and kind in ("int64", "float64"):
        return True, float(value)
    return (True, value) if kind == json_type else (False, None)


def _fit(values: list, arrow_type: pa.DataType) -> tuple[list, list[int]]:
    """``values`` with those that do not convert to ``arrow_type`` replaced by None, and their positions."""
    try:
        pa.array(values, arrow_type)
        return values, []
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        pass
    bad = set()
    for i, v in enumerate(values):
        try:
            pa.array([v], arrow_type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):
            bad.add(i)
    return [None if i in bad else v for i, v in enumerate(values)], sorted(bad)


class KeptValues:
    """Replaces each row's ``extra`` with its typed kept values (by output column) and counts the
    nulls it had to make, per column: ``nulls[column][reason]``."""

    def __init__(self, fields: Sequence[KeptField], arrow_types: dict[str, pa.DataType]):
        self.fields = tuple(fields)
        self.arrow_types = arrow_types
        self._nulls: defaultdict[str, Counter] = defaultdict(Counter)

    @property
    def nulls(self) -> dict[str, dict[str, int]]:
        return {c: dict(sorted(n.items())) for c, n in sorted(self._nulls.items()) if sum(n.values())}

    def apply(self, rows: list[DecodedImage]) -> list[DecodedImage]:
        if not self.fields:
            return rows
        values: dict[str, list] = {f.column: [] for f in self.fields}
        for row in rows:
            sidecar = parse_sidecar(row.extra.get("json")) if "json" in row.extra else None
            for f in self.fields:
                values[f.column].append(self._one(f, row.extra, sidecar))
        for f in self.fields:
            if f.json_type is None:
                values[f.column], bad = _fit(values[f.column], self.arrow_types[f.column])
                if bad:
                    self._nulls[f.column][WRONG_TYPE] += len(bad)
        return [replace(row, extra={c: v[i] for c, v in values.items()}) for i, row in enumerate(rows)]

    def _one(self, f: KeptField, extra: dict, sidecar: dict | None):
        if f.json_type is None:  # a source column: absent in this shard's schema -> missing
            if f.source not in extra:
                self._nulls[f.column][MISSING] += 1
            return extra.get(f.source)
        if sidecar is None:
            self._nulls[f.column][INVALID_JSON if "json" in extra else MISSING] += 1
            return None
        if f.source not in sidecar:
            self._nulls[f.column][MISSING] += 1
            return None
        fits, value = _json_value(f.json_type, sidecar[f.source])
        if not fits:
            self._nulls[f.column][WRONG_TYPE] += 1
        return value

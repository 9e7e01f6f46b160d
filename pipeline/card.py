"""The dataset card (``OUT/README.md``) that makes ``datasets.load_dataset(OUT)`` work."""
from __future__ import annotations

from .layout import OutputLayout, filesystem
from .ledger import Ledger, ShardStats
from .manifest import run_fingerprint
from .qa import QASummary
from .writer import write_text_atomic


def render_card(manifest: dict, counts: dict[str, dict], reports: dict[str, list[str]] | None = None) -> str:
    """``counts``: split -> {"shards", "done", "rows", "skipped", "qa" (QASummary)} (they also keep
    ``datasets``' cache from serving an older state of the same folder); ``reports``: split -> the
    names of its run report's files under ``report/``."""
    tok = manifest["tokenizer"]
    tr = manifest["transform"]
    splits = sorted(manifest["splits"])
    files = "\n".join(f"  - split: {s}\n    path: data/{s}-*.parquet" for s in splits)
    labels = manifest.get("label_names")
    rows = "\n".join(
        f"| {s} | {c['done']}/{c['shards']} | {c['rows']} | {c['skipped']} | {_qa_cell(c.get('qa'))} |"
        for s, c in sorted(counts.items())
    )
    return f"""---
configs:
- config_name: default
  data_files:
{files}
tags:
- image-tokens
- pretok
---
# Image tokens ({tok['family']} `{tok['name']}`)

Pre-tokenized with pretok: every row holds `tokens`
[{tr['num_views']} view(s) x {tok['num_tokens']} ids], uint16 ids in [0, {tok['codebook_size']}),
{'ordered (every prefix is a coarser code)' if tok['ordered'] else 'unordered'}.

| | |
|---|---|
| tokenizer fingerprint | `{tok['fingerprint']}` |
| image transform | {tr['resolution']} px, views `{tr['views']}`, {tr['resize']}, {tr['crop']} crop |
| precision | {manifest['precision']} |
| splits | {', '.join(splits)} |
| labels | {f'{len(labels)} classes' if labels else 'none or unnamed'} |

| split | shards done | rows | skipped inputs | QA: PSNR of decoded tokens (dB) |
|---|---|---|---|---|
{rows}
{_kept_section(manifest.get("kept"))}
{_report_section(reports or {})}

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="{splits[0]}")
```
`pretok.json` holds the full manifest; `stats/` has per-shard counts and every skipped key with its reason.
"""


def feature_type(feature: dict) -> str:
    """A Hugging Face feature (datasets' dict form) as one short type name."""
    kind = feature.get("_type")
    if kind == "Value":
        return feature["dtype"]
    if kind == "ClassLabel":
        names = feature.get("names") or []
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        return f"ClassLabel ({len(names)} names: {shown})"
    if kind in ("List", "Sequence", "LargeList"):
        return f"list<{feature_type(feature['feature'])}>"
    return str(kind)


def _kept_section(kept: list[dict] | None) -> str:
    """The passthrough columns (``--keep``) with their types and sources; empty when none."""
    if not kept:
        return ""
    rows = []
    for f in kept:
        kind = feature_type(f["feature"]) + (" (JSON text: json.loads)" if f.get("json_type") == "json" else "")
        source = f"`.json` field `{f['source']}`" if f.get("json_type") else f"Parquet column `{f['source']}`"
        rows.append(f"| `{f['column']}` | {kind} | {source} |")
    body = "\n".join(rows)
    return f"""
Kept source columns (`--keep`; a value of another type is null, counted in `stats/` as `kept_nulls`):

| column | type | from |
|---|---|---|
{body}
"""
def _qa_cell(qa: QASummary | None) -> str:
    if qa is None:
        return "-"
    if qa.count == 0:
        return qa.describe()
    return f"{qa.count} images: mean {qa.mean:.2f}, p5 {qa.p5:.2f}, p50 {qa.p50:.2f}, p95 {qa.p95:.2f}"


def _report_section(reports: dict[str, list[str]]) -> str:
    if not reports:
        return ""
    parts = ["\n## Run report\n", "Drawn from the stats and data files (`pretok inspect OUT` redraws it).\n"]
    for split, names in sorted(reports.items()):
        parts.append(f"**{split}**: " + ", ".join(f"[{n}](report/{n})" for n in names) + "\n")
        parts += [f"![{n}](report/{n})" for n in names if n.endswith(("-throughput.png", "-qa-sheet.png"))]
    return "\n".join(parts)


def report_listing(root: str, splits, storage_options: dict | None = None) -> dict[str, list[str]]:
    """split -> its report files present under ``root/report/`` (one listing)."""
    fs, _ = filesystem(root, storage_options)
    folder = root.rstrip("/") + "/report"
    fs.invalidate_cache(folder)
    try:
        present = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False)}
    except FileNotFoundError:
        return {}
    out = {}
    for split, info in splits.items():
        names = [n for n in OutputLayout(root, split, info["num_shards"]).report_files if n in present]
        if names:
            out[split] = names
    return out


def split_counts(
    root: str, manifest: dict, known: dict[str, dict[int, ShardStats]], storage_options: dict | None = None
) -> dict[str, dict]:
    """Done shards, rows and skips of every split in the manifest; splits not in ``known``
    (split -> done shard stats the caller already holds) are read from the ledger."""
    counts = {}
    for split, info in manifest["splits"].items():
        if split in known:
            done = known[split].values()
        else:
            layout = OutputLayout(root, split, info["num_shards"])
            done = Ledger.read(layout, run_fingerprint(manifest, split), storage_options).done.values()
        counts[split] = {
            "shards": info["num_shards"],
            "done": len(done),
            "rows": sum(s.rows_written for s in done),
            "skipped": sum(len(s.skipped) for s in done),
            "qa": QASummary.of(done),
        }
    return counts


def write_card(
    layout: OutputLayout, manifest: dict, done: dict[int, ShardStats], storage_options: dict | None = None
) -> None:
    """Write OUT/README.md; ``done`` is the done shards of ``layout.split`` (other splits are read).

    Hold the manifest lease and pass the manifest as now stored, so splits that concurrent runs
    added stay in the card."""
    counts = split_counts(layout.root, manifest, {layout.split: done}, storage_options)
    reports = report_listing(layout.root, manifest["splits"], storage_options)
    write_text_atomic(layout.card_path, render_card(manifest, counts, reports), storage_options, layout.tmp_dir)

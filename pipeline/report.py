"""The run report: PNG plots of one split, drawn only from what is in OUT.

``OUT/report/{split}-{plot}.png`` for the plots in ``PLOTS`` and ``{split}-report.json`` with the
numbers they show. Everything comes from the done shards' stats files (throughput, skips, QA), their
QA thumbnails (``stats/*.qa.png``) and their data files (labels; token ids of up to
``MAX_TOKEN_SHARDS`` shards spread over the split, enough to see codebook collapse without reading
every token of a large run). A resumed run's report therefore covers all its shards. Every file is
written atomically (local temp + rename, or one S3 put).
"""
from __future__ import annotations

import collections
import io
import json
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from .layout import REPORT_PLOTS, OutputLayout, filesystem
from .ledger import ShardStats
from .qa import DEFAULT_QA_MIN_PSNR, QASummary, split_thumbnails
from .writer import write_bytes_atomic, write_text_atomic

PLOTS = REPORT_PLOTS
TITLES = {
    "throughput": "images/s over time per actor",
    "skips": "skipped inputs by reason",
    "codebook": "codebook usage per view",
    "classes": "rows per class",
    "qa-psnr": "QA reconstruction PSNR",
    "qa-sheet": "QA contact sheet (original | reconstruction)",
}
MAX_TOKEN_SHARDS = 64   # data files whose token ids feed the codebook plot
MAX_SHEET_PAIRS = 16    # pairs on the contact sheet
READ_THREADS = 8
DPI = 80


@dataclass
class ReportData:
    """The numbers a split's report shows (also written as ``{split}-report.json``)."""

    split: str
    shards_total: int
    shards_done: int
    rows_in: int
    rows_written: int
    rows_skipped: int
    skip_reasons: dict[str, int]
    actors: dict[str, list[list[float]]]        # actor -> [[started_at, finished_at, rows_in], ...] by start
    untimed_shards: int                          # done shards without timestamps (older versions)
    classes: dict[str, int] | None               # label name (or id) -> rows; None without labels
    codebook: dict                               # {"size", "shards_read", "rows_read", "views": [{"view",
                                                 #  "used", "perplexity", "counts" (not in the JSON)}]}
    qa: dict                                     # QASummary fields + "min_psnr", "describe"
    qa_psnr: list[float] = field(default_factory=list)
    sheet: list[dict] = field(default_factory=list)  # [{"shard", "key", "psnr"}] shown on the contact sheet


def _actor_name(stats: ShardStats) -> str:
    w = stats.worker
    if w.get("actor_id"):
        return f"actor {w['actor_id'][:8]}"
    return f"pid {w.get('pid', '?')} on {str(w.get('node_id', '?'))[:8]}"


def _read_columns(fs, layout: OutputLayout, stats: ShardStats, with_tokens: bool) -> dict:
    """{"labels": int array | None, "tokens": uint16 [rows,V,N] | None} of one data file."""
    with fs.open(layout.data_path(stats.index), "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        columns = [c for c, want in (("label", True), ("tokens", with_tokens)) if want and c in names]
        table = pf.read(columns=columns) if columns else None
    out = {"labels": None, "tokens": None}
    if table is not None and "label" in columns:
        out["labels"] = pc.drop_null(table.column("label")).to_numpy()
    if table is not None and "tokens" in columns:
        col = table.column("tokens").combine_chunks()
        views = col.type.list_size
        n = col.type.value_type.list_size
        out["tokens"] = col.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, views, n)
    return out


def _spread(indices: list[int], k: int) -> set[int]:
    """Up to ``k`` of ``indices``, evenly spread."""
    if len(indices) <= k:
        return set(indices)
    return {indices[round(i * (len(indices) - 1) / (k - 1))] for i in range(k)}


def collect(layout: OutputLayout, manifest: dict, done: dict[int, ShardStats], storage_options: dict | None = None,
            min_psnr: float = DEFAULT_QA_MIN_PSNR) -> tuple[ReportData, list[np.ndarray]]:
    """The report's numbers and the contact sheet's thumbnail pairs, from the files in OUT."""
    fs, _ = filesystem(layout.root, storage_options)
    shards = [done[i] for i in sorted(done)]
    reasons = collections.Counter(s["reason"].split(":")[0] for st in shards for s in st.skipped)
    actors: dict[str, list[list[float]]] = collections.defaultdict(list)
    untimed = 0
    for st in shards:
        if st.started_at is None or st.finished_at is None:
            untimed += 1
        else:
            actors[_actor_name(st)].append([st.started_at, st.finished_at, st.rows_in])
    token_shards = _spread([s.index for s in shards if s.rows_written], MAX_TOKEN_SHARDS)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        columns = list(pool.map(lambda st: _read_columns(fs, layout, st, st.index in token_shards), shards))
    tok = manifest["tokenizer"]
    classes = _class_counts([c["labels"] for c in columns], manifest.get("label_names"))
    codebook = _codebook([c["tokens"] for c in columns if c["tokens"] is not None], tok["codebook_size"])
    qa = QASummary.of(shards)
    pairs, sheet = _sheet_pairs(fs, layout, shards)
    data = ReportData(
        split=layout.split, shards_total=layout.num_shards, shards_done=len(shards),
        rows_in=sum(s.rows_in for s in shards), rows_written=sum(s.rows_written for s in shards),
        rows_skipped=sum(len(s.skipped) for s in shards), skip_reasons=dict(reasons.most_common()),
        actors={a: sorted(v) for a, v in sorted(actors.items())}, untimed_shards=untimed, classes=classes,
        codebook=codebook, qa={**asdict(qa), "min_psnr": min_psnr, "describe": qa.describe()},
        qa_psnr=[v for s in shards for v in s.qa_psnr], sheet=sheet,
    )
    return data, pairs


def _class_counts(labels: list[np.ndarray | None], names: list[str] | None) -> dict[str, int] | None:
    present = [a for a in labels if a is not None]
    if not present:
        return None
    ids, n = np.unique(np.concatenate(present).astype(np.int64), return_counts=True)
    counts = dict(zip(ids.tolist(), n.tolist()))
    if names:
        return {names[i] if 0 <= i < len(names) else str(i): counts.get(i, 0) for i in sorted(set(range(len(names))) | set(counts))}
    return {str(i): n for i, n in sorted(counts.items())}


def _codebook(tokens: list[np.ndarray], size: int) -> dict:
    if not tokens:
        return {"size": size, "shards_read": 0, "rows_read": 0, "views": []}
    views = tokens[0].shape[1]
    out = []
    for v in range(views):
        counts = sum(np.bincount(t[:, v].ravel().astype(np.int64), minlength=size) for t in tokens)
        p = counts[counts > 0] / counts.sum()
        out.append({"view": v, "used": int((counts > 0).sum()), "perplexity": round(float(np.exp(-(p * np.log(p)).sum())), 2),
                    "counts": counts.tolist()})
    return {"size": size, "shards_read": len(tokens), "rows_read": int(sum(len(t) for t in tokens)), "views": out}


def _sheet_pairs(fs, layout: OutputLayout, shards: list[ShardStats]) -> tuple[list[np.ndarray], list[dict]]:
    """Up to MAX_SHEET_PAIRS thumbnail pairs spread over the split, with what they show."""
    slots = [(st, i) for st in shards for i in range(st.qa_thumbnails)]
    keep = sorted(_spread(list(range(len(slots))), MAX_SHEET_PAIRS))
    by_shard: dict[int, list[int]] = collections.defaultdict(list)
    for j in keep:
        by_shard[slots[j][0].index].append(slots[j][1])
    paths = {i: layout.qa_path(i) for i in by_shard}
    blobs = fs.cat([fs._strip_protocol(p) for p in paths.values()], on_error="omit") if paths else {}
    pairs, sheet = [], []
    for st in shards:
        if st.index not in by_shard:
            continue
        blob = blobs.get(fs._strip_protocol(paths[st.index]))
        if blob is None:
            continue  # written by a version without thumbnails, or removed
        thumbs = split_thumbnails(blob, st.qa_thumbnails)
        for i in by_shard[st.index]:
            pairs.append(thumbs[i])
            sheet.append({"shard": st.shard, "key": st.qa_keys[i], "psnr": st.qa_psnr[i]})
    return pairs, sheet


def _figure(w: float = 7.0, h: float = 4.0) -> Figure:
    return Figure(figsize=(w, h), dpi=DPI, layout="constrained")


def _empty(ax, text: str) -> None:
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12, transform=ax.transAxes)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def plot_throughput(d: ReportData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    if not d.actors:
        _empty(ax, "no timed shards")
        return fig
    t0 = min(s for runs in d.actors.values() for s, _, _ in runs)
    for name, runs in d.actors.items():
        xs, ys = [], []
        for start, end, rows in runs:
            rate = rows / max(end - start, 1e-6)
            xs += [(start - t0) / 60, (end - t0) / 60, math.nan]
            ys += [rate, rate, math.nan]
        ax.plot(xs, ys, marker="|", label=name)
    ax.set_xlabel("minutes since the first shard started")
    ax.set_ylabel("images/s (per shard)")
    ax.set_ylim(bottom=0)
    if len(d.actors) <= 12:
        ax.legend(fontsize=8)
    extra = f"; {d.untimed_shards} shards untimed" if d.untimed_shards else ""
    ax.set_title(f"{TITLES['throughput']} ({d.shards_done} shards{extra})")
    return fig


def plot_skips(d: ReportData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    if not d.skip_reasons:
        _empty(ax, f"no skipped inputs ({d.rows_in} rows in)")
        return fig
    names = list(d.skip_reasons)[::-1]
    ax.barh(names, [d.skip_reasons[n] for n in names])
    ax.set_xlabel("inputs")
    ax.set_title(f"{TITLES['skips']} ({d.rows_skipped} of {d.rows_in})")
    return fig


def plot_codebook(d: ReportData) -> Figure:
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    cb = d.codebook
    if not cb["views"]:
        _empty(left, "no tokens")
        right.axis("off")
        return fig
    for v in cb["views"]:
        counts = np.asarray(v["counts"])
        used = counts[counts > 0]
        bins = np.logspace(0, math.log10(max(2, used.max())) + 0.05, 30)
        left.hist(used, bins=bins, histtype="step", label=f"view {v['view']}: {v['used']}/{cb['size']} ids used")
    left.set_xscale("log")
    left.set_xlabel("occurrences of an id")
    left.set_ylabel("ids")
    left.legend(fontsize=7)
    left.set_title(f"id frequencies ({cb['rows_read']} rows of {cb['shards_read']} shards)")
    views = [v["view"] for v in cb["views"]]
    right.bar([str(v) for v in views], [v["perplexity"] for v in cb["views"]])
    right.axhline(cb["size"], color="gray", linestyle="--", label=f"codebook size {cb['size']}")
    right.set_xlabel("view")
    right.set_ylabel("perplexity (exp entropy)")
    right.legend(fontsize=8)
    right.set_title("perplexity per view")
    return fig


def plot_classes(d: ReportData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    if not d.classes:
        _empty(ax, "no labels in this split")
        return fig
    names = list(d.classes)
    ax.bar(range(len(names)), [d.classes[n] for n in names])
    if len(names) <= 30:
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    else:
        ax.set_xlabel("class index")
    ax.set_ylabel("rows")
    ax.set_title(f"{TITLES['classes']} ({len(names)} classes, {sum(d.classes.values())} rows)")
    return fig


def plot_qa_psnr(d: ReportData) -> Figure:
    fig = _figure()
    ax = fig.subplots()
    qa = d.qa
    if not d.qa_psnr:
        _empty(ax, "QA: " + qa["describe"])
        return fig
    ax.hist(d.qa_psnr, bins=min(40, max(5, len(d.qa_psnr) // 3)), color="tab:blue", alpha=0.8)
    for name, style in (("mean", "-"), ("p5", ":"), ("p50", "--"), ("p95", ":")):
        ax.axvline(qa[name], color="black", linestyle=style, label=f"{name} {qa[name]:.2f} dB")
    ax.axvline(qa["min_psnr"], color="red", label=f"warning below {qa['min_psnr']:g} dB")
    ax.set_xlabel("PSNR (dB), view 0 vs its decode")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.set_title(f"{TITLES['qa-psnr']} ({qa['count']} images)")
    return fig


def plot_qa_sheet(d: ReportData, pairs: list[np.ndarray]) -> Figure:
    if not pairs:
        fig = _figure(6, 2)
        _empty(fig.subplots(), "no QA thumbnails")
        return fig
    cols = min(4, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig = _figure(3.2 * cols, 1.9 * rows)
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, pair, info in zip(axes, pairs, d.sheet):
        ax.imshow(pair, interpolation="nearest")
        ax.set_title(f"{info['key'][-24:]}  {info['psnr']:.1f} dB", fontsize=7)
    fig.suptitle(TITLES["qa-sheet"])
    return fig


def write_report(layout: OutputLayout, manifest: dict, done: dict[int, ShardStats],
                 storage_options: dict | None = None, min_psnr: float = DEFAULT_QA_MIN_PSNR,
                 dest: str | None = None) -> list[str]:
    """Draw the split's report into ``dest`` (default ``OUT/report``); returns the URLs written."""
    data, pairs = collect(layout, manifest, done, storage_options, min_psnr)
    folder = (dest or layout.report_dir).rstrip("/")
    figures = {
        "throughput": plot_throughput(data), "skips": plot_skips(data), "codebook": plot_codebook(data),
        "classes": plot_classes(data), "qa-psnr": plot_qa_psnr(data), "qa-sheet": plot_qa_sheet(data, pairs),
    }
    staging = layout.tmp_dir if dest is None else None
    written = []
    for name in PLOTS:
        url = f"{folder}/{layout.split}-{name}.png"
        write_bytes_atomic(url, _png(figures[name]), storage_options, staging)
        written.append(url)
    url = f"{folder}/{layout.split}-report.json"
    record = asdict(data)
    for v in record["codebook"]["views"]:
        del v["counts"]  # up to 64k numbers per view; the plot shows them
    write_text_atomic(url, json.dumps(record, indent=1), storage_options, staging)
    return written + [url]

"""Trial runs: ``--limit-shards N`` tokenizes the first N shards into the layout of the full run,
which later resumes from them and rewrites nothing; ``--dry-run`` prints the plan (shards, bytes,
actor plan, ``--estimate`` projection) and writes nothing, locally and on the moto S3 server."""
from __future__ import annotations

import re
from pathlib import Path

import fsspec
import pytest

from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.dryrun import _size
from pipeline.ledger import ShardStats
from pipeline.synthetic import write_synthetic
from tests.faults import pretokenize_cli, read_output

SHARDS, PER_SHARD = 4, 3
SIZING = dict(actors=1, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2, progress=False)
ARGS = ["--actors", "1", "--gpus-per-actor", "1", "--cpus-per-actor", "0.5", "--batch-size", "2", "--no-progress"]


def local_state(root: Path) -> dict[str, tuple]:
    """Every path under ``root``, folders too -> (inode, size, mtime_ns)."""
    stats = {str(p.relative_to(root)): p.stat() for p in root.rglob("*")}
    return {p: (s.st_ino, s.st_size, s.st_mtime_ns) for p, s in stats.items()}


def s3_state(url: str, storage_options: dict) -> dict[str, tuple]:
    """Every object under ``url`` -> (ETag, LastModified, size)."""
    fs, root = fsspec.core.url_to_fs(url, **storage_options)
    fs.invalidate_cache()
    return {p: (i.get("ETag"), i.get("LastModified"), i.get("size")) for p, i in fs.find(root, detail=True).items()}


def test_limit_run_then_full_run_equals_one_full_run_and_dry_runs_write_nothing(cluster, tok_dir, tmp_path, s3):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_synthetic(str(inp), "webdataset", num_shards=SHARDS, images_per_shard=PER_SHARD, seed=12)
    input_bytes = sum(p.stat().st_size for p in inp.glob("*.tar"))
    cli = [inp, out, "--tokenizer", tok_dir, *ARGS]

    before = local_state(tmp_path)
    code, stdout, err = pretokenize_cli(*cli, "--dry-run", "--limit-shards", "2")
    assert code == 0, err
    assert local_state(tmp_path) == before and not out.exists()
    assert f"input    {inp} (webdataset): {SHARDS} shards, {_size(input_bytes)}" in stdout, stdout
    assert f"shards   {SHARDS} total: 0 done (ledger), 2 pending" in stdout
    assert "limit    --limit-shards 2: the first 2 shards only; 2 of them pending" in stdout
    assert "actor plan: 1 encoder actors x {1 GPU, 0.5 CPU}" in stdout and "estimate" not in stdout

    limited = run_pretokenize(PretokenizeConfig(str(inp), str(out), tok_dir, limit_shards=2, **SIZING))
    assert limited.ok and limited.exit_code == 0 and (limited.shards_total, limited.shards_written) == (SHARDS, 2)
    assert "limit    --limit-shards 2: only the first 2 of 4 shards" in limited.describe()
    names = [f"train-0000{i}-of-0000{SHARDS}" for i in range(2)]  # named among all shards, not "-of-00002"
    assert sorted(p.stem for p in out.glob("data/*")) == names == sorted(p.stem for p in out.glob("stats/*.json"))
    trial_files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for d in ("data", "stats") for p in out.glob(f"{d}/*")}

    state = local_state(out)
    code, stdout, err = pretokenize_cli(*cli, "--dry-run", "--estimate", "4")
    assert code == 0, err
    assert local_state(out) == state, "a dry run must not write (manifest, lock, _tmp, card)"
    assert f"shards   {SHARDS} total: 2 done (ledger), 2 pending" in stdout, stdout
    assert re.search(r"estimate sample of 4 images \(4 encoded\) on cpu \(simulated GPU\)", stdout), stdout
    assert re.search(r"[\d.]+ img/s per actor x 1 actors = [\d.]+ img/s", stdout), stdout
    assert re.search(r"\d+ pending images \(estimated from \d+ bytes at \d+ bytes per image.*\) -> [\d.]+ hours",
                     stdout), stdout
    code, _, err = pretokenize_cli(*cli, "--dry-run", "--views", "flip")  # refused as the run would be
    assert code == 2 and "already holds tokens made differently" in err and local_state(out) == state

    full = run_pretokenize(PretokenizeConfig(str(inp), str(out), tok_dir, **SIZING))
    assert full.ok and (full.shards_skipped_done, full.shards_written) == (2, 2), full.describe()
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in trial_files} == trial_files
    runs = {s.index: s.run_id for s in (ShardStats.from_json(p.read_text()) for p in sorted(out.glob("stats/*.json")))}
    assert runs == {0: limited.run_id, 1: limited.run_id, 2: full.run_id, 3: full.run_id}

    clean = f"s3://{s3.bucket()}/clean"  # one full run, its dry run first: nothing appears on S3
    so = s3.storage_options
    code, stdout, err = pretokenize_cli(*cli[:1], clean, *cli[2:], "--dry-run")  # S3 settings from the environment
    assert code == 0 and f"{SHARDS} total: 0 done (ledger), {SHARDS} pending" in stdout, err
    assert s3_state(clean.rsplit("/", 1)[0], so) == {}
    assert run_pretokenize(PretokenizeConfig(str(inp), clean, tok_dir, storage_options=so, **SIZING)).ok
    state = s3_state(clean, so)
    code, stdout, err = pretokenize_cli(*cli[:1], clean, *cli[2:], "--dry-run")
    assert code == 0 and f"{SHARDS} total: {SHARDS} done (ledger), 0 pending" in stdout, err
    assert s3_state(clean, so) == state

    resumed, single = read_output(str(out)), read_output(clean, so)
    assert sorted(resumed) == sorted(single) and len(single) == SHARDS
    assert all(resumed[name].equals(single[name]) for name in single)


def test_estimate_needs_dry_run_and_limit_must_be_positive(capsys):
    from jobs.pretokenize import main

    for argv, message in ((["--estimate", "8"], "--estimate goes with --dry-run"),
                          (["--limit-shards", "0"], "--limit-shards: must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            main(["in", "out", "--tokenizer", "tok", *argv])
        assert exit_.value.code == 2 and message in capsys.readouterr().err

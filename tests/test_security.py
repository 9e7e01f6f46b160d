"""Security through the CLI: a pickle checkpoint with code is refused, credentials never reach
logs or outputs, and input member names cannot steer where anything is written.

Loading such a checkpoint directly is covered by
``tests/test_checkpoint.py::test_pickle_with_code_is_refused_and_not_executed``.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.synthetic import write_synthetic
from tests.titok_fixtures import titok_config, write_titok_checkpoint

REPO = Path(__file__).resolve().parents[1]
# Distinctive fake credentials (moto accepts any); none may show up anywhere.
ENV_KEY_ID, ENV_SECRET = "AKIAPRETOKENVKEY0001", "pretokEnvSecret/0123456789abcdefghijKLMNOP"
OPT_KEY_ID, OPT_SECRET = "AKIAPRETOKOPTKEY0002", "pretokOptSecret/9876543210zyxwvutsrqPONMLK"
SECRETS = (ENV_KEY_ID, ENV_SECRET, OPT_KEY_ID, OPT_SECRET)


def pretokenize(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (its own local Ray cluster, logs forwarded to it)."""
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "jobs.pretokenize", *args, "--no-progress"],
        cwd=cwd, env={**base, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True, text=True, timeout=300,
    )


def test_cli_refuses_pickle_checkpoint_with_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    tok = tmp_path / "evil"
    tok.mkdir()
    (tok / "config.json").write_text(json.dumps(titok_config("tiny_vq_single_stage")))
    torch.save({"latent_tokens": Payload()}, tok / "pytorch_model.bin")
    write_synthetic(str(tmp_path / "in"), "webdataset", num_shards=1, images_per_shard=2)
    proc = pretokenize(str(tmp_path / "in"), str(tmp_path / "out"), "--tokenizer", str(tok), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "refused" in proc.stderr and "needs code execution" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle payload ran"
    assert not (tmp_path / "out").exists()


def test_malformed_storage_options_are_not_echoed(tmp_path):
    bad_json = json.dumps({"key": OPT_KEY_ID, "secret": OPT_SECRET})[:-1] + ",}"
    proc = pretokenize(str(tmp_path / "in"), str(tmp_path / "out"), "--tokenizer", str(tmp_path),
                       "--storage-options", bad_json, cwd=tmp_path)
    assert proc.returncode == 2 and "--storage-options" in proc.stderr, proc.stderr
    assert not [s for s in SECRETS if s in proc.stdout + proc.stderr]


def everything_under(fs, root: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {p: fs.cat_file(p) for p in fs.find(root)}


def test_credentials_never_logged_or_written(s3, tmp_path):
    bucket = s3.bucket()
    admin = s3.storage_options
    fs = fsspec.filesystem("s3", **admin, skip_instance_cache=True)
    inp, tok = f"s3://{bucket}/in", f"s3://{bucket}/tok"
    write_synthetic(inp, "webdataset", num_shards=3, images_per_shard=4, bad=True, seed=21, storage_options=admin)
    fs.put(str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path / "tok")), f"{bucket}/tok", recursive=True)
    fs.pipe_file(f"{bucket}/in/00001.tar", fs.cat_file(f"{bucket}/in/00001.tar")[:3000])  # fails: logged retries
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths must fit
    try:
        env = {"AWS_ACCESS_KEY_ID": ENV_KEY_ID, "AWS_SECRET_ACCESS_KEY": ENV_SECRET, "RAY_TMPDIR": ray_tmp}
        options = json.dumps({"key": OPT_KEY_ID, "secret": OPT_SECRET})
        common = ["--tokenizer", tok, "--max-retries", "1", "--actors", "1", "--cpus-per-actor", "0.5"]
        runs = [  # keys from the environment (as on a cluster), then in --storage-options (env keys unused)
            pretokenize(inp, f"s3://{bucket}/out-env", *common, cwd=tmp_path, env=env),
            pretokenize(inp, f"s3://{bucket}/out-opt", *common, "--storage-options", options, cwd=tmp_path, env=env),
        ]
        ray_files = {str(p): p.read_bytes() for p in Path(ray_tmp).rglob("*") if p.is_file() and not p.is_socket()}
    finally:
        subprocess.run(["rm", "-rf", ray_tmp])
    assert any("/logs/worker-" in p for p in ray_files), "the Ray workers' own log files were scanned too"
    for proc in runs:
        assert proc.returncode == 1, proc.stderr  # shard 1 fails, the others are written
        assert "shard 1 cannot be read" in proc.stderr and "FAILED   shard 1" in proc.stdout, proc.stderr
        assert not [s for s in SECRETS if s in proc.stdout + proc.stderr]
    outputs = {**everything_under(fs, f"{bucket}/out-env"), **everything_under(fs, f"{bucket}/out-opt")}
    assert {p.rsplit("/", 1)[-1] for p in outputs} >= {"pretok.json", "README.md", "train-00000-of-00003.json",
                                                       "train-00000-of-00003.parquet"}
    for path, blob in {**outputs, **ray_files}.items():
        assert not [s for s in SECRETS if s.encode() in blob], path
    for path, blob in outputs.items():  # also inside the Parquet metadata as pyarrow decodes it
        if path.endswith(".parquet"):
            meta = pq.ParquetFile(io.BytesIO(blob)).schema_arrow.metadata
            assert not [s for s in SECRETS for v in meta.values() if s.encode() in v], path


def evil_tar(dest: Path, outside: Path) -> list[str]:
    """A webdataset shard whose member names try to leave any folder; returns the keys it holds."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, "JPEG")
    names = ["../../evil.jpg", f"{outside}/abs.jpg", "a/../../../up.jpg", "./../dot.png", "ok/fine.jpg"]
    with tarfile.open(dest, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(buf.getvalue())
            tar.addfile(info, io.BytesIO(buf.getvalue()))
        for kind, name in ((tarfile.SYMTYPE, "link.jpg"), (tarfile.LNKTYPE, "hard.jpg")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, f"{outside}/target.jpg"
            tar.addfile(info)
    return ["../../evil", str(outside).lstrip("/") + "/abs", "../../up", "../dot", "ok/fine"]


def test_member_names_cannot_steer_output_paths(tmp_path):
    outside = Path(tempfile.gettempdir()) / f"pretok-escape-{uuid.uuid4().hex}"
    work = tmp_path / "deep" / "er"  # ../.. from cwd, OUT or OUT/data stays inside tmp_path
    (work / "in").mkdir(parents=True)
    (work / "cwd").mkdir()
    keys = evil_tar(work / "in" / "00000.tar", outside)
    tok = write_titok_checkpoint("tiny_vq_single_stage", tmp_path / "tok")
    before = {p for p in tmp_path.rglob("*")}
    out = work / "out"
    proc = pretokenize(str(work / "in"), str(out), "--tokenizer", str(tok), "--actors", "1",
                       "--cpus-per-actor", "0.5", cwd=work / "cwd")
    assert proc.returncode == 0, proc.stderr
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    report = {f"report/train-{name}" for name in ("throughput.png", "skips.png", "codebook.png", "classes.png",
                                                   "qa-psnr.png", "qa-sheet.png", "report.json")}
    assert written == {"pretok.json", "README.md", "data/train-00000-of-00001.parquet",
                       "stats/train-00000-of-00001.json", "stats/train-00000-of-00001.qa.png"} | report
    created_elsewhere = {p for p in tmp_path.rglob("*") if p not in before and out not in p.parents and p != out}
    assert not created_elsewhere, created_elsewhere
    assert not outside.exists()
    table = pq.read_table(out / "data" / "train-00000-of-00001.parquet")
    assert sorted(table["key"].to_pylist()) == sorted(keys)  # names are data, kept as text


@pytest.mark.parametrize("module", ["jobs.inspect", "jobs.train_generator"])
def test_other_jobs_do_not_echo_malformed_storage_options(module, capsys):
    bad_json = json.dumps({"key": OPT_KEY_ID, "secret": OPT_SECRET})[:-1] + ",}"
    args = ["out", "--storage-options", bad_json] + (["ckpt", "--steps", "1"] if module.endswith("generator") else [])
    with pytest.raises(SystemExit) as e:
        __import__(module, fromlist=["main"]).main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--storage-options" in err, err
    assert not [s for s in SECRETS if s in err]

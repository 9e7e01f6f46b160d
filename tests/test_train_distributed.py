"""Generator training on Ray Train (local cluster, CPU, gloo, 2 workers) against the local path.

One 2-worker run (a worker SIGKILLed mid-step 5 and restarted by Ray Train) is shared by the tests;
the 1-worker runs are the plain local path. Dropout is 0, so the 2-worker and 1-worker (twice the
batch) runs must agree to rounding: relative tolerance 1e-5 on every step's loss, 1e-5 absolute on
the weights (measured differences are ~1e-7).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file

from generator import load_generator
from generator.distributed import fit_distributed
from generator.train import fit
from jobs import train_generator
from tests.test_tokens import write_token_dataset
from tests.train_drills import kill_once

STEPS, SAVE_EVERY, KILL_AT = 6, 2, 5
TINY = ["--width", "32", "--depth", "1", "--heads", "2", "--dropout", "0", "--loader-workers", "0", "--no-progress",
        "--lr", "3e-3", "--warmup-steps", "2", "--ema-decay", "0.9"]


@pytest.fixture(scope="module")
def local_ray():
    # Ray Train's preemption watcher and state actor are extra processes; a 2-core machine does without.
    env = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """192 rows in 4 uneven shards, 4 classes of fixed patterns over 16 codes, 8 tokens."""
    patterns = np.random.default_rng(1).integers(0, 16, (4, 8))
    rows = np.repeat(patterns[np.arange(192) % 4][:, None], 2, axis=1).astype(np.uint16)
    data = write_token_dataset(tmp_path_factory.mktemp("tokens") / "out", [40, 40, 48, 64], num_tokens=8,
                               codebook_size=16, label_names=("a", "b", "c", "d"), tokens=rows)
    return data.out


def job_for(out: str, ckpt: Path, *extra: str, steps: int = STEPS):
    args = train_generator.build_parser().parse_args(
        [out, str(ckpt), "--steps", str(steps), "--save-every", str(SAVE_EVERY), *TINY, *extra])
    return train_generator.build_job(args)[0]


def records(ckpt: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]


def weights(ckpt: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    latest = json.loads((ckpt / "latest.json").read_text())["dir"]
    return load_file(str(ckpt / latest / name))


@pytest.fixture(scope="module")
def two_workers(local_ray, tokens, tmp_path_factory):
    """2 workers x batch 8; rank 1 is SIGKILLed after its backward pass of step 5."""
    root = tmp_path_factory.mktemp("two")
    marker = root / "killed"
    job = job_for(tokens, root / "ckpt", "--batch-size", "8", "--train-workers", "2")
    hook = functools.partial(kill_once, at_step=KILL_AT, at_rank=1, marker=str(marker))
    fit_distributed(job.__class__(**{**job.__dict__, "mid_step": hook}), 2, cpus_per_worker=0.5, max_failures=2,
                    placement_timeout_s=60)
    return root / "ckpt", marker


@pytest.fixture(scope="module")
def one_worker(tokens, tmp_path_factory):
    """The plain local path, 1 worker x batch 16: the same global batches."""
    ckpt = tmp_path_factory.mktemp("one") / "ckpt"
    fit(job_for(tokens, ckpt, "--batch-size", "16"))
    return ckpt


def test_worker_killed_mid_step_resumes_without_losing_or_repeating_a_step(two_workers):
    ckpt, marker = two_workers
    assert marker.exists(), "the drill did not kill a worker"
    assert [r["step"] for r in records(ckpt)] == list(range(1, STEPS + 1))
    assert json.loads((ckpt / "latest.json").read_text()) == {"step": STEPS, "dir": f"step-{STEPS:08d}"}
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]  # 2 kept


def test_parameters_identical_across_ranks(two_workers):
    ckpt, _ = two_workers
    commits = [r for r in records(ckpt) if "param_digests" in r]
    assert [r["step"] for r in commits] == [2, 4, 6]
    for r in commits:
        assert len(r["param_digests"]) == 2 and len(set(r["param_digests"])) == 1


def test_two_workers_follow_the_one_worker_double_batch_curve(two_workers, one_worker):
    two, one = records(two_workers[0]), records(one_worker)
    assert [r["world_size"] for r in two] == [2] * STEPS and [r["world_size"] for r in one] == [1] * STEPS
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-5)
    np.testing.assert_allclose([r["accuracy"] for r in two], [r["accuracy"] for r in one], rtol=1e-5)
    assert len({round(r["loss"], 4) for r in one}) == STEPS  # the curve moves: a real comparison
    a, b = weights(two_workers[0]), weights(one_worker)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_resume_two_workers_run_on_one_worker(two_workers, one_worker, tokens, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(two_workers[0], ckpt)
    (ckpt / "latest.json").write_text(json.dumps({"step": 4, "dir": "step-00000004"}))  # back to the step-4 commit
    assert train_generator.main([tokens, str(ckpt), "--steps", str(STEPS), "--save-every", str(SAVE_EVERY), *TINY,
                                 "--batch-size", "16", "--resume"]) == 0
    resumed = records(ckpt)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    assert [r["world_size"] for r in resumed] == [2, 2, 2, 2, 1, 1]
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in records(one_worker)], rtol=1e-5)
    for key, value in weights(one_worker).items():
        torch.testing.assert_close(weights(ckpt)[key], value, rtol=0, atol=1e-5)
    assert (ckpt / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ema_differs_from_raw_and_is_what_sample_loads(two_workers, monkeypatch, tmp_path):
    from jobs import sample as sample_job

    ckpt, _ = two_workers
    raw, ema = weights(ckpt), weights(ckpt, "ema.safetensors")
    assert max((raw[k] - ema[k]).abs().max().item() for k in raw) > 1e-4
    for choice, expected in (("ema", ema), ("raw", raw)):
        model, _ = load_generator(str(ckpt), weights=choice)
        for k, v in model.state_dict().items():
            assert torch.equal(v, expected[k])

    sampled = []
    monkeypatch.setattr(sample_job, "load_tokenizer", lambda *a, **k: _Tok())

    def sample_tokens(model, classes, per_class, cfg, seed, batch):
        sampled.append(model.state_dict())
        return torch.zeros(len(classes) * per_class, 8, dtype=torch.long)

    monkeypatch.setattr(sample_job, "sample_tokens", sample_tokens)
    for flags in ([], ["--raw-weights"]):
        assert sample_job.main([str(ckpt), "--tokenizer", "unused", "--out", str(tmp_path / "g.png"), *flags]) == 0
    for state, expected in zip(sampled, (ema, raw)):
        assert all(torch.equal(v, expected[k]) for k, v in state.items())


class _Tok:
    """Decodes anything to grey images; the sample job's model loading is under test, not decoding."""

    num_tokens, codebook_size, ordered, fingerprint = 8, 16, False, ""

    def decode_tokens(self, ids):
        return torch.full((len(ids), 3, 4, 4), 0.5)


def test_more_train_workers_than_the_cluster_places_is_a_clear_error(local_ray, tokens, tmp_path, capsys):
    rc = train_generator.main([tokens, str(tmp_path / "ckpt"), "--steps", "2", *TINY, "--batch-size", "2",
                               "--train-workers", "8", "--cpus-per-worker", "0.5", "--placement-timeout", "2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "cannot place 8 training workers x {'CPU': 0.5} within 2 s" in err and "'CPU': 2.0" in err
    assert not (tmp_path / "ckpt" / "latest.json").exists()


def test_ckpt_of_another_tokenizer_or_config_is_refused(tokens, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    base = ["--steps", "1", *TINY, "--batch-size", "16"]
    assert train_generator.main([tokens, ckpt, *base]) == 0
    other = write_token_dataset(tmp_path / "other", [96, 96], num_tokens=8, codebook_size=16,
                                label_names=("a", "b", "c", "d"), fingerprint="0" * 64).out
    cases = [
        ([other, ckpt, *base, "--resume"], "another tokenizer: fingerprint ffffffffffff... in CKPT, 000000000000..."),
        ([tokens, ckpt, *base, "--resume", "--width", "64"], "another model config: --width 64 (CKPT: 32)"),
        ([tokens, ckpt, *base, "--resume", "--seed", "3"], "train.seed: 0 in CKPT, 3 now"),
        ([tokens, ckpt, *base, "--resume", "--batch-size", "8"], "train.global_batch: 16 in CKPT, 8 now"),
        ([tokens, ckpt, *base], "holds a run at step 1: pass --resume"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert train_generator.main(argv) == 2
        assert message in capsys.readouterr().err
    assert json.loads(Path(ckpt, "latest.json").read_text())["step"] == 1  # untouched


def test_ray_data_keeps_uint16_tokens_and_labels_and_feeds_the_trainer(local_ray, tokens, tmp_path):
    from generator.ray_data import read_tokens
    from pipeline.tokens import TokenFiles, tokens_array

    files = TokenFiles.open(tokens)
    ds = read_tokens(files)
    schema = ds.schema().base_schema
    assert schema.field("tokens").type == pa.list_(pa.list_(pa.uint16(), 8), 2)
    assert schema.field("label").type == pa.int32()
    table = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    expected = pa.concat_tables(pq.read_table(f, columns=["tokens", "label"]) for f in files.files)

    def rows(t: pa.Table) -> np.ndarray:  # Ray Data reads the shards in parallel: compare as sorted rows
        flat = np.concatenate([t.column("label").to_numpy()[:, None], tokens_array(t.column("tokens"))[:, :, :]
                               .reshape(t.num_rows, -1)], axis=1).astype(np.int64)
        return flat[np.lexsort(flat.T[::-1])]

    assert tokens_array(table.column("tokens")).dtype == np.uint16
    np.testing.assert_array_equal(rows(table), rows(expected))

    ckpt = tmp_path / "ckpt"
    assert train_generator.main([tokens, str(ckpt), "--steps", "3", *TINY, "--batch-size", "16",
                                 "--loader", "ray-data"]) == 0
    got = records(ckpt)
    assert [r["step"] for r in got] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in got)


def test_worker_count_that_cannot_share_the_data_streams_is_refused_before_launch(tokens, tmp_path, capsys):
    # global batch 3 x 16 = 48: default streams gcd(64, 48) = 16, which 3 workers cannot share
    assert train_generator.main([tokens, str(tmp_path / "ckpt"), "--steps", "1", *TINY, "--batch-size", "16",
                                 "--train-workers", "3"]) == 2
    assert "3 ranks cannot share 16 data streams" in capsys.readouterr().err

"""pretokenize with the tiny FlexTok reference model on a real local Ray cluster (2 fake GPUs):
ordered tokens, prefix loading, and the optional ``num_tokens_needed`` column."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from datasets import Value, load_dataset

from jobs.pretokenize import main as pretokenize_main
from pipeline.decode import decode_record
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.manifest import ManifestMismatch
from pipeline.records import DecodedImage
from pipeline.sources import iter_records, list_source
from pipeline.synthetic import write_synthetic
from pipeline.tokens import load_tokens, tokens_array
from tests.test_flextok_counts import write_flextok_checkpoint
from tests.titok_fixtures import write_titok_checkpoint
from tokenizer import load_tokenizer
from tokenizer.flextok.counts import TokenCountSettings, count_tokens, image_noise, noise_shape, reconstruction_mse
from tokenizer.transform import ImageTransform

VIEWS = "flip"
STEPS = 4  # Euler steps of the token-count decodes (kept small for speed)

pytestmark = pytest.mark.usefixtures("single_thread")  # like the encoder actors: bit-identical floats



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return str(write_flextok_checkpoint(tmp_path_factory.mktemp("flextok")))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(ckpt)


@pytest.fixture(scope="module")
def inp(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("in"))
    write_synthetic(url, "webdataset", num_shards=2, images_per_shard=3, image_size=((64, 64), (80, 64)), seed=11)
    return url


def config(inp: str, out: Path, tokenizer: str, **kw) -> PretokenizeConfig:
    base = dict(actors=2, gpus_per_actor=1.0, cpus_per_actor=0.5, batch_size=2, progress=False, views=VIEWS,
                token_count_steps=STEPS)
    return PretokenizeConfig(input=inp, output=str(out), tokenizer=tokenizer, **{**base, **kw})


@pytest.fixture(scope="module")
def images(inp, tok) -> dict[str, np.ndarray]:
    """key -> transformed views uint8 [V,3,R,R], without the pipeline."""
    transform = ImageTransform(tok.image_size, VIEWS)
    out = {}
    for shard in list_source(inp).shards:
        for rec in iter_records(shard):
            d = decode_record(rec, transform)
            assert isinstance(d, DecodedImage)
            out[d.key] = d.views
    return out


@pytest.fixture(scope="module")
def expected(tok, images) -> dict[str, np.ndarray]:
    """key -> tok.encode of the views, int64 [V,N]."""
    with torch.no_grad():
        return {k: tok.encode(torch.from_numpy(v).float() / 255).numpy() for k, v in images.items()}


@pytest.fixture(scope="module")
def plain(cluster, inp, ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    assert run_pretokenize(config(inp, out, ckpt)).ok
    return out


def read_all(out: Path) -> pa.Table:
    return pa.concat_tables(pq.read_table(p) for p in sorted((out / "data").glob("*.parquet")))


def by_key(table: pa.Table, column: str) -> dict:
    values = tokens_array(table[column]) if column == "tokens" else table[column].to_pylist()
    return dict(zip(table["key"].to_pylist(), values))


def ds_tokens(ds) -> dict[str, np.ndarray]:
    """key -> uint16 tokens [V,k] of a ``datasets.Dataset``, as stored."""
    return dict(zip(ds["key"], tokens_array(ds.data.column("tokens"))))


def test_flextok_tokens_end_to_end(plain, tok, expected, tmp_path):
    manifest = json.loads((plain / "pretok.json").read_text())
    info = manifest["tokenizer"]
    assert (info["family"], info["ordered"], info["num_tokens"]) == ("flextok", True, tok.num_tokens)
    assert (info["codebook_size"], info["image_size"]) == (tok.codebook_size, tok.image_size)
    assert manifest["token_counts"] is None
    ds = load_dataset(str(plain), split="train", cache_dir=str(tmp_path / "hf"))
    feat = ds.features["tokens"]
    assert feat.length == 2 and feat.feature.length == tok.num_tokens and feat.feature.feature == Value("uint16")
    assert "num_tokens_needed" not in ds.column_names
    got = ds_tokens(ds)
    assert got.keys() == expected.keys()
    for key, ids in expected.items():
        assert got[key].dtype == np.uint16 and np.array_equal(got[key].astype(np.int64), ids), key
    meta = pq.read_schema(next((plain / "data").glob("*.parquet"))).metadata
    assert json.loads(meta[b"pretok"])["tokenizer"] == info
    assert "ordered (every prefix is a coarser code)" in (plain / "README.md").read_text()


@pytest.mark.parametrize("k", [1, 5, 16, 32])
def test_load_tokens_keeps_a_prefix(plain, expected, tmp_path, k):
    ds = load_tokens(str(plain), max_tokens=k, cache_dir=str(tmp_path / "hf"))
    assert ds.features["tokens"].feature.length == k
    for key, tokens in ds_tokens(ds).items():
        assert tokens.dtype == np.uint16 and np.array_equal(tokens.astype(np.int64), expected[key][:, :k]), key
    with pytest.raises(ValueError, match="max_tokens must be in"):
        load_tokens(str(plain), max_tokens=33, cache_dir=str(tmp_path / "hf"))


def test_titok_output_refuses_prefixes_and_token_counts(cluster, inp, tmp_path, capsys):
    titok = str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path / "titok"))
    out = tmp_path / "out"
    assert run_pretokenize(config(inp, out, titok, actors=1, views="center")).ok
    assert load_tokens(str(out), cache_dir=str(tmp_path / "hf")).num_rows == 6
    with pytest.raises(ValueError, match="not ordered"):
        load_tokens(str(out), max_tokens=4, cache_dir=str(tmp_path / "hf"))
    refused = tmp_path / "refused"
    with pytest.raises(ValueError, match="needs an ordered tokenizer"):
        run_pretokenize(config(inp, refused, titok, token_count_mse=0.1))
    assert pretokenize_main([inp, str(refused), "--tokenizer", titok, "--token-count-mse", "0.1"]) == 2
    assert "needs an ordered tokenizer" in capsys.readouterr().err and not refused.exists()


# ----------------------------------------------------------------------------- token counts


@pytest.fixture(scope="module")
def thresholds(tok, images, expected) -> tuple[float, float]:
    """A tight and a looser MSE threshold, each halfway between two errors of the brute-force
    table (every candidate prefix of every image's view 0), so no error sits on a threshold."""
    s = TokenCountSettings.for_num_tokens(tok.num_tokens, 1.0, timesteps=STEPS)
    keys = sorted(images)
    views = torch.from_numpy(np.stack([images[k][0] for k in keys])).float().div_(255.0)
    ids = torch.from_numpy(np.stack([expected[k][0] for k in keys]))
    noise = image_noise(keys, s.seed, noise_shape(tok, tok.image_size))
    errors = np.unique([reconstruction_mse(tok, views, ids[:, :c], noise, s).numpy() for c in s.candidates])
    mids = (errors[:-1] + errors[1:]) / 2
    return float(mids[len(mids) // 3]), float(mids[2 * len(mids) // 3])


@pytest.fixture(scope="module")
def counted(plain, inp, ckpt, thresholds, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("counted")
    assert run_pretokenize(config(inp, out, ckpt, token_count_mse=thresholds[0])).ok
    return out


def test_token_count_column(counted, plain, tok, images, expected, thresholds, tmp_path):
    settings = TokenCountSettings.for_num_tokens(tok.num_tokens, thresholds[0], timesteps=STEPS)
    assert json.loads((counted / "pretok.json").read_text())["token_counts"] == settings.describe()
    ds = load_tokens(str(counted), cache_dir=str(tmp_path / "hf"))
    assert ds.features["num_tokens_needed"] == Value("int32")
    assert read_all(counted).schema.field("num_tokens_needed").type == "int32"
    got = dict(zip(ds["key"], ds["num_tokens_needed"]))
    assert set(got.values()) <= set(settings.candidates)
    keys = sorted(images)
    direct = count_tokens(
        tok, torch.from_numpy(np.stack([images[k][0] for k in keys])).float().div_(255.0),
        torch.from_numpy(np.stack([expected[k][0] for k in keys])), keys, settings,
    )
    assert [got[k] for k in keys] == direct.counts.tolist()
    assert len(set(got.values())) > 1, "the threshold should separate the images"
    tokens, plain_tokens = by_key(read_all(counted), "tokens"), by_key(read_all(plain), "tokens")
    assert all(np.array_equal(tokens[k], plain_tokens[k]) for k in keys)


def test_token_counts_rerun_identical_other_threshold_refused(counted, inp, ckpt, thresholds, tmp_path):
    out = tmp_path / "again"
    assert run_pretokenize(config(inp, out, ckpt, token_count_mse=thresholds[0], actors=1, batch_size=3)).ok
    for a in sorted((counted / "data").glob("*.parquet")):
        first, second = pq.read_table(a), pq.read_table(out / "data" / a.name)
        assert first.equals(second), a.name
    for other in (thresholds[1], None):
        with pytest.raises(ManifestMismatch, match="token_counts"):
            run_pretokenize(config(inp, out, ckpt, token_count_mse=other, actors=1))
    assert run_pretokenize(config(inp, out, ckpt, token_count_mse=thresholds[1], actors=1, overwrite=True)).ok
    tight, loose = by_key(read_all(counted), "num_tokens_needed"), by_key(read_all(out), "num_tokens_needed")
    assert tight.keys() == loose.keys() and all(loose[k] <= tight[k] for k in tight)
    assert sum(loose.values()) < sum(tight.values())

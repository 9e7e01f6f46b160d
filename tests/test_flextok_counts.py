"""Per-image token counts (``tokenizer.flextok.counts``) on the tiny FlexTok reference model.

Expected values come from brute force: every candidate prefix decoded with the same per-image
noise, then the binary search's guarantees checked against that table.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.titok_fixtures import write_titok_checkpoint
from tokenizer import load_tokenizer
from tokenizer.flextok.counts import (
    TokenCountSettings, count_tokens, default_candidates, image_noise, noise_shape, reconstruction_mse,
)

pytestmark = pytest.mark.usefixtures("single_thread")

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "flextok"
HARNESS = json.loads((REF / "tiny_flextok.config.json").read_text())["_reference_harness"]
KEYS = [f"img{i}" for i in range(4)]


def write_flextok_checkpoint(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(REF / "tiny_flextok.config.json", dest / "config.json")
    shutil.copy(REF / "tiny_flextok.safetensors", dest / "model.safetensors")
    return dest



@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_flextok_checkpoint(tmp_path_factory.mktemp("flextok"))


@pytest.fixture(scope="module")
def tok(ckpt):
    return load_tokenizer(str(ckpt))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return load_file(str(REF / "tiny_flextok.io.safetensors"))["input.image_uint8"].float() / 255


@pytest.fixture(scope="module")
def ids(tok, images) -> torch.Tensor:
    with torch.no_grad():
        return tok.encode(images)


def settings(threshold: float, tok) -> TokenCountSettings:
    return TokenCountSettings.for_num_tokens(tok.num_tokens, threshold, timesteps=HARNESS["timesteps"])


@pytest.fixture(scope="module")
def table(tok, images, ids) -> np.ndarray:
    """MSE [image, candidate] of every candidate prefix."""
    s = settings(1.0, tok)
    noise = image_noise(KEYS, s.seed, noise_shape(tok, images.shape[-1]))
    return np.stack([reconstruction_mse(tok, images, ids[:, :k], noise, s).numpy() for k in s.candidates], axis=1)


def midpoints(table: np.ndarray) -> list[float]:
    """Thresholds halfway between neighbouring table values (no ties with any MSE)."""
    values = np.unique(table)
    return [float(v) for v in (values[:-1] + values[1:]) / 2]


def test_default_candidates():
    for n in (1, 32, 100, 256):
        *powers, last = default_candidates(n)
        assert last == n and powers == [2**i for i in range(len(powers))]
        assert all(p < n <= 2 * p for p in powers[-1:])  # every power of two below n, no more


def test_counts_match_the_brute_force_table(tok, images, ids, table):
    cands = np.asarray(settings(1.0, tok).candidates)
    checked_smallest = 0
    for thr in midpoints(table)[:: max(1, len(midpoints(table)) // 8)]:
        s = settings(thr, tok)
        result = count_tokens(tok, images, ids, KEYS, s)
        assert result.counts.dtype == np.int32 and set(result.counts) <= set(cands.tolist())
        assert (1 <= result.decodes).all() and (result.decodes <= s.max_decodes).all()
        for row, count in zip(table, result.counts):
            i = int(np.flatnonzero(cands == count)[0])
            passed = row < thr
            if i < len(cands) - 1:
                assert passed[i]                     # a returned count below N reconstructs well enough
            if i > 0:
                assert not passed[i - 1]             # and the next smaller candidate does not
            first = int(np.argmax(passed)) if passed.any() else len(cands) - 1
            if passed[first:].all():                 # error falls with k: the search finds the smallest
                assert i == first
                checked_smallest += 1
    assert checked_smallest > 0


def test_looser_threshold_never_needs_more_tokens(tok, images, ids, table):
    counts = [count_tokens(tok, images, ids, KEYS, settings(t, tok)).counts for t in midpoints(table)[::3]]
    assert all((looser <= tighter).all() for tighter, looser in zip(counts, counts[1:]))
    assert counts[0].sum() > counts[-1].sum()


def test_counts_do_not_depend_on_the_batch(tok, images, ids, table):
    s = settings(float(np.median(midpoints(table))), tok)
    together = count_tokens(tok, images, ids, KEYS, s).counts
    order = [2, 0, 3, 1]
    shuffled = count_tokens(tok, images[order], ids[order], [KEYS[i] for i in order], s).counts
    alone = [count_tokens(tok, images[i : i + 1], ids[i : i + 1], KEYS[i : i + 1], s).counts[0] for i in range(4)]
    assert together.tolist() == alone and shuffled.tolist() == together[order].tolist()


def test_noise_is_seeded_per_key():
    shape = (2, 3, 3)
    a = image_noise(["x", "y"], 0, shape)
    assert torch.equal(a, image_noise(["x", "y"], 0, shape)) and torch.equal(a[1], image_noise(["y"], 0, shape)[0])
    assert not torch.equal(a[0], a[1]) and not torch.equal(a, image_noise(["x", "y"], 1, shape))


def test_sample_with_given_noise_equals_generator_noise(tok, ids):
    gen_seed, k = HARNESS["noise_seed"], 4
    drawn = tok.sample(ids[:, :k], timesteps=2, generator=torch.Generator().manual_seed(gen_seed))
    given = tok.sample(ids[:, :k], timesteps=2, noise=drawn.x_t[0].clone())
    assert torch.equal(given.latent, drawn.latent)
    with pytest.raises(ValueError, match="noise must be"):
        tok.sample(ids[:, :k], timesteps=2, noise=drawn.x_t[0][:1])


def test_refused_without_decoder_or_order(ckpt, tok, images, ids, tmp_path):
    s = settings(0.1, tok)
    with pytest.raises(ValueError, match="ordered tokenizer loaded with its decoder"):
        count_tokens(load_tokenizer(str(ckpt), parts="encoder"), images, ids, KEYS, s)
    titok = load_tokenizer(str(write_titok_checkpoint("tiny_vq_single_stage", tmp_path / "titok")))
    with pytest.raises(ValueError, match="ordered tokenizer"):
        count_tokens(titok, images, ids, KEYS, s)
    with pytest.raises(ValueError, match="last candidate"):
        count_tokens(tok, images, ids, KEYS, TokenCountSettings(0.1, (1, 2, 4)))
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            settings(bad, tok)

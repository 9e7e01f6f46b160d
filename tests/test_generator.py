"""MaskGIT generator: official layout, masking and loss, training, resume, sampling, jobs."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from generator import (
    GeneratorConfig,
    MaskGITTransformer,
    SamplerConfig,
    TrainConfig,
    TrainState,
    fit,
    generate,
    guidance_weight,
    load_checkpoint,
    load_generator,
    save_checkpoint,
)
from generator.checkpoint import sampler_defaults
from generator.masking import arccos_mask_ratio, masked_token_loss, random_masking
from generator.sample import _gumbel
from generator.train import build_optimizer, lr_at, train_step
from pipeline.tokens import TokenFiles, TokenLoader
from tests.test_tokens import write_token_dataset
from tests.titok_fixtures import write_titok_checkpoint

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "titok" / "keys"
TINY = GeneratorConfig(codebook_size=16, num_tokens=8, num_classes=4, width=32, depth=2, heads=2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: intra-op threads only add contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def official_config(generator: dict, codebook_size: int) -> dict:
    return {"model": {"vq_model": {"codebook_size": codebook_size}, "generator": generator}}


# ---------------------------------------------------------------------------------- model


@pytest.mark.parametrize("name", ["l32", "b64"])
def test_state_dict_matches_official_imagebert(name):
    ref = json.loads((KEYS / f"generator_titok_{name}.keys.json").read_text())
    assert ref["model_class"] == "ImageBert"
    codebook = next(k["shape"][0] for k in ref["keys"] if k["key"] == "model.lm_head.weight")
    cfg = GeneratorConfig.from_official(official_config(ref["generator_config"], codebook))
    with torch.device("meta"):
        model = MaskGITTransformer(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k["key"]: k["shape"] for k in ref["keys"]}
    assert sum(math.prod(s) for s in ours.values()) == ref["num_elements_total"]


def test_uvit_config_is_refused():
    ref = json.loads((KEYS / "generator_titok_s128.keys.json").read_text())
    with pytest.raises(ValueError, match="UViT"):
        GeneratorConfig.from_official(official_config(ref["generator_config"], 4096))


def test_token_layout_is_official():
    cfg = GeneratorConfig(codebook_size=4096, num_tokens=32, num_classes=1000)
    assert (cfg.mask_id, cfg.drop_id, cfg.vocab_size) == (4096, 5097, 5098)
    with torch.device("meta"):
        model = MaskGITTransformer(cfg)
    cond = model.condition_tokens(torch.tensor([0, 999, 5]), torch.tensor([False, False, True]))
    assert cond.tolist() == [4097, 5096, 5097]


def test_forward_conditioning():
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY).eval()
    ids = torch.randint(0, 17, (3, 8))
    a, b = model(ids, torch.tensor([0, 1, 2])), model(ids, torch.tensor([3, 0, 1]))
    assert a.shape == (3, 8, 16) and a.dtype == torch.float32
    assert not torch.allclose(a, b)
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(ids, torch.tensor([0, 1, 2]), drop), model(ids, torch.tensor([3, 0, 1]), drop))


def test_official_directory_loads(tmp_path):
    """An official-style directory (config.json + model.safetensors with a stale position_ids
    buffer) loads strictly and brings its recommended sampling settings."""
    gen = {"model_type": "ViT", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "dropout": 0.1, "attn_drop": 0.1, "num_steps": 12, "class_label_dropout": 0.1,
           "image_seq_len": 8, "condition_num_classes": 4, "randomize_temperature": 9.5, "guidance_scale": 4.5,
           "guidance_decay": "linear"}
    torch.manual_seed(0)
    src = MaskGITTransformer(GeneratorConfig.from_official(official_config(gen, 16)))
    sd = dict(src.state_dict())
    sd["model.embeddings.position_ids"] = torch.arange(9)[None]
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(official_config(gen, 16)))
    model, config = load_generator(tmp_path)
    ids = torch.randint(0, 16, (2, 8))
    torch.testing.assert_close(model(ids, torch.tensor([1, 2])), src.eval()(ids, torch.tensor([1, 2])))
    assert sampler_defaults(config) == SamplerConfig(  # softmax annealing: as sample_imagenet_titok.py
        num_steps=12, guidance_scale=4.5, guidance_schedule="linear", temperature=9.5, softmax_annealing=True
    )


# ---------------------------------------------------------------------------------- masking, loss, schedule


def test_arccos_masking():
    assert float(arccos_mask_ratio(0.0)) == pytest.approx(1.0)
    assert float(arccos_mask_ratio(1.0)) == pytest.approx(0.0)
    assert float(arccos_mask_ratio(0.5)) == pytest.approx(2 / 3)  # acos(1/2) = pi/3
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (4000, 64))
    masked, mask = random_masking(tokens, mask_id=100)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 64
    assert (masked[mask] == 100).all() and torch.equal(masked[~mask], tokens[~mask])
    assert counts.float().mean().item() / 64 == pytest.approx(2 / math.pi, abs=0.01)  # E[acos(U)]/(pi/2)


def test_masked_token_loss_weights_and_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    loss, acc = masked_token_loss(logits, targets, mask, label_smoothing=0.2, unmasked_weight=0.3)
    logp = logits.log_softmax(-1)
    ce = -(0.8 * logp.gather(-1, targets[..., None])[..., 0] + 0.2 * logp.mean(-1))
    w = mask.float() * 0.7 + 0.3
    assert loss.item() == pytest.approx((ce * w).sum().item() / w.sum().item(), rel=1e-5)
    hits = (logits.argmax(-1) == targets) & mask
    assert acc.item() == pytest.approx(hits.sum().item() / mask.sum().item())


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1e-3, end_lr=1e-5, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:]))
    assert lr_at(100, cfg) == pytest.approx(1e-5)


def test_weight_decay_only_on_matrices():
    model = MaskGITTransformer(TINY)
    opt = build_optimizer(model, TrainConfig(steps=1, weight_decay=0.05))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in decayed) == (p.ndim == 2 and "embeddings" not in name), name
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------- training


def class_patterns(num_classes: int = 4, num_tokens: int = 8, codebook: int = 16) -> np.ndarray:
    return np.random.default_rng(1).integers(0, codebook, (num_classes, num_tokens))


@pytest.fixture
def patterned(tmp_path):
    """Every row of class k is the fixed token sequence patterns[k] (both views)."""
    patterns = class_patterns()
    tokens = np.repeat(patterns[np.arange(128) % 4][:, None], 2, axis=1).astype(np.uint16)
    data = write_token_dataset(tmp_path / "tokens", [40, 40, 48], num_tokens=8, codebook_size=16,
                               label_names=("a", "b", "c", "d"), tokens=tokens)
    return data, patterns


def test_generator_learns_small_token_set(patterned, tmp_path):
    data, patterns = patterned
    torch.manual_seed(0)
    model = MaskGITTransformer(GeneratorConfig(16, 8, 4, width=64, depth=2, heads=2, dropout=0.0, attn_dropout=0.0))
    loader = TokenLoader(TokenFiles.open(data.out), batch_size=32, drop_last=True)
    losses = []
    cfg = TrainConfig(steps=120, lr=3e-3, warmup_steps=10, save_every=1000, label_smoothing=0.0)
    fit(model, loader, cfg, str(tmp_path / "ckpt"), log=lambda step, m: losses.append(m["loss"]), progress=False)
    assert np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    labels = torch.arange(4).repeat_interleave(4)
    ids = generate(model, labels, SamplerConfig(num_steps=4, guidance_scale=1.0, temperature=1.0))
    accuracy = (ids.numpy() == patterns[labels.numpy()]).mean()
    assert accuracy > 0.9


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_matches_uninterrupted_training(patterned, tmp_path, num_workers):
    data, _ = patterned
    files = TokenFiles.open(data.out)
    cfg = TrainConfig(steps=7, lr=1e-3, warmup_steps=2, save_every=3, num_workers=num_workers)
    make = lambda: MaskGITTransformer(GeneratorConfig(16, 8, 4, width=32, depth=2, heads=2))  # noqa: E731

    torch.manual_seed(0)
    full, snapshot = {}, tmp_path / "at-step-3"

    def log(step, m):
        full[step] = m["loss"]
        if step == 4:  # the checkpoint on disk is the one saved after step 3
            shutil.copytree(tmp_path / "full", snapshot)

    model = make()
    fit(model, TokenLoader(files, 48, seed=1, drop_last=True), cfg, str(tmp_path / "full"), log=log, progress=False)
    assert json.loads((snapshot / "state.json").read_text())["step"] == 3

    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    resumed_model, resumed = make(), {}
    state = fit(resumed_model, TokenLoader(files, 48, seed=1, drop_last=True), cfg, str(snapshot), resume=True,
                log=lambda step, m: resumed.__setitem__(step, m["loss"]), progress=False)
    assert sorted(resumed) == [4, 5, 6, 7] and state.step == 7 and state.epoch >= 2  # 2 batches per epoch
    assert [resumed[s] for s in resumed] == [full[s] for s in resumed]
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY)
    opt = build_optimizer(model, TrainConfig(steps=5))
    tokens, labels = torch.randint(0, 16, (4, 8)), torch.tensor([0, 1, 2, 3])
    for step in range(2):
        train_step(model, opt, tokens, labels, step, TrainConfig(steps=5))
    save_checkpoint(tmp_path / "c", model, opt, TrainState(step=2, epoch=1, batch=3), {"data": {"x": 1}})
    save_checkpoint(tmp_path / "c", model, opt, TrainState(step=2, epoch=1, batch=3), {"data": {"x": 1}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # replaced, no leftovers

    other = MaskGITTransformer(TINY)
    other_opt = build_optimizer(other, TrainConfig(steps=5))
    assert load_checkpoint(tmp_path / "c", other, other_opt) == TrainState(2, 1, 3)
    for a, b in zip(model.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    with pytest.raises(ValueError, match="holds"):
        load_checkpoint(tmp_path / "c", MaskGITTransformer(GeneratorConfig(16, 8, 4, width=64, depth=1, heads=2)))


# ---------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("num_steps", [1, 3, 8, 12])
@pytest.mark.parametrize("schedule", ["constant", "linear", "power-cosine"])
def test_sampling_shapes_and_ids(num_steps, schedule):
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY).train()
    cfg = SamplerConfig(num_steps=num_steps, guidance_scale=2.0, guidance_schedule=schedule)
    ids = generate(model, torch.tensor([0, 1, 2, 3, 3]), cfg, generator=torch.Generator().manual_seed(1))
    assert ids.shape == (5, 8) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < TINY.codebook_size  # no mask id, no class ids
    assert model.training  # mode restored
    again = generate(model, torch.tensor([0, 1, 2, 3, 3]), cfg, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, again)


def test_sampling_is_random_at_high_temperature():
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY)
    ids = generate(model, torch.zeros(64, dtype=torch.long), SamplerConfig(num_steps=4, temperature=20.0))
    assert len(torch.unique(ids)) == 16  # every code shows up, not one argmax repeated


def test_gumbel_noise_statistics():
    g = _gumbel(torch.Size([200_000]), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.isfinite(g).all()
    assert g.mean().item() == pytest.approx(0.5772, abs=0.01)  # Euler-Mascheroni
    assert g.std().item() == pytest.approx(math.pi / math.sqrt(6), abs=0.01)


def test_guidance_schedules():
    const = SamplerConfig(num_steps=4, guidance_scale=3.0)
    assert [guidance_weight(s, const) for s in range(4)] == [3.0] * 4
    linear = SamplerConfig(num_steps=4, guidance_scale=3.0, guidance_schedule="linear")
    assert [guidance_weight(s, linear) for s in range(4)] == [0.0, 0.75, 1.5, 2.25]
    pc = SamplerConfig(num_steps=8, guidance_scale=6.9, guidance_schedule="power-cosine", guidance_power=2.5)
    weights = [guidance_weight(s, pc) for s in range(8)]
    assert weights[0] == 0.0 and all(a < b for a, b in zip(weights, weights[1:])) and weights[-1] < 5.9
    # official power-cosine mixing: uncond + g (cond - uncond), g = 1 + (s - 1)(1 - cos(pi (k/T)^p)) / 2
    cond, uncond = torch.randn(10), torch.randn(10)
    for k in range(8):
        g = (6.9 - 1) * (1 - math.cos(math.pi * (k / 8) ** 2.5)) / 2 + 1
        torch.testing.assert_close(cond + weights[k] * (cond - uncond), uncond + g * (cond - uncond))
    with pytest.raises(ValueError, match="guidance_schedule"):
        SamplerConfig(guidance_schedule="cosine")


def test_sampling_schedule_and_guidance_passes(monkeypatch):
    """Masked count per step follows floor(N arccos(r) / (pi/2)); chosen tokens stay fixed;
    guided steps add the unconditional (drop token) half to the batch."""
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY)
    inputs, drops = [], []
    forward = model.forward

    def spy(ids, labels, drop=None):
        inputs.append(ids[:2].clone())
        drops.append(None if drop is None else drop.tolist())
        return forward(ids, labels, drop)

    monkeypatch.setattr(model, "forward", spy)
    cfg = SamplerConfig(num_steps=3, guidance_scale=2.0, guidance_schedule="linear")
    out = generate(model, torch.tensor([1, 2]), cfg)
    assert drops == [None, [False, False, True, True], [False, False, True, True]]  # w = 0 at step 0
    assert [(x == TINY.mask_id).sum(1).tolist() for x in inputs] == [[8, 8], [6, 6], [4, 4]]
    for before, after in zip(inputs, [*inputs[1:], out]):
        kept = before != TINY.mask_id
        assert torch.equal(after[kept], before[kept])


# ---------------------------------------------------------------------------------- jobs


def test_jobs_train_then_sample(tmp_path, capsys):
    from jobs import sample as sample_job
    from jobs import train_generator
    from tokenizer import load_tokenizer

    tok_dir = write_titok_checkpoint("tiny_vq_single_stage", tmp_path / "titok")
    tok = load_tokenizer(str(tok_dir))
    data = write_token_dataset(tmp_path / "tokens", [30, 34], num_tokens=tok.num_tokens,
                               codebook_size=tok.codebook_size, fingerprint=tok.fingerprint)
    ckpt = tmp_path / "gen"
    args = [data.out, str(ckpt), "--steps", "3", "--batch-size", "8", "--width", "32", "--depth", "1",
            "--heads", "2", "--workers", "0", "--no-progress", "--device", "cpu"]
    assert train_generator.main(args) == 0
    assert json.loads((ckpt / "state.json").read_text())["step"] == 3
    assert train_generator.main([*args[:3], "5", *args[4:], "--resume"]) == 0
    assert json.loads((ckpt / "state.json").read_text())["step"] == 5

    png = tmp_path / "grid.png"
    assert sample_job.main([str(ckpt), "--tokenizer", str(tok_dir), "--out", str(png), "--classes", "dog,0",
                            "--per-class", "3", "--steps", "2", "--device", "cpu"]) == 0
    r = tok.image_size
    assert Image.open(png).size == (3 * (r + 2) + 2, 2 * (r + 2) + 2)
    assert "row 0: class 1 (dog)" in capsys.readouterr().out


def test_sample_refuses_other_tokenizer(tmp_path):
    from jobs.sample import check_compatible

    class Tok:
        num_tokens, codebook_size, ordered, fingerprint = 8, 16, False, "abc"

    check_compatible(TINY, Tok(), "abc")
    with pytest.raises(ValueError, match="fingerprints differ"):
        check_compatible(TINY, Tok(), "xyz")
    Tok.num_tokens = 16
    with pytest.raises(ValueError, match="decodes 16"):
        check_compatible(TINY, Tok(), None)
    Tok.ordered = True  # FlexTok: the generator's 8 tokens are a valid prefix
    check_compatible(TINY, Tok(), None)


def test_decode_grid_with_any_tokenizer():
    from jobs.sample import decode_grid

    class Tok:
        def decode_tokens(self, ids):
            return (ids[:, :1, None, None].float() / 10 - 0.2).expand(-1, 3, 4, 5)  # values beyond [0,1]

    grid = np.asarray(decode_grid(Tok(), torch.tensor([[0], [5], [9], [15]]), columns=2, pad=1))
    assert grid.shape == (2 * 5 + 1, 2 * 6 + 1, 3) and grid.dtype == np.uint8
    assert grid[1, 1, 0] == 0 and grid[1, 7, 0] == round(0.3 * 255) and grid[6, 7, 0] == 255  # clamped

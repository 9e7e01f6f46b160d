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
from safetensors.torch import load_file, save_file

from generator import (
    DataSpec,
    GeneratorConfig,
    MaskGITTransformer,
    RunDir,
    SamplerConfig,
    TrainConfig,
    TrainJob,
    TrainState,
    fit,
    generate,
    guidance_weight,
    load_generator,
)
from generator.checkpoint import sampler_defaults
from generator.masking import arccos_mask_ratio, global_batch_noise, token_loss_sums
from generator.run import optimizer_state_dict
from generator.sample import _gumbel
from generator.train import World, build_optimizer, lr_at, train_step
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
    mask, drop, masked = global_batch_noise(7, 4000, 64, slice(None), class_dropout=0.1)
    counts = mask.sum(1)
    assert counts.min() >= 1 and counts.max() <= 64 and masked == counts.sum().item()
    assert counts.float().mean().item() / 64 == pytest.approx(2 / math.pi, abs=0.01)  # E[acos(U)]/(pi/2)
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.015)


def test_global_batch_noise_depends_on_the_row_only():
    """A rank holding rows [a, b) of the global batch draws exactly those rows' masks and drops."""
    full_mask, full_drop, total = global_batch_noise(3, 12, 8, slice(None), 0.5)
    for rows in (slice(0, 6), slice(6, 12), slice(3, 6)):
        mask, drop, masked = global_batch_noise(3, 12, 8, rows, 0.5)
        assert torch.equal(mask, full_mask[rows]) and torch.equal(drop, full_drop[rows]) and masked == total
    assert not torch.equal(global_batch_noise(4, 12, 8, slice(None), 0.5)[0], full_mask)


def test_masked_token_loss_weights_and_smoothing():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    mask = torch.tensor([[True, False, True, False, False], [True, True, True, True, False]])
    weighted, correct = token_loss_sums(logits, targets, mask, label_smoothing=0.2, unmasked_weight=0.3)
    logp = logits.log_softmax(-1)
    ce = -(0.8 * logp.gather(-1, targets[..., None])[..., 0] + 0.2 * logp.mean(-1))
    w = mask.float() * 0.7 + 0.3
    assert weighted.item() == pytest.approx((ce * w).sum().item(), rel=1e-5)
    assert correct.item() == ((logits.argmax(-1) == targets) & mask).sum().item()


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


def tiny_job(out: str, ckpt, model: GeneratorConfig, **train) -> TrainJob:
    return TrainJob(model=model, train=TrainConfig(**train), data=DataSpec(out), ckpt=str(ckpt),
                    metadata={"tokenizer": {"fingerprint": "f" * 64}}, progress=False)


def logged(ckpt) -> dict[int, dict]:
    return {r["step"]: r for r in RunDir(str(ckpt)).metrics(upto=10**9)}


def test_generator_learns_small_token_set(patterned, tmp_path):
    data, patterns = patterned
    model_cfg = GeneratorConfig(16, 8, 4, width=64, depth=2, heads=2, dropout=0.0, attn_dropout=0.0)
    job = tiny_job(data.out, tmp_path / "ckpt", model_cfg, steps=120, batch_size=32, data_streams=8, lr=3e-3,
                   warmup_steps=10, save_every=1000, label_smoothing=0.0, ema_decay=0.9)
    fit(job)
    losses = [r["loss"] for r in logged(tmp_path / "ckpt").values()]
    assert len(losses) == 120 and np.mean(losses[-10:]) < 0.25 * np.mean(losses[:5])
    model, _ = load_generator(str(tmp_path / "ckpt"))  # the EMA weights
    labels = torch.arange(4).repeat_interleave(4)
    ids = generate(model, labels, SamplerConfig(num_steps=4, guidance_scale=1.0, temperature=1.0))
    accuracy = (ids.numpy() == patterns[labels.numpy()]).mean()
    assert accuracy > 0.9


def test_resume_matches_uninterrupted_training(patterned, tmp_path):
    """Resumed from the step-3 commit, also with DataLoader worker processes instead of none: the
    same losses and bit-identical weights, EMA and optimizer state."""
    data, _ = patterned
    model_cfg = GeneratorConfig(16, 8, 4, width=32, depth=2, heads=2)  # dropout on: it is seeded per step
    train = dict(steps=7, batch_size=48, data_streams=4, lr=1e-3, warmup_steps=2, save_every=3, keep_checkpoints=5)
    full = tmp_path / "full"
    fit(tiny_job(data.out, full, model_cfg, **train))
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    (resumed / "latest.json").write_text(json.dumps({"step": 3, "dir": "step-00000003"}))
    state = fit(tiny_job(data.out, resumed, model_cfg, **train, num_workers=2))
    assert state == TrainState(step=7, epoch=3, batch=1, samples=7 * 48)  # 128 rows: 2 global batches an epoch
    a, b = logged(full), logged(resumed)
    assert sorted(b) == list(range(1, 8)) and [b[s]["loss"] for s in b] == [a[s]["loss"] for s in b]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        x, y = (load_file(str(p / "step-00000007" / name)) for p in (full, resumed))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name


def test_run_directory_commits(tmp_path):
    torch.manual_seed(0)
    model = MaskGITTransformer(TINY)
    cfg = TrainConfig(steps=5, batch_size=4)
    opt = build_optimizer(model, cfg)
    tokens, labels = torch.randint(0, 16, (4, 8)), torch.tensor([0, 1, 2, 3])
    run = RunDir(str(tmp_path / "run"))
    assert run.latest() is None
    for step in range(3):
        train_step(model, opt, tokens, labels, step, cfg, World())
        run.commit(TrainState(step + 1, 0, step + 1, 4 * (step + 1)), {"format": "pretok-generator"},
                   model.state_dict(), model.state_dict(), opt, [{"step": s + 1} for s in range(step + 1)], keep=2)
    assert run.latest() == {"step": 3, "dir": "step-00000003"}
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "latest.json", "metrics.jsonl", "step-00000002", "step-00000003"]  # pruned, no temporary files
    assert [r["step"] for r in run.metrics(upto=2)] == [1, 2]
    other = build_optimizer(MaskGITTransformer(TINY), cfg)
    other.load_state_dict(optimizer_state_dict(run.read_bytes("step-00000003", "optimizer.safetensors"), "x"))
    sa, sb = opt.state_dict(), other.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][i][k], sb["state"][i][k]) for i in sa["state"] for k in sa["state"][i])


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
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 3
    assert train_generator.main([*args[:3], "5", *args[4:], "--resume"]) == 0
    assert json.loads((ckpt / "latest.json").read_text())["step"] == 5

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

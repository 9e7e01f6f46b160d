"""The shipped demo TiTok: loads like any checkpoint, reconstructs held-out sample images above
the floor, and records how it was trained; the routed init its training starts from."""
from __future__ import annotations

import json
import shlex

import torch
import torch.nn.functional as F

from jobs.demo import heldout_psnr, shipped_tokenizer
from jobs.train_tokenizer import HELDOUT_SEED, build_parser, routed_init, sample_tensors, small_titok_config
from tokenizer import build_tokenizer, load_tokenizer

# Set from what the shipped weights reach (train_summary.json: heldout_psnr_db, 256 images), less a
# margin for the smaller held-out subset measured here.
PSNR_FLOOR_DB = 27.0  # reached: 28.24 dB (256 images), 28.34 dB (the 64 measured here)
MAX_BYTES = 4 << 20


def test_shipped_tokenizer_loads_and_meets_the_psnr_floor():
    folder = shipped_tokenizer()
    assert (folder / "model.safetensors").stat().st_size < MAX_BYTES
    tok = load_tokenizer(str(folder))
    assert (tok.image_size, tok.codebook_size) == (64, 1024)
    assert heldout_psnr(tok, 64) >= PSNR_FLOOR_DB


def test_training_command_and_seed_are_recorded():
    summary = json.loads((shipped_tokenizer() / "train_summary.json").read_text())
    argv = shlex.split(summary["command"])
    assert argv[:2] == ["pretok", "train-tokenizer"]
    args = build_parser().parse_args(argv[2:])
    assert args.data is None and args.seed == summary["seed"] and summary["heldout_seed"] == HELDOUT_SEED
    assert (args.steps, args.tokens, args.codebook, args.width, args.depth, args.lr, not args.no_routed_init) == (
        summary["steps"], summary["tokens"], summary["codebook"], summary["width"], summary["depth"], summary["lr"],
        summary["routed_init"])
    assert summary["steps_done"] == summary["steps"] and summary["history"][-1]["step"] == summary["steps"]
    assert summary["heldout_psnr_db"] >= PSNR_FLOOR_DB


def _layer0_attention(block, run) -> torch.Tensor:
    """Head-averaged softmax attention [B,N,N] of ResidualAttentionBlock ``block`` on the input the
    model itself gives it while ``run()`` runs (caught by a forward pre-hook)."""
    inputs = []
    handle = block.register_forward_pre_hook(lambda _module, args: inputs.append(args[0]))
    try:
        with torch.no_grad():
            run()
    finally:
        handle.remove()
    y = block.ln_1(inputs[0])
    b, n, w = y.shape
    heads = block.attn.num_heads
    q, k, _ = F.linear(y, block.attn.in_proj_weight, block.attn.in_proj_bias).view(b, n, 3, heads, w // heads).unbind(2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / (w // heads) ** 0.5
    return scores.softmax(-1).mean(1)


def test_routed_init_matches_each_latent_token_to_its_patch():
    torch.manual_seed(0)
    tok = build_tokenizer(small_titok_config(64, 8, 64, 1024, 96, 2))
    assert routed_init(tok, torch.Generator().manual_seed(0))
    images = sample_tensors(4, 0, 64)[0].float() / 255
    g2 = 64  # patches = latent tokens = mask tokens; sequences are [cls, patches|masks, latents]
    attn = _layer0_attention(tok.encoder.transformer[0], lambda: tok.encode(images))
    latent_to_patch = attn[:, 1 + g2:, 1:1 + g2]          # latent token i -> patch j
    # Most of the weight on the partner (uniform would be 1/129); image content dilutes it in the encoder.
    assert latent_to_patch.diagonal(dim1=1, dim2=2).mean() > 0.5
    ids = tok.encode(images)
    attn = _layer0_attention(tok.decoder.transformer[0], lambda: tok.decode_tokens(ids))
    assert attn[:, 1:1 + g2, 1 + g2:].diagonal(dim1=1, dim2=2).mean() > 0.8   # mask token i -> latent token i


def test_routed_init_leaves_other_shapes_alone():
    tok = build_tokenizer(small_titok_config(64, 8, 32, 1024, 96, 2))   # 32 latent tokens, 64 patches
    before = {k: v.clone() for k, v in tok.state_dict().items()}
    assert not routed_init(tok, torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in tok.state_dict().items())

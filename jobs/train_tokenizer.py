"""``pretok train-tokenizer``: train a small single-stage TiTok on images (CPU-friendly).

Gives the demo (and tests) a tokenizer whose tokens mean something. The result is a normal
checkpoint dir (official config fields + ``model_sizes`` extension, model.safetensors) that
``load_tokenizer`` and ``pretok pretokenize`` take like a released one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.decode import decode_record
from pipeline.records import DecodedImage
from pipeline.sources import iter_records, list_source
from tokenizer import build_tokenizer
from tokenizer.transform import ImageTransform

RESTART_EVERY = 50    # steps between dead-code restarts
RESTART_UNTIL = 0.7   # fraction of training during which restarts happen


def small_titok_config(image_size: int, patch: int, tokens: int, codebook: int, width: int, depth: int) -> dict:
    """An official-layout single-stage TiTok config with a custom ViT size."""
    heads = max(1, width // 32)
    return {
        "model": {"vq_model": {
            "quantize_mode": "vq", "codebook_size": codebook, "token_size": 16, "use_l2_norm": True,
            "commitment_cost": 0.25, "vit_enc_model_size": "demo", "vit_dec_model_size": "demo",
            "vit_enc_patch_size": patch, "vit_dec_patch_size": patch, "num_latent_tokens": tokens,
            "finetune_decoder": False, "is_legacy": False,
            "model_sizes": {"demo": {"width": width, "num_layers": depth, "num_heads": heads, "mlp_ratio": 4.0}},
        }},
        "dataset": {"preprocessing": {"crop_size": image_size}},
    }


def load_images(url: str, image_size: int, limit: int, storage_options: dict | None = None) -> torch.Tensor:
    """Up to ``limit`` images of a dataset as uint8 [M,3,R,R] (center view, the shared transform)."""
    transform = ImageTransform(image_size, "center")
    out: list[np.ndarray] = []
    for shard in list_source(url, storage_options=storage_options).shards:
        for rec in iter_records(shard, storage_options):
            d = decode_record(rec, transform)
            if isinstance(d, DecodedImage):
                out.append(d.views[0])
            if len(out) >= limit:
                return torch.from_numpy(np.stack(out))
    if not out:
        raise ValueError(f"no decodable images in {url}")
    return torch.from_numpy(np.stack(out))


def vq_losses(tok, images: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reconstruction and VQ (codebook + beta * commitment) losses with a straight-through
    estimator; also the ids and the latents [B*N,C] (for dead-code restarts)."""
    z = tok.encode_latent(images)                          # [B,C,1,N]
    if tok.quantize.use_l2_norm:
        z = F.normalize(z, dim=1)
    ids = tok.quantize(z)
    zq = tok.quantize.lookup(ids)
    vq = F.mse_loss(zq, z.detach()) + beta * F.mse_loss(z, zq.detach())
    recon = F.mse_loss(tok.decode_latent(z + (zq - z).detach()), images)
    return recon, vq, ids, z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def restart_codes(tok, latents: torch.Tensor, dead: torch.Tensor, gen: torch.Generator) -> None:
    """Move unused codebook rows onto randomly chosen current latents (avoids codebook collapse)."""
    if len(dead):
        pick = torch.randint(0, len(latents), (len(dead),), generator=gen)
        tok.quantize.embedding.weight.data[dead] = latents[pick]


def train_tokenizer(
    data: str, out: str, image_size: int = 32, patch: int = 8, tokens: int = 16, codebook: int = 256,
    width: int = 96, depth: int = 2, steps: int = 1500, batch_size: int = 32, lr: float = 3e-4,
    max_images: int = 4096, seed: int = 0, progress: bool = True, storage_options: dict | None = None,
) -> dict:
    """Train and save; returns a summary with the final reconstruction MSE and codebook usage."""
    torch.manual_seed(seed)
    images = load_images(data, image_size, max_images, storage_options).float() / 255
    config = small_titok_config(image_size, patch, tokens, codebook, width, depth)
    tok = build_tokenizer(config).train()
    opt = torch.optim.AdamW(tok.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    usage = torch.zeros(codebook, dtype=torch.long)
    bar = tqdm(range(steps), desc="train tokenizer", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        batch = images[idx]
        flip = torch.rand(batch_size, generator=gen) < 0.5
        batch[flip] = batch[flip].flip(-1)
        recon, vq, ids, latents = vq_losses(tok, batch, beta=0.25)
        usage += torch.bincount(ids.flatten(), minlength=codebook)
        if step % RESTART_EVERY == 0 and step < RESTART_UNTIL * steps:
            restart_codes(tok, latents, (usage == 0).nonzero().flatten() if step else torch.arange(codebook), gen)
            usage.zero_()
            recon, vq, ids, _ = vq_losses(tok, batch, beta=0.25)
        loss = recon + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == steps - 1:
            bar.set_postfix(recon=f"{recon.item():.4f}", codes=int(ids.unique().numel()))
    tok.eval()
    with torch.no_grad():
        held = images[: min(256, len(images))]
        recon, _, ids, _ = vq_losses(tok, held, beta=0.25)
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tok.state_dict().items()}, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(config, indent=1))
    summary = {
        "recon_mse": round(recon.item(), 5),
        "baseline_mse": round(((held - held.mean(0)) ** 2).mean().item(), 5),
        "codes_used": int(ids.unique().numel()),
        "codebook_size": codebook,
        "images": len(images),
        "steps": steps,
        "seconds": round(time.time() - t0, 1),
    }
    (dest / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok train-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="image dataset (any format pretokenize reads)")
    p.add_argument("out", help="checkpoint dir to write (config.json + model.safetensors)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--tokens", type=int, default=16, help="latent tokens per image")
    p.add_argument("--codebook", type=int, default=256)
    p.add_argument("--width", type=int, default=96)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-images", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    summary = train_tokenizer(
        a.data, a.out, a.image_size, a.patch_size, a.tokens, a.codebook, a.width, a.depth,
        a.steps, a.batch_size, a.lr, a.max_images, a.seed,
    )
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

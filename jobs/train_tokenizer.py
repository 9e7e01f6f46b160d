"""``pretok train-tokenizer``: train a small single-stage TiTok on images (CPU-friendly).

Gives the demo (and tests) a tokenizer whose tokens mean something. The result is a normal
checkpoint dir (official config fields + ``model_sizes`` extension, model.safetensors) that
``load_tokenizer`` and ``pretok pretokenize`` take like a released one.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from pipeline.decode import decode_record
from pipeline.records import DecodedImage
from pipeline.sources import iter_records, list_source
from pipeline.synthetic_images import sample_images
from tokenizer import build_tokenizer
from tokenizer.transform import ImageTransform

RESTART_EVERY = 50    # steps between dead-code restarts
RESTART_UNTIL = 0.7   # fraction of training during which restarts happen
HELDOUT_SEED = 1_000_003  # built-in held-out images: a seed no training run uses


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


def routed_init(tok, gen: torch.Generator, patch_gain: float = 5.0, value_gain: float = 3.0) -> bool:
    """Start layer 0 with position-matched attention: latent token i attends to patch i in the
    encoder, and mask token i to latent token i in the decoder; returns False (and changes nothing)
    unless there is one latent token per patch on both sides.

    From the default init, every latent token averages all patches and the decoder outputs the
    mean image for hundreds of steps. Positions are random vectors in the first half of the width
    for patches and mask tokens, and the same vectors in the second half for the latent tokens;
    layer 0's query reads one half and its key the other, so each token matches its partner and
    not itself. The patch embedding and layer 0's value path are scaled up so that image content,
    not position, dominates what gets routed.
    """
    enc, dec = tok.encoder, tok.decoder
    n, (rows, w) = tok.latent_tokens.shape[0], enc.positional_embedding.shape
    if rows - 1 != n or dec.positional_embedding.shape[0] - 1 != n or w % 2 or dec.width != w:
        return False
    half = w // 2
    with torch.no_grad():
        pos, zeros = torch.randn(n, half, generator=gen), torch.zeros(n, half)
        tok.latent_tokens.zero_()
        dec.mask_token.zero_()
        for module in (enc, dec):
            module.positional_embedding[1:] = torch.cat([pos, zeros], 1)
            module.latent_token_positional_embedding[:] = torch.cat([zeros, pos], 1)
        for attn, query_half in ((enc.transformer[0].attn, 1), (dec.transformer[0].attn, 0)):
            proj = torch.randn(w, half, generator=gen) * 0.14  # partner logit ~10: ~90% of the weight, before the gains
            q, k = torch.zeros(w, w), torch.zeros(w, w)
            q[:, query_half * half:(query_half + 1) * half] = proj
            k[:, (1 - query_half) * half:(2 - query_half) * half] = proj
            attn.in_proj_weight[: 2 * w] = torch.cat([q, k])
            attn.in_proj_bias[: 2 * w] = 0
        enc.patch_embed.weight.mul_(patch_gain)
        first = enc.transformer[0].attn
        first.in_proj_weight[2 * w:].mul_(value_gain)
        first.out_proj.weight.mul_(value_gain)
    return True


def psnr(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [0, 1] (reconstructions clamped first)."""
    mse = ((recon.clamp(0, 1) - target) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def reconstruct(tok, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """images [M,3,R,R] in [0,1] -> encode to ids -> decode, clamped to [0,1]."""
    out = [tok.decode_tokens(tok.encode(images[i:i + batch_size])).clamp(0, 1)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def evaluate(tok, held: torch.Tensor) -> dict:
    """Held-out PSNR (through the token ids, like a user decodes) and codebook usage."""
    was_training = tok.training
    tok.eval()
    with torch.no_grad():
        p = psnr(reconstruct(tok, held), held)
        ids = torch.cat([tok.encode(held[i:i + 64]) for i in range(0, len(held), 64)])
    tok.train(was_training)
    return {"heldout_psnr_db": round(p.mean().item(), 2), "heldout_psnr_p10_db": round(p.quantile(0.1).item(), 2),
            "heldout_images": len(held), "codes_used": int(ids.unique().numel())}


def save_tokenizer(tok, config: dict, dest: Path) -> None:
    """config.json + model.safetensors (float16: half the size, loads into float32 models)."""
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().half().contiguous() for k, v in tok.state_dict().items()}, str(dest / "model.safetensors"))
    (dest / "config.json").write_text(json.dumps(config, indent=1) + "\n")


@dataclass(frozen=True)
class TrainSpec:
    """Defaults: the shipped demo tokenizer's recipe (jobs/demo_tokenizer/train_summary.json)."""
    image_size: int = 64
    patch: int = 8
    tokens: int = 64
    codebook: int = 1024
    width: int = 96
    depth: int = 2
    steps: int = 6000
    batch_size: int = 32
    lr: float = 2e-3
    seed: int = 0
    routed_init: bool = True


def train_tokenizer(
    images: torch.Tensor, held: torch.Tensor, out: str, spec: TrainSpec, progress: bool = True,
    save_every: int = 0, extra: dict | None = None, stop_after: int = 0,
) -> dict:
    """Train on uint8 images [M,3,R,R], evaluate on ``held``, save; returns the summary (also in
    ``train_summary.json``). ``save_every`` > 0 also saves (and evaluates) along the way;
    ``stop_after`` > 0 ends there (the schedule still spans ``spec.steps``), saved as at a
    ``save_every`` point, so a run stopped early by hand is reproduced exactly."""
    torch.manual_seed(spec.seed)
    images, held = images.float() / 255, held.float() / 255
    config = small_titok_config(spec.image_size, spec.patch, spec.tokens, spec.codebook, spec.width, spec.depth)
    tok = build_tokenizer(config).train()
    if spec.routed_init and not routed_init(tok, torch.Generator().manual_seed(spec.seed)):
        print("train-tokenizer: routed init needs one latent token per patch; using the default init", file=sys.stderr)
    opt = torch.optim.AdamW(tok.parameters(), lr=spec.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=spec.steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(spec.seed)
    dest = Path(out)
    t0 = time.time()
    usage = torch.zeros(spec.codebook, dtype=torch.long)

    history: list[dict] = []  # held-out PSNR at every evaluation: the training curve

    def summary(step: int) -> dict:
        scores = evaluate(tok, held)
        history.append({"step": step, "heldout_psnr_db": scores["heldout_psnr_db"]})
        s = {**asdict(spec), **scores, "steps_done": step, "train_images": len(images),
             "baseline_psnr_db": round(psnr(held.mean(0, keepdim=True).expand_as(held), held).mean().item(), 2),
             "parameters": sum(p.numel() for p in tok.parameters()), "seconds": round(time.time() - t0, 1),
             **(extra or {}), "history": history}
        save_tokenizer(tok, config, dest)
        (dest / "train_summary.json").write_text(json.dumps(s, indent=1) + "\n")
        return s

    bar = tqdm(range(spec.steps), desc="train tokenizer", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(images), (spec.batch_size,), generator=gen)
        batch = images[idx]
        flip = torch.rand(spec.batch_size, generator=gen) < 0.5
        batch[flip] = batch[flip].flip(-1)
        recon, vq, ids, latents = vq_losses(tok, batch, beta=0.25)
        usage += torch.bincount(ids.flatten(), minlength=spec.codebook)
        if step % RESTART_EVERY == 0 and step < RESTART_UNTIL * spec.steps:
            restart_codes(tok, latents, (usage == 0).nonzero().flatten() if step else torch.arange(spec.codebook), gen)
            usage.zero_()
            recon, vq, ids, _ = vq_losses(tok, batch, beta=0.25)
        loss = recon + vq
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0 or step == spec.steps - 1:
            bar.set_postfix(psnr=f"{10 * math.log10(1 / max(recon.item(), 1e-10)):.1f}", codes=int(ids.unique().numel()))
        if stop_after and step == stop_after:
            tok.eval()
            return summary(step)
        if save_every and step and step % save_every == 0:
            print(json.dumps(summary(step)), flush=True)
    tok.eval()
    return summary(spec.steps)


def sample_tensors(count: int, seed: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Built-in sample images as uint8 [M,3,R,R] and their labels."""
    pixels, labels = sample_images(count, seed, image_size)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok train-tokenizer", description=__doc__.split("\n\n")[0])
    p.add_argument("data", nargs="?", help="image dataset (any format pretokenize reads); "
                   "default: the built-in sample images (--samples of them, seeded by --seed)")
    p.add_argument("out", help="checkpoint dir to write (config.json + model.safetensors + train_summary.json)")
    p.add_argument("--samples", type=int, default=8192, help="built-in sample images to train on")
    p.add_argument("--heldout", type=int, default=256, help="held-out images for the PSNR report")
    d = TrainSpec()
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--patch-size", type=int, default=d.patch)
    p.add_argument("--tokens", type=int, default=d.tokens, help="latent tokens per image")
    p.add_argument("--codebook", type=int, default=d.codebook)
    p.add_argument("--width", type=int, default=d.width)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--no-routed-init", action="store_true",
                   help="start from the default init (latent tokens not matched to patches; trains much slower)")
    p.add_argument("--max-images", type=int, default=4096, help="images read from DATA")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--save-every", type=int, default=0, help="also save + evaluate every N steps (0: at the end)")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop at this step, saved as at a --save-every point (the LR schedule still spans --steps)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); "
                   "1 is much faster than 2 on a machine other jobs share")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = build_parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = TrainSpec(a.image_size, a.patch_size, a.tokens, a.codebook, a.width, a.depth, a.steps, a.batch_size,
                     a.lr, a.seed, routed_init=not a.no_routed_init)
    if a.data:
        images = load_images(a.data, a.image_size, a.max_images + a.heldout)
        if len(images) <= a.heldout:
            raise SystemExit(f"{a.data}: {len(images)} images, need more than --heldout {a.heldout}")
        images, held = images[: -a.heldout], images[-a.heldout:]
    else:
        images, _ = sample_tensors(a.samples, a.seed, a.image_size)
        held, _ = sample_tensors(a.heldout, HELDOUT_SEED, a.image_size)
    extra = {"command": "pretok train-tokenizer " + " ".join(argv), "data": a.data or "built-in sample images",
             "heldout_seed": None if a.data else HELDOUT_SEED, "torch": torch.__version__}
    summary = train_tokenizer(images, held, a.out, spec, progress=not a.no_progress, save_every=a.save_every,
                              extra=extra, stop_after=a.stop_after)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sample a generator checkpoint and decode the tokens into a PNG grid (one class per row).

    python -m jobs.sample CKPT --tokenizer SRC --out grid.png [--classes 1,2,3] [--per-class 4]

CKPT is a pretok run directory (its latest commit, EMA weights unless --raw-weights) or an official
TiTok generator folder as published, SRC the tokenizer whose tokens the generator was trained on;
both may be a hub repo id (org/name[@revision]), an hf:// URL, a local folder or an fsspec URL, e.g.

    python -m jobs.sample yucornetto/generator_titok_l32_imagenet \
        --tokenizer yucornetto/tokenizer_titok_l32_imagenet --out grid.png

Sampling settings default to what an official config recommends (as the official
sample_imagenet_titok.py uses them), else to ``SamplerConfig``'s defaults.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

import torch
from PIL import Image

from generator.checkpoint import load_generator, sampler_defaults
from generator.model import GeneratorConfig
from generator.sample import SCHEDULES, SamplerConfig, generate
from jobs.grid import image_grid, to_uint8
from tokenizer import load_tokenizer
from tokenizer.sources import SOURCE_HELP


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok sample", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt", help="generator: a pretok run directory or an official generator folder, as a hub repo id "
                   "org/name[@revision], hf:// URL, local folder or fsspec URL")
    p.add_argument("--tokenizer", required=True, help=f"the tokenizer: {SOURCE_HELP}")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--classes", default=None, help="comma-separated class indices or names (default: first 4)")
    p.add_argument("--per-class", type=int, default=4, help="samples per class (grid columns)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--guidance-schedule", choices=SCHEDULES, default=None)
    p.add_argument("--guidance-power", type=float, default=None, help="power-cosine exponent")
    p.add_argument("--temperature", type=float, default=None, help="randomisation temperature (annealed)")
    p.add_argument("--softmax-annealing", action=argparse.BooleanOptionalAction, default=None,
                   help="anneal the softmax temperature (default: on for official configs, else off)")
    p.add_argument("--raw-weights", action="store_true",
                   help="sample the raw weights of a pretok run, not its EMA (the default when it has one)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p


def parse_classes(spec: str | None, num_classes: int, names: list[str] | None) -> list[int]:
    if spec is None:
        return list(range(min(4, num_classes)))
    out = []
    for item in spec.split(","):
        item = item.strip()
        if item.lstrip("-").isdigit():
            out.append(int(item))
        elif names and item in names:
            out.append(names.index(item))
        else:
            raise ValueError(f"unknown class {item!r}")
        if not 0 <= out[-1] < num_classes:
            raise ValueError(f"class {out[-1]} is outside [0, {num_classes})")
    return out


def check_compatible(cfg: GeneratorConfig, tokenizer, trained_fingerprint: str | None) -> None:
    """The generator's tokens must be the tokenizer's: same codebook, same length (or a prefix
    of an ordered tokenizer's tokens), same fingerprint when the checkpoint records one."""
    if cfg.codebook_size != tokenizer.codebook_size:
        raise ValueError(f"generator codebook {cfg.codebook_size} != tokenizer codebook {tokenizer.codebook_size}")
    prefix_ok = cfg.num_tokens < tokenizer.num_tokens and getattr(tokenizer, "ordered", False)
    if cfg.num_tokens != tokenizer.num_tokens and not prefix_ok:
        raise ValueError(f"generator makes {cfg.num_tokens} tokens, the tokenizer decodes {tokenizer.num_tokens}")
    fingerprint = getattr(tokenizer, "fingerprint", "")
    if trained_fingerprint and fingerprint and trained_fingerprint != fingerprint:
        raise ValueError("the generator was trained on tokens of another tokenizer (fingerprints differ)")


def decode_grid(tokenizer, ids: torch.Tensor, columns: int, pad: int = 2) -> Image.Image:
    """Token ids int64 [R*columns, N] (row-major) -> RGB grid, images clamped to [0,1] and rounded
    to uint8. ``tokenizer`` is anything with ``decode_tokens(ids) -> float [B,3,H,W]``."""
    with torch.no_grad():
        images = tokenizer.decode_tokens(ids)
    return image_grid(to_uint8(images), columns, pad)


def sample_tokens(model, classes: list[int], per_class: int, cfg: SamplerConfig, seed: int, batch_size: int):
    """int64 [len(classes) * per_class, N], class-major, sampled in batches."""
    device = next(model.parameters()).device
    labels = torch.tensor(classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device).manual_seed(seed)
    out = []
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for chunk in labels.split(batch_size):
            out.append(generate(model, chunk, cfg, generator=gen))
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, config = load_generator(args.ckpt, args.device, weights="raw" if args.raw_weights else "ema")
        tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    except (ValueError, OSError, RuntimeError) as e:  # bad source or checkpoint (CheckpointError is a ValueError)
        print(f"pretok sample: error: {e}", file=sys.stderr)
        return 2
    data = config.get("data", {})
    check_compatible(model.config, tokenizer, data.get("tokenizer", {}).get("fingerprint"))
    names = data.get("label_names")
    classes = parse_classes(args.classes, model.config.num_classes, names)
    overrides = {
        "num_steps": args.steps, "guidance_scale": args.guidance_scale, "guidance_schedule": args.guidance_schedule,
        "guidance_power": args.guidance_power, "temperature": args.temperature,
        "softmax_annealing": args.softmax_annealing,
    }
    cfg = dataclasses.replace(sampler_defaults(config), **{k: v for k, v in overrides.items() if v is not None})
    ids = sample_tokens(model, classes, args.per_class, cfg, args.seed, args.batch_size)
    decode_grid(tokenizer, ids, args.per_class).save(args.out)
    for row, c in enumerate(classes):
        print(f"row {row}: class {c}" + (f" ({names[c]})" if names else ""))
    print(f"wrote {args.out} ({cfg})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train a class-conditional MaskGIT generator on pretokenized shards.

    python -m jobs.train_generator OUT CKPT --steps 2000 [--batch-size 64] [--resume]

OUT is a pretok output dataset (local or s3://); CKPT a local checkpoint directory (safetensors).
The model shape defaults are small, for CPU; the official TiTok-L-32 generator is
``--width 768 --depth 24 --heads 16``.
"""
from __future__ import annotations

import argparse
import sys

import torch

from generator.checkpoint import generator_config, has_checkpoint, read_config
from generator.model import GeneratorConfig, MaskGITTransformer
from generator.train import TrainConfig, fit
from jobs.args import storage_options
from pipeline.tokens import TokenFiles, TokenLoader


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_generator", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="pretok output dataset (directory or fsspec URL)")
    p.add_argument("ckpt", help="checkpoint directory (written every --save-every steps and at the end)")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--end-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(1000, steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--class-dropout", type=float, default=0.1, help="probability of the class-drop token")
    p.add_argument("--max-tokens", type=int, default=None, help="train on the first k tokens (ordered tokenizers)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--buffer-shards", type=int, default=None, help="shards shuffled together (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in CKPT if there is one")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--storage-options", type=storage_options, default=None, help="fsspec options as JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


def _num_classes(files: TokenFiles) -> int:
    if files.label_names:
        return len(files.label_names)
    top = files.max_label()
    if top < 0:
        raise ValueError(f"{files.root} has no labelled rows")
    return top + 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    files = TokenFiles.open(args.out, args.split, args.storage_options)
    loader = TokenLoader(
        files, args.batch_size, seed=args.seed, max_tokens=args.max_tokens,
        buffer_shards=args.buffer_shards, drop_last=True,
    )
    resuming = args.resume and has_checkpoint(args.ckpt)
    if resuming:
        saved = read_config(args.ckpt)
        model_cfg = generator_config(saved)
        if saved.get("data", {}).get("tokenizer", {}).get("fingerprint") != files.tokenizer["fingerprint"]:
            raise SystemExit(f"{args.ckpt} was trained on tokens of another tokenizer than {args.out}")
        if (model_cfg.codebook_size, model_cfg.num_tokens) != (files.codebook_size, loader.num_tokens):
            raise SystemExit(
                f"{args.ckpt} expects {model_cfg.num_tokens} tokens over {model_cfg.codebook_size} codes, "
                f"the data gives {loader.num_tokens} over {files.codebook_size} (check --max-tokens)"
            )
        print(f"resuming {args.ckpt}: model config taken from the checkpoint", file=sys.stderr)
    else:
        model_cfg = GeneratorConfig(
            codebook_size=files.codebook_size, num_tokens=loader.num_tokens, num_classes=_num_classes(files),
            width=args.width, depth=args.depth, heads=args.heads,
            dropout=args.dropout, attn_dropout=args.dropout, class_dropout=args.class_dropout,
        )
    train_cfg = TrainConfig(
        steps=args.steps, lr=args.lr, end_lr=args.end_lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else min(1000, args.steps // 10),
        weight_decay=args.weight_decay, seed=args.seed, save_every=args.save_every, num_workers=args.workers,
    )
    metadata = {"data": {"out": args.out, "split": args.split, "max_tokens": loader.num_tokens,
                         "tokenizer": files.tokenizer, "label_names": files.label_names}}
    state = fit(
        MaskGITTransformer(model_cfg), loader, train_cfg, args.ckpt, resume=resuming, metadata=metadata,
        device=args.device, progress=not args.no_progress,
    )
    print(f"saved {args.ckpt} at step {state.step}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

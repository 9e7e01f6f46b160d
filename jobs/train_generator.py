"""Train a class-conditional MaskGIT generator on pretokenized shards, on one process or on Ray Train.

    pretok train-generator OUT CKPT --steps 2000 [--batch-size 64] [--train-workers 4 --gpus-per-worker 1]

OUT is a pretok output dataset, CKPT a run directory (both local or any fsspec URL, s3://...):
CKPT/latest.json names the last commit CKPT/step-XXXXXXXX/ (model, EMA and optimizer safetensors,
config.json, state.json); CKPT/metrics.jsonl logs every step, CKPT/curves.png is drawn at the end.

--train-workers 1 (default) trains in this process; N > 1 runs N Ray Train workers (DDP: gloo on
CPU, nccl on GPU, bf16 autocast on GPU) on RAY_ADDRESS's cluster or a local one. The global batch
is --batch-size x --train-workers x --grad-accum; its rows at each step depend on the global batch and
--data-streams only, so a run resumed (--resume) with another worker count and the same global batch
continues exactly. The model shape defaults are small, for CPU; the official TiTok-L-32 generator
is --width 768 --depth 24 --heads 16.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import PurePosixPath

from generator.curves import plot_curves
from generator.model import GeneratorConfig
from generator.run import CONFIG, CURVES, RunDir
from generator.train import (
    LOADERS, DataSpec, TrainConfig, TrainJob, check_data, fit, resume_problems, run_config,
)
from jobs.args import non_negative_float, positive_int, storage_options
from pipeline.tokens import TokenFiles

MODEL_DEFAULTS = {"width": 256, "depth": 4, "heads": 4, "dropout": 0.1, "class_dropout": 0.1}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretok train-generator", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="pretok output dataset (directory or fsspec URL)")
    p.add_argument("ckpt", help="run directory (directory or fsspec URL): commits every --save-every steps "
                   "and at the end")
    p.add_argument("--split", default="train")
    p.add_argument("--steps", type=positive_int, required=True, help="total optimizer steps")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per worker and micro-batch")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--data-streams", type=positive_int, default=None,
                   help="logical streams the data order is defined over: a multiple of --train-workers dividing the "
                   "global batch (default: gcd(64, global batch))")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    p.add_argument("--end-lr", type=float, default=1e-5)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: min(1000, steps / 10)")
    p.add_argument("--weight-decay", type=float, default=0.03)
    p.add_argument("--ema-decay", type=float, default=0.999,
                   help="EMA decay per step (warmed up; `sample` uses the EMA)")
    p.add_argument("--width", type=positive_int, default=None, help=f"default {MODEL_DEFAULTS['width']}, or CKPT's")
    p.add_argument("--depth", type=positive_int, default=None, help=f"default {MODEL_DEFAULTS['depth']}, or CKPT's")
    p.add_argument("--heads", type=positive_int, default=None, help=f"default {MODEL_DEFAULTS['heads']}, or CKPT's")
    p.add_argument("--dropout", type=float, default=None, help=f"default {MODEL_DEFAULTS['dropout']}, or CKPT's")
    p.add_argument("--class-dropout", type=float, default=None,
                   help=f"probability of the class-drop token (default {MODEL_DEFAULTS['class_dropout']}, or CKPT's)")
    p.add_argument("--max-tokens", type=int, default=None, help="train on the first k tokens (ordered tokenizers)")
    p.add_argument("--val-split", default=None, help="held-out split for validation")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="else hold out this fraction of the split's shards (at least one) for validation")
    p.add_argument("--val-every", type=int, default=None, help="validate every K steps (default: --save-every)")
    p.add_argument("--val-batches", type=positive_int, default=4, help="held-out global batches per validation")
    p.add_argument("--loader", choices=LOADERS, default="tokens",
                   help="tokens: StreamLoader (exact order, any worker count); ray-data: ray.data.read_parquet "
                   "(Ray Data's order, not reproducible)")
    p.add_argument("--loader-workers", "--workers", dest="loader_workers", type=int, default=2,
                   help="DataLoader processes per training worker (tokens loader)")
    p.add_argument("--buffer-shards", type=int, default=None, help="shards a stream shuffles together (default: all)")
    p.add_argument("--train-workers", type=positive_int, default=1, help="Ray Train workers (1: this process)")
    p.add_argument("--gpus-per-worker", type=non_negative_float, default=0.0, help="GPUs per Ray Train worker")
    p.add_argument("--cpus-per-worker", type=non_negative_float, default=0.5,
                   help="CPUs each Ray Train worker asks for")
    p.add_argument("--max-failures", type=int, default=3, help="worker-group restarts from the last commit")
    p.add_argument("--placement-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="fail when Ray cannot place the workers within this time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=positive_int, default=1000)
    p.add_argument("--keep-checkpoints", type=positive_int, default=2, help="step folders kept in CKPT")
    p.add_argument("--resume", action="store_true", help="continue the run in CKPT (else CKPT must hold none)")
    p.add_argument("--device", default=None, help="local run: default cuda when available, else cpu")
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


def model_config(args: argparse.Namespace, files: TokenFiles, num_tokens: int, saved: dict | None) -> GeneratorConfig:
    """From the flags; when resuming, CKPT's config, and a flag that contradicts it is an error."""
    given = {k: getattr(args, k) for k in MODEL_DEFAULTS if getattr(args, k) is not None}
    if saved is None:
        shape = {**MODEL_DEFAULTS, **given}
        return GeneratorConfig(codebook_size=files.codebook_size, num_tokens=num_tokens,
                               num_classes=_num_classes(files), width=shape["width"], depth=shape["depth"],
                               heads=shape["heads"], dropout=shape["dropout"], attn_dropout=shape["dropout"],
                               class_dropout=shape["class_dropout"])
    cfg = GeneratorConfig(**saved["generator"])
    differ = [f"--{k.replace('_', '-')} {v} (CKPT: {getattr(cfg, k)})"
              for k, v in given.items() if getattr(cfg, k) != v]
    if differ:
        raise ValueError(f"{args.ckpt} holds another model config: {', '.join(differ)}")
    if (cfg.codebook_size, cfg.num_tokens) != (files.codebook_size, num_tokens):
        raise ValueError(f"{args.ckpt} expects {cfg.num_tokens} tokens over {cfg.codebook_size} codes, the data "
                         f"gives {num_tokens} over {files.codebook_size} (check --max-tokens)")
    return cfg


def build_job(args: argparse.Namespace) -> tuple[TrainJob, RunDir, dict | None]:
    data = DataSpec(out=args.out, split=args.split, storage_options=args.storage_options, max_tokens=args.max_tokens,
                    buffer_shards=args.buffer_shards, loader=args.loader, val_split=args.val_split,
                    val_fraction=args.val_fraction)
    files, val = data.open()
    num_tokens = files.check_max_tokens(args.max_tokens)
    run = RunDir(args.ckpt, args.storage_options)
    latest = run.latest()
    if latest is not None and not args.resume:
        raise ValueError(f"{args.ckpt} holds a run at step {latest['step']}: pass --resume to continue it, "
                         "or choose another CKPT")
    saved = run.read_json(latest["dir"], CONFIG) if latest is not None else None
    global_batch = args.batch_size * args.grad_accum * args.train_workers
    streams = args.data_streams or (saved["train"]["data_streams"] if saved else math.gcd(64, global_batch))
    train = TrainConfig(
        steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, data_streams=streams,
        lr=args.lr, end_lr=args.end_lr,
        warmup_steps=args.warmup_steps if args.warmup_steps is not None else min(1000, args.steps // 10),
        weight_decay=args.weight_decay, ema_decay=args.ema_decay, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints,
        val_every=0 if val is None else (args.val_every or args.save_every), val_batches=args.val_batches,
        num_workers=args.loader_workers,
    )
    metadata = {"out": args.out, "split": args.split, "max_tokens": num_tokens, "tokenizer": files.tokenizer,
                "label_names": files.label_names,
                "val_shards": None if val is None else [PurePosixPath(f).name for f in val.files]}
    job = TrainJob(model=model_config(args, files, num_tokens, saved), train=train, data=data, ckpt=args.ckpt,
                   metadata=metadata, ckpt_options=args.storage_options, device=args.device,
                   progress=not args.no_progress)
    if saved is not None:
        problems = resume_problems(saved, run_config(job, args.train_workers))
        if problems:
            raise ValueError(f"{args.ckpt} is another run than this one: " + "; ".join(problems))
    check_data(job, args.train_workers)
    return job, run, latest


def main(argv: list[str] | None = None) -> int:
    from ray.exceptions import RayError

    args = build_parser().parse_args(argv)
    try:
        job, run, latest = build_job(args)
        if latest is not None:
            print(f"resuming {args.ckpt} at step {latest['step']}", file=sys.stderr)
        if args.train_workers == 1:
            fit(job)
        else:
            from generator.distributed import fit_distributed

            fit_distributed(job, args.train_workers, gpus_per_worker=args.gpus_per_worker,
                            cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                            placement_timeout_s=args.placement_timeout)
    except (ValueError, OSError, RuntimeError, RayError) as e:
        print(f"pretok train-generator: error: {e}", file=sys.stderr)
        return 2
    latest = run.latest()
    run.write_file(CURVES, plot_curves(run.metrics(upto=latest["step"])))
    print(f"saved {args.ckpt} at step {latest['step']} ({args.ckpt}/{latest['dir']}, {CURVES})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

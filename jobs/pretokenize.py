"""``pretok pretokenize`` / ``python -m jobs.pretokenize``: image shards in, token shards out."""
from __future__ import annotations

import argparse
import logging
import sys

from jobs.args import non_negative_float, positive_int, storage_options
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from tokenizer.transform import VIEWS

EPILOG = """examples:
  pretok pretokenize s3://bucket/imagenet/train out/imagenet-titok --tokenizer s3://bucket/ckpt/titok_l32
  pretok pretokenize ./images ./tokens --tokenizer ./titok_b64 --views flip --actors 2 --precision bf16

S3 endpoints and credentials come from the standard AWS environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...) or --storage-options; they are never written to logs or outputs.
A rerun resumes: finished shards are skipped, failed ones are redone. Exit status: 0 done,
1 some shards failed (rerun to retry them), 2 bad input or configuration.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretok pretokenize",
        description="Tokenize an image dataset (webdataset tars, Parquet, or an image folder; local or any "
        "fsspec URL) into Parquet token shards on a Ray cluster (RAY_ADDRESS, or a local one).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="input dataset URL or path (folder, file or glob)")
    p.add_argument("output", help="output dataset URL or path")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint dir/URL (config.json + weights)")
    p.add_argument("--format", default="auto", choices=["auto", "webdataset", "parquet", "imagefolder"])
    p.add_argument("--split", default="train", help="split name (default: train)")
    p.add_argument("--resolution", type=int, default=None, help="crop size (default: the tokenizer's image size)")
    p.add_argument("--views", default="center", choices=sorted(VIEWS), help="views per image (default: center)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder call (default: 64)")
    p.add_argument("--actors", type=positive_int, default=None,
                   help="encoder actors (default: one per GPU share; without GPUs one per 4 CPUs)")
    p.add_argument("--gpus-per-actor", type=non_negative_float, default=None,
                   help="GPUs per actor, fractional allowed; 0 = CPU (default: 1 if the cluster has GPUs, else 0)")
    p.add_argument("--cpus-per-actor", type=non_negative_float, default=None,
                   help="CPUs each actor asks for (default: the CPUs per GPU of the GPU nodes, the smallest "
                   "such share so an actor fits on every GPU node; the run logs the plan)")
    p.add_argument("--decode-workers", type=positive_int, default=None,
                   help="image decoders per actor (default: one per whole CPU of the actor)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="encoder precision (default: fp32)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed shard (default: 3)")
    p.add_argument("--images-per-shard", type=int, default=1000, help="image-folder shard size (default: 1000)")
    p.add_argument("--storage-options", type=storage_options, default=None, metavar="JSON",
                   help='fsspec options, e.g. \'{"endpoint_url": "http://minio:9000"}\'')
    p.add_argument("--token-count-mse", type=float, default=None, metavar="THRESHOLD",
                   help="ordered tokenizers (FlexTok) only: add an int32 column num_tokens_needed, the shortest id "
                   "prefix (of 1,2,4,...,N) whose decode has MSE < THRESHOLD on the [0,1] scale (view 0). Costs up to "
                   "ceil(log2(#candidates)) decodes per image (4 for N=256: about 320x the FLOPs of encoding with "
                   "FlexTok d18_d28 and the default steps/guidance, see bench/RESULTS.md); off by default")
    p.add_argument("--token-count-steps", type=int, default=20, help="Euler steps of those decodes (default: 20)")
    p.add_argument("--token-count-guidance", type=float, default=7.5,
                   help="guidance scale of those decodes, APG; 1 = none (default: 7.5)")
    p.add_argument("--token-count-seed", type=int, default=0, help="seed of the per-image decode noise (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an output made with another tokenizer/transform")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> PretokenizeConfig:
    return PretokenizeConfig(
        input=args.input, output=args.output, tokenizer=args.tokenizer, format=args.format, split=args.split,
        resolution=args.resolution, views=args.views, batch_size=args.batch_size, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        decode_workers=args.decode_workers, precision=args.precision,
        max_retries=args.max_retries, images_per_shard=args.images_per_shard,
        storage_options=args.storage_options, overwrite=args.overwrite, progress=not args.no_progress,
        token_count_mse=args.token_count_mse, token_count_steps=args.token_count_steps,
        token_count_guidance=args.token_count_guidance, token_count_seed=args.token_count_seed,
    )


def _log_to_stderr() -> None:
    """The driver's log (actor plan, warnings) on stderr, where `ray job logs` shows it."""
    log = logging.getLogger("pretok")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s pretok %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_to_stderr()
    try:
        summary = run_pretokenize(config_from_args(args))
    except (ValueError, OSError, RuntimeError) as e:
        print(f"pretok: error: {e}", file=sys.stderr)
        return 2
    print(summary.describe())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

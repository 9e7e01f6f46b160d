"""``pretok pretokenize`` / ``python -m jobs.pretokenize``: image shards in, token shards out."""
from __future__ import annotations

import argparse
import logging
import sys

from ray.exceptions import RayError

from jobs.args import non_negative_float, non_negative_int, positive_int, storage_options
from pipeline.distributor import PretokenizeConfig, run_pretokenize
from pipeline.dryrun import dry_run
from pipeline.qa import DEFAULT_QA_EVERY, DEFAULT_QA_MIN_PSNR
from pipeline.sources.webdataset import DEFAULT_MAX_MEMBER_BYTES
from tokenizer.sources import SOURCE_HELP
from tokenizer.transform import VIEWS

EPILOG = """examples:
  pretok pretokenize s3://bucket/imagenet/train out/imagenet-titok --tokenizer yucornetto/tokenizer_titok_l32_imagenet
  pretok pretokenize ./images ./tokens --tokenizer EPFL-VILAB/flextok_d18_d28_dfn@main --precision bf16
  pretok pretokenize ./images ./tokens --tokenizer s3://bucket/ckpt/titok_b64 --views flip --actors 2
  pretok pretokenize 's3://laion/{00000..41455}.tar' s3://bucket/laion-tokens --tokenizer ./titok_l32 \\
      --keep url,similarity,AESTHETIC_SCORE,original_width,original_height --allow-missing

--tokenizer takes a hub repo id (the driver resolves it once through the Hugging Face cache:
HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1, the token from HF_TOKEN or `hf auth login`, never logged),
an hf:// URL, a local folder, any fsspec URL, or a bare model.safetensors; the driver reads it once
and ships the bytes to every actor, so cluster nodes need no hub or storage access.

INPUT notation: several INPUTs add up; {00000..41455} is a zero-padded range, {a,b} a list (quote
them for the shell); @FILE (local or URL) holds one input per line. Shards named that way must exist
(--allow-missing records the missing ones in pretok.json instead). The shard list is sorted by URL.

S3 endpoints and credentials come from the standard AWS environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, ...) or --storage-options; they are never written to logs or outputs.
A rerun resumes: finished shards are skipped, failed ones are redone. One run per split at a time
(a lease in OUTPUT/_locks); runs of different splits into one OUTPUT may go together. Exit status:
0 done, 1 some shards failed or the run stopped (rerun to retry them), 2 bad input or configuration
(including actors that cannot be placed or started, and another run writing the same split).

Trial runs: --dry-run prints the plan and writes nothing (--estimate 256 adds a timed projection);
--limit-shards 10 tokenizes the first 10 shards, and the same command without it resumes from them.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretok pretokenize",
        description="Tokenize an image dataset (webdataset tars, Parquet, or an image folder; local or any "
        "fsspec URL) into Parquet token shards on a Ray cluster (RAY_ADDRESS, or a local one).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", nargs="+", metavar="INPUT",
                   help="input dataset URL or path: folder, file, glob, brace pattern or @list file; several add up")
    p.add_argument("output", help="output dataset URL or path")
    p.add_argument("--tokenizer", required=True, metavar="SRC", help=f"tokenizer checkpoint: {SOURCE_HELP}")
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
    p.add_argument("--decode-workers", type=non_negative_int, default=None,
                   help="decode processes per actor (default: one per whole CPU of the actor); 0 = decode on "
                   "threads inside the actor, one shard at a time (the older, slower path)")
    p.add_argument("--fast-decode", action="store_true",
                   help="let the JPEG decoder downscale large originals (>= 2x the resize target) in the DCT "
                   "domain: much faster on LAION-size images, tokens not exactly those of full-size decoding; "
                   "recorded in the output settings (a run without it is refused there)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="encoder precision (default: fp32)")
    p.add_argument("--max-retries", type=int, default=3, help="retries of a failed shard (default: 3)")
    p.add_argument("--keep", action="append", default=[], metavar="FIELD[,FIELD...]",
                   help="passthrough columns: webdataset .json sidecar fields (typed from the first shard's first "
                   "1000 samples; FIELD:TYPE with TYPE bool|int64|float64|string|json fixes a type) or Parquet source "
                   "columns (their own type). A name equal to one of ours (key, label, caption, width, height, ...) "
                   "becomes src_NAME. Values of another type are stored as null and counted in the shard stats")
    p.add_argument("--keep-all-json", action="store_true",
                   help="keep every field seen in the sampled .json sidecars (webdataset), as --keep does")
    p.add_argument("--allow-missing", action="store_true",
                   help="run without named input shards that do not exist, recording them in pretok.json "
                   "(default: fail before any work, naming them)")
    p.add_argument("--limit-shards", type=positive_int, default=None, metavar="N",
                   help="trial run: process only the first N shards of the sorted shard list, into the same "
                   "output names and manifest as a full run, which later resumes from them rewriting nothing")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and exit: shards total/done/pending (done ones from the output's ledger), "
                   "input bytes, the actor plan of the cluster (RAY_ADDRESS, or a local Ray as a run starts); "
                   "writes nothing, not even pretok.json or a lock")
    p.add_argument("--estimate", type=positive_int, default=None, metavar="K",
                   help="with --dry-run: time K images (read, decode, encode) in one task with an actor's "
                   "resources and project img/s and hours for the pending shards (their image counts "
                   "estimated from bytes)")
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace this split (its files and manifest entry; other splits stay). Refused when the "
                   "new tokenizer/transform differs from the other splits'")
    p.add_argument("--overwrite-all", action="store_true", help="replace every split of OUTPUT")
    p.add_argument("--verify", action="store_true",
                   help="before resuming, hash every done data file against its recorded sha256 (default: size/ETag)")
    p.add_argument("--lease-wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long for another run writing the same split (default: 0, fail at once)")
    p.add_argument("--placement-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="actors Ray cannot place within this time are dropped; none placed = error (default: 300)")
    p.add_argument("--max-actor-failures", type=int, default=2, metavar="K",
                   help="replace an actor after K shard failures in a row (default: 2)")
    p.add_argument("--max-start-failures", type=int, default=3, metavar="N",
                   help="stop after N actor start failures in a row (default: 3)")
    p.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES, metavar="BYTES",
                   help=f"skip (with a reason) tar members larger than this (default: {DEFAULT_MAX_MEMBER_BYTES})")
    p.add_argument("--qa-every", type=int, default=DEFAULT_QA_EVERY, metavar="K",
                   help="quality check: decode the tokens of every K-th image of each shard (its first view; "
                   "a shard's first image always) and record the PSNR against the input in the shard's stats; "
                   f"0 = off. Changes no token (default: {DEFAULT_QA_EVERY})")
    p.add_argument("--qa-min-psnr", type=float, default=DEFAULT_QA_MIN_PSNR, metavar="DB",
                   help="warn loudly when the mean QA PSNR is below this, naming the likely causes "
                   f"(default: {DEFAULT_QA_MIN_PSNR:g}; unrelated pixels score 8-13 dB, see pipeline.qa)")
    p.add_argument("--no-report", action="store_true", help="do not draw the run report (OUTPUT/report/*.png)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> PretokenizeConfig:
    return PretokenizeConfig(
        input=tuple(args.input), output=args.output, tokenizer=args.tokenizer, format=args.format, split=args.split,
        resolution=args.resolution, views=args.views, batch_size=args.batch_size, actors=args.actors,
        gpus_per_actor=args.gpus_per_actor, cpus_per_actor=args.cpus_per_actor,
        decode_workers=args.decode_workers, fast_decode=args.fast_decode, precision=args.precision,
        max_retries=args.max_retries, images_per_shard=args.images_per_shard, keep=tuple(args.keep),
        keep_all_json=args.keep_all_json, allow_missing=args.allow_missing, limit_shards=args.limit_shards,
        storage_options=args.storage_options, overwrite=args.overwrite, overwrite_all=args.overwrite_all,
        verify=args.verify, lease_wait_s=args.lease_wait, placement_timeout_s=args.placement_timeout,
        max_actor_failures=args.max_actor_failures, max_start_failures=args.max_start_failures,
        max_member_bytes=args.max_member_bytes, progress=not args.no_progress,
        token_count_mse=args.token_count_mse, token_count_steps=args.token_count_steps,
        token_count_guidance=args.token_count_guidance, token_count_seed=args.token_count_seed,
        qa_every=args.qa_every, qa_min_psnr=args.qa_min_psnr, report=not args.no_report,
    )


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is at each record, not as it was when the
    handler was made (so a later ``main`` call, under a replaced and then closed stderr, still logs)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _log_to_stderr() -> None:
    """The driver's log (actor plan, warnings) on stderr, where `ray job logs` shows it."""
    log = logging.getLogger("pretok")
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s pretok %(levelname)s: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.estimate is not None and not args.dry_run:
        parser.error("--estimate goes with --dry-run")
    _log_to_stderr()
    try:
        if args.dry_run:
            print(dry_run(config_from_args(args), args.estimate).describe())
            return 0
        summary = run_pretokenize(config_from_args(args))
    except (ValueError, OSError, RuntimeError, RayError) as e:
        print(f"pretok: error: {e}", file=sys.stderr)
        return 2
    print(summary.describe())
    if summary.aborted:
        print(f"pretok: error: {summary.aborted}", file=sys.stderr)
    return summary.exit_code


if __name__ == "__main__":
    raise SystemExit(main())

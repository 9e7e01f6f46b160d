"""Cost of the per-image token count (``pretok pretokenize --token-count-mse``) against plain encoding.

Measured, in one process on the same images, batches and threads: the tiny FlexTok reference
model (../shared/reference/flextok) on synthetic 64x64 images, per pipeline batch:
``encode_views`` (what every run does) and ``count_tokens`` on view 0 (what the option adds,
called by ``pipeline.encode.with_token_counts``), for three thresholds (quartiles of the errors at
the middle candidate, so the searches take different paths). Reported: decodes per image,
seconds per image (best of 3), ratio to encode.

Estimated: the released d18_d28 shapes (random weights, never allocated: built on the meta device
and run on fake tensors) at 256 px. FLOPs of one encode and of one decode (T Euler steps with
the guided batch doubled, plus the VAE decoder) are counted with torch's FlopCounterMode; a count
costs (decodes per image) x (decode FLOPs). Seconds use a 2048^3 fp32 matmul measured in the
same run as the attainable rate, as in bench/encoder.py, or ``--peak-tflops`` x ``--mfu``.

  python bench/flextok_counts.py [--images 24] [--batch 8] [--steps 20] [--guidance 7.5] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.decode import decode_record  # noqa: E402
from pipeline.encode import encode_views  # noqa: E402
from pipeline.records import DecodedImage  # noqa: E402
from pipeline.sources import iter_records, list_source  # noqa: E402
from pipeline.synthetic import write_synthetic  # noqa: E402
from tests.test_flextok import released_config  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402
from tokenizer.flextok import FlexTok  # noqa: E402
from tokenizer.flextok.counts import (  # noqa: E402
    TokenCountSettings, count_tokens, image_noise, noise_shape, reconstruction_mse,
)
from tokenizer.transform import ImageTransform  # noqa: E402

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "flextok"
RELEASED = "d18_d28"


@register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu)
def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The CPU flash-attention kernel has no formula in torch's counter; same count as the others."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def tiny_images(root: Path, n: int, tok) -> list[DecodedImage]:
    write_synthetic(str(root / "in"), "webdataset", num_shards=1, images_per_shard=n, image_size=(64, 64), seed=0)
    transform = ImageTransform(tok.image_size, "center")
    (shard,) = list_source(str(root / "in")).shards
    return [decode_record(r, transform) for r in iter_records(shard)]


def best_of(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def thresholds(tok, images: list[DecodedImage], tokens: np.ndarray, settings: TokenCountSettings) -> list[float]:
    """Quartiles of the per-image MSE at the middle candidate (untimed)."""
    views = torch.from_numpy(np.stack([d.views[0] for d in images])).float() / 255
    k = settings.candidates[len(settings.candidates) // 2]
    noise = image_noise([d.key for d in images], settings.seed, noise_shape(tok, tok.image_size))
    err = reconstruction_mse(tok, views, torch.from_numpy(tokens[:, 0, :k].astype(np.int64)), noise, settings)
    return [float(q) for q in np.quantile(err.numpy(), [0.25, 0.5, 0.75])]


def measure_tiny(args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="flextok-counts-"))
    try:
        ckpt = tmp / "ckpt"
        ckpt.mkdir()
        shutil.copy(REF / "tiny_flextok.config.json", ckpt / "config.json")
        shutil.copy(REF / "tiny_flextok.safetensors", ckpt / "model.safetensors")
        tok = load_tokenizer(str(ckpt))
        images = tiny_images(tmp, args.images, tok)
    finally:
        shutil.rmtree(tmp)
    batches = [images[i : i + args.batch] for i in range(0, len(images), args.batch)]
    tokens = [encode_views(tok, b, "fp32") for b in batches]

    def encode_s() -> float:  # re-measured next to each count, so load drift on a shared machine cancels
        return best_of(lambda: [encode_views(tok, b, "fp32") for b in batches], 3) / len(images)

    base = TokenCountSettings.for_num_tokens(tok.num_tokens, 1.0, timesteps=args.steps, guidance_scale=args.guidance)
    views = [torch.from_numpy(np.stack([d.views[0] for d in b])).float() / 255 for b in batches]
    ids = [torch.from_numpy(tk[:, 0].astype(np.int64)) for tk in tokens]
    keys = [[d.key for d in b] for b in batches]
    runs = []
    for thr in thresholds(tok, images, np.concatenate(tokens), base):
        s = TokenCountSettings.for_num_tokens(tok.num_tokens, thr, timesteps=args.steps, guidance_scale=args.guidance)
        results, enc_s = [], encode_s()
        count_s = best_of(lambda: results.append([count_tokens(tok, *a, s) for a in zip(views, ids, keys)]), 3)
        counts = np.concatenate([r.counts for r in results[-1]])
        decodes = np.concatenate([r.decodes for r in results[-1]])
        runs.append({"threshold": thr, "encode_s": enc_s, "count_s": count_s / len(images),
                     "ratio": count_s / len(images) / enc_s,
                     "decodes": float(decodes.mean()), "mean_count": float(counts.mean()),
                     "distinct_counts": sorted(set(counts.tolist()))})
    one_decode_s = best_of(lambda: reconstruction_mse(
        tok, torch.rand(len(images), 3, tok.image_size, tok.image_size), torch.zeros(len(images), tok.num_tokens, dtype=torch.long),
        torch.randn(len(images), *noise_shape(tok, tok.image_size)), base), 2) / len(images)
    return {"encode_s": encode_s(), "decode_s": one_decode_s, "candidates": list(base.candidates),
            "max_decodes": base.max_decodes, "runs": runs, "flops": flops(tok, args.steps, args.guidance)}


def flops(model: FlexTok, steps: int, guidance: float) -> dict:
    """FLOPs of one image: encode, one guided decoder step, VAE decode, one decode of ``steps`` steps."""
    size = model.image_size
    with FlopCounterMode(display=False) as enc:
        model.encode(torch.rand(1, 3, size, size))
    ids = torch.zeros(1, model.num_tokens, dtype=torch.long)
    with FlopCounterMode(display=False) as step:
        latent = model.sample(ids, timesteps=1, guidance_scale=guidance, noise=torch.randn(1, *noise_shape(model, size))).latent
    with FlopCounterMode(display=False) as vae:
        model.decode_latent(latent)
    settings = TokenCountSettings.for_num_tokens(model.num_tokens, 1.0)
    return {"encode": enc.get_total_flops(), "step": step.get_total_flops(), "vae_decode": vae.get_total_flops(),
            "decode": steps * step.get_total_flops() + vae.get_total_flops(), "candidates": list(settings.candidates),
            "max_decodes": settings.max_decodes}


def released_flops(steps: int, guidance: float) -> dict:
    layout = json.loads((REF / "keys" / f"flextok_{RELEASED}.keys.json").read_text())
    with torch.device("meta"):
        model = FlexTok.from_config(released_config(layout))
    with FakeTensorMode(allow_non_fake_inputs=True):
        return flops(model.to_empty(device="cpu").eval().requires_grad_(False), steps, guidance)


def matmul_rate() -> float:
    a = torch.randn(2048, 2048)
    return 2 * 2048**3 / best_of(lambda: a @ a, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="Euler steps per decode (pipeline default 20)")
    ap.add_argument("--guidance", type=float, default=7.5, help="guidance scale (pipeline default 7.5, APG)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadier on a shared machine)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the released-size estimate")
    ap.add_argument("--mfu", type=float, default=0.4, help="utilisation assumed with --peak-tflops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tiny = measure_tiny(args)
    big = released_flops(args.steps, args.guidance)
    rate = args.peak_tflops * 1e12 * args.mfu if args.peak_tflops else matmul_rate()
    print(f"# flextok token-count bench {date.today()} on {platform.processor() or platform.machine()} "
          f"x{args.threads} threads, torch {torch.__version__}; {args.steps} steps, guidance {args.guidance} (APG)")
    print(f"## tiny fixture: {args.images} images 64 px, batch {args.batch}, candidates {tiny['candidates']}")
    print(f"encode {tiny['encode_s'] * 1e3:.2f} ms/img; one decode {tiny['decode_s'] * 1e3:.2f} ms/img "
          f"({tiny['decode_s'] / tiny['encode_s']:.1f}x encode); at most {tiny['max_decodes']} decodes/img")
    f = tiny["flops"]
    print(f"FLOPs: encode {f['encode'] / 1e6:.1f} M, one decode {f['decode'] / 1e6:.1f} M "
          f"({f['decode'] / f['encode']:.1f}x encode)")
    print("| threshold MSE | counts seen | mean count | decodes/img | encode ms/img | count ms/img | count / encode "
          "| FLOPs: decodes x decode / encode |")
    print("|---|---|---|---|---|---|---|---|")
    for r in tiny["runs"]:
        print(f"| {r['threshold']:.4f} | {r['distinct_counts']} | {r['mean_count']:.1f} | {r['decodes']:.2f} "
              f"| {r['encode_s'] * 1e3:.2f} | {r['count_s'] * 1e3:.1f} | {r['ratio']:.1f}x "
              f"| {r['decodes'] * f['decode'] / f['encode']:.1f}x |")
    print(f"## released {RELEASED} at 256 px (FLOPs), candidates {big['candidates']}, "
          f"at most {big['max_decodes']} decodes/img; rate {rate / 1e12:.3f} TFLOP/s "
          f"({'peak x mfu' if args.peak_tflops else 'measured fp32 matmul'})")
    print("| item | GFLOP/img | seconds/img at that rate | x encode |")
    print("|---|---|---|---|")
    step = "decoder step" + (" (guided: 2 passes)" if args.guidance != 1 else "")
    for name, flops in (("encode", big["encode"]), (step, big["step"]),
                        ("VAE decode", big["vae_decode"]), (f"one decode ({args.steps} steps + VAE)", big["decode"]),
                        (f"token count, {big['max_decodes']} decodes", big["max_decodes"] * big["decode"])):
        print(f"| {name} | {flops / 1e9:,.0f} | {flops / rate:,.3g} | {flops / big['encode']:,.1f} |")
    print("# json", json.dumps({"tiny": tiny, "released": big, "rate": rate}))


if __name__ == "__main__":
    main()

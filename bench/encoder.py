"""Encoder throughput of the released TiTok sizes (random weights), fast path vs eager reference.

For each of s128 / b64 / l32 it measures, in one run on the same batch:
  eager   float32 input, step-by-step softmax attention (the reference loop)
  fp32    uint8 input moved to the device then /255, fused SDPA attention (the pipeline path)
  bf16    the same under bf16 autocast (nearest-code search stays float32)
and prints img/s, speed-up over eager, achieved FLOP/s and MFU. MFU is against --peak-tflops when
given (e.g. the GPU's dense bf16 peak), else against a large matmul measured in the same run.
It also reports bf16-vs-fp32 token agreement on random images and on the reference fixtures.

  python bench/encoder.py [--device cuda] [--batch 32] [--iters 5] [--models s128,b64,l32]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tokenizer import build_tokenizer  # noqa: E402
from tokenizer.vit import set_fused_attention  # noqa: E402

KEYS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "titok" / "keys"
CONFIGS = {
    name: {
        "model": {"vq_model": {
            "codebook_size": 4096, "token_size": 12, "use_l2_norm": True, "vit_enc_model_size": size,
            "vit_dec_model_size": size, "vit_enc_patch_size": 16, "vit_dec_patch_size": 16,
            "num_latent_tokens": n, "finetune_decoder": True}},
        "dataset": {"preprocessing": {"crop_size": 256}},
    }
    for name, size, n in (("s128", "small", 128), ("b64", "base", 64), ("l32", "large", 32))
}


def encoder_flops(tok) -> float:
    """Multiply-adds x2 of one image through the encoder and the nearest-code search."""
    enc, cfg = tok.encoder, tok.cfg
    w, p, n = cfg.encoder.width, cfg.enc_patch_size, cfg.num_latent_tokens
    g2 = enc.grid**2
    seq = 1 + g2 + n
    mlp = int(w * cfg.encoder.mlp_ratio)
    per_layer = 2 * seq * w * (3 * w + w + 2 * mlp) + 2 * 2 * seq * seq * w
    return 2 * g2 * 3 * p * p * w + cfg.encoder.num_layers * per_layer + 2 * n * w * cfg.token_size + 2 * n * cfg.token_size * cfg.codebook_size


def timed(fn, iters: int, device: str) -> float:
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: a @ a, 3, device)
    return 2 * n**3 / s


def fixture_agreement() -> str:
    ref = KEYS.parent
    if not ref.exists():
        return "fixtures not found"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from safetensors.torch import load_file

    from tests.titok_fixtures import TITOK_VARIANTS, titok_config

    out = []
    for v in TITOK_VARIANTS:
        tok = build_tokenizer(titok_config(v)).eval()
        tok.load_state_dict(load_file(str(ref / f"{v}.safetensors")))
        u8 = (load_file(str(ref / f"{v}.io.safetensors"))["image"] * 255).round().to(torch.uint8)
        a, b = tok.encode_uint8(u8), tok.encode_uint8(u8, "bf16")
        out.append(f"{v} {(a == b).float().mean().item():.3f}")
    return ", ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 64 on GPU, 4 on CPU")
    ap.add_argument("--iters", type=int, default=None, help="default: 20 on GPU, 2 on CPU")
    ap.add_argument("--models", default="s128,b64,l32")
    ap.add_argument("--peak-tflops", type=float, default=None, help="nominal device peak for MFU")
    args = ap.parse_args()
    dev = args.device
    batch = args.batch or (64 if dev == "cuda" else 4)
    iters = args.iters or (20 if dev == "cuda" else 2)
    torch.manual_seed(0)
    peak = {
        "fp32": args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(dev, torch.float32),
        "bf16": args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak(dev, torch.bfloat16),
    }
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"
    print(f"# encoder bench {date.today()} on {name}, torch {torch.__version__}, batch {batch}, iters {iters}")
    print(f"# peak used for MFU: fp32 {peak['fp32'] / 1e12:.2f} TFLOP/s, bf16 {peak['bf16'] / 1e12:.2f} TFLOP/s"
          f" ({'nominal' if args.peak_tflops else 'measured matmul'})")
    print("| model | GFLOP/img | eager fp32 img/s | fp32 img/s (x eager) | bf16 img/s (x eager) | MFU fp32 | MFU bf16 | bf16==fp32 tokens |")
    print("|---|---|---|---|---|---|---|---|")
    rows = {}
    for m in args.models.split(","):
        tok = build_tokenizer(CONFIGS[m], parts="encoder").to(dev).eval()
        u8 = torch.randint(0, 256, (batch, 3, 256, 256), dtype=torch.uint8)
        x = u8.to(dev).float() / 255
        flops = encoder_flops(tok)

        def eager():
            set_fused_attention(tok, False)
            with torch.inference_mode():
                tok.encode(x)
            set_fused_attention(tok, True)

        t_eager = timed(eager, iters, dev)
        t32 = timed(lambda: tok.encode_uint8(u8, "fp32"), iters, dev)
        t16 = timed(lambda: tok.encode_uint8(u8, "bf16"), iters, dev)
        agree = (tok.encode_uint8(u8, "fp32") == tok.encode_uint8(u8, "bf16")).float().mean().item()
        ips = {k: batch / t for k, t in (("eager", t_eager), ("fp32", t32), ("bf16", t16))}
        rows[m] = ips
        print(f"| {m} | {flops / 1e9:.1f} | {ips['eager']:.2f} | {ips['fp32']:.2f} ({ips['fp32'] / ips['eager']:.2f}x) | "
              f"{ips['bf16']:.2f} ({ips['bf16'] / ips['eager']:.2f}x) | {ips['fp32'] * flops / peak['fp32']:.1%} | "
              f"{ips['bf16'] * flops / peak['bf16']:.1%} | {agree:.3f} |")
    print(f"# bf16-vs-fp32 token agreement on the reference fixtures: {fixture_agreement()}")
    print("# json", json.dumps(rows))


if __name__ == "__main__":
    main()

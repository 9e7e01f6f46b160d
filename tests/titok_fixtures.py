"""Reference TiTok fixtures from ../shared/reference/titok as loadable checkpoint dirs."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"
TITOK_REF = REFERENCE / "titok"
TITOK_VARIANTS = ("tiny_vq_single_stage", "tiny_vq_two_stage")


def titok_config(variant: str) -> dict:
    """The fixture's official config with its ``_reference_harness`` mapped onto pretok's
    config extensions (model_sizes, pixel_decoder, pixel_codebook)."""
    cfg = json.loads((TITOK_REF / f"{variant}.config.json").read_text())
    harness = cfg.pop("_reference_harness")
    vq = cfg["model"]["vq_model"]
    vq["model_sizes"] = harness["tiny_model_sizes"]
    if harness.get("pixel_decoder_conf"):
        vq["pixel_decoder"] = harness["pixel_decoder_conf"]
        vq["pixel_codebook"] = harness["pixel_quantizer"]
    return cfg


def write_titok_checkpoint(variant: str, dest: Path) -> Path:
    """config.json + model.safetensors for ``variant`` under ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(titok_config(variant)))
    shutil.copy(TITOK_REF / f"{variant}.safetensors", dest / "model.safetensors")
    return dest

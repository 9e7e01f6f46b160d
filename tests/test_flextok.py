"""FlexTok against the official reference vectors (../shared/reference/flextok).

Everything that depends on the fixture set (runs, prefix sizes, steps, seeds, sizes) is read from
its ``_reference_harness`` block, so the same tests apply to another set with the same layout.
Tolerances follow the reference README: ids exact, encoder floats 5e-5, decoder 1e-4, images 2e-4.
"""
from __future__ import annotations

import copy
import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tokenizer import CheckpointError, load_tokenizer
from tokenizer.flextok import FlexTok, FlexTokConfig
from tokenizer.flextok.layers import sincos_posemb_2d

pytestmark = pytest.mark.usefixtures("single_thread")

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "flextok"
STEM = "tiny_flextok"
CONFIG = json.loads((REF / f"{STEM}.config.json").read_text())
HARNESS = CONFIG["_reference_harness"]
RUNS = HARNESS["info"]["runs"]  # "dec.<run>" -> guidance_scale, perform_norm_guidance, keep_k, timesteps
KEEP_KS = HARNESS["keep_ks"]
LAYOUTS = sorted((REF / "keys").glob("*.keys.json"))
ENC_ATOL, DEC_ATOL, IMG_ATOL = 5e-5, 1e-4, 2e-4

# io key -> EncodeOutput field
ENCODER_TENSORS = {
    "enc.vae_latent": "vae_latent",
    "enc.patch_tokens_in": "patch_tokens_in",
    "enc.patch_outputs": "patch_outputs",
    "enc.register_outputs": "register_outputs",
    "enc.prequant": "prequant",
    "enc.quants": "quants",
}

# Each mistake of tiny_flextok.pitfalls.json -> the tests asserting an intermediate it breaks
# (by the measured effects there: any id change, prequant > 5e-5, decoder > 1e-4).
PITFALL_TESTS = {
    "attention scale": ("test_token_ids_exact", "test_encoder_intermediates", "test_decoder_run"),
    "QK-norm as RMSNorm": ("test_token_ids_exact", "test_encoder_intermediates", "test_decoder_run"),
    "QK-norm omitted": ("test_token_ids_exact", "test_encoder_intermediates", "test_decoder_run"),
    "eps 1e-6 instead of 1e-5": ("test_encoder_intermediates",),
    "adaLN chunks interpreted in DiT order": ("test_decoder_run",),
    "adaLN per-subsequence halves swapped": ("test_decoder_run",),
    "final layer adaLN shift/scale swapped": ("test_decoder_run",),
    "patchify order": ("test_encoder_intermediates", "test_decoder_step0_inputs"),
    "sincos posemb transposed": ("test_sincos_tables", "test_encoder_intermediates", "test_decoder_step0_inputs"),
    "timestep embedding [sin,cos]": ("test_decoder_step0_inputs", "test_decoder_run"),
    "timestep embedding max_period": ("test_decoder_step0_inputs", "test_decoder_run"),
    "timestep embedding without the x1000": ("test_decoder_step0_inputs", "test_decoder_run"),
    "register posemb added after nested dropout": ("test_decoder_step0_inputs", "test_decoder_run"),
    "encoder mask 'full'": ("test_token_ids_exact", "test_encoder_intermediates", "test_prefix_encoding"),
    "encoder mask 'causal'": ("test_token_ids_exact", "test_encoder_intermediates"),
    "VAE scaling_factor ignored": ("test_encoder_intermediates", "test_decoder_run"),
    "activation GELU instead of SiLU": ("test_token_ids_exact", "test_encoder_intermediates", "test_decoder_run"),
}

def close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0.0)


def write_checkpoint(dest: Path, config: dict, state_dict: dict[str, torch.Tensor]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(config))
    save_file(state_dict, str(dest / "model.safetensors"))
    return dest



@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("flextok")
    (dest / "config.json").write_text(json.dumps(CONFIG))
    shutil.copy(REF / f"{STEM}.safetensors", dest / "model.safetensors")
    return dest


@pytest.fixture(scope="module")
def tok(ckpt_dir) -> FlexTok:
    return load_tokenizer(str(ckpt_dir))


@pytest.fixture(scope="module")
def io() -> dict[str, torch.Tensor]:
    return load_file(str(REF / f"{STEM}.io.safetensors"))


@pytest.fixture(scope="module")
def encoded(tok, io):
    with torch.no_grad():
        return tok.encode_features(io["input.image"])


@pytest.fixture(scope="module")
def traces(tok, io):
    """Rectified-flow traces of every reference run, computed on first use."""
    cache = {}

    def get(run: str):
        if run not in cache:
            info = RUNS[run]
            cache[run] = tok.sample(
                io["enc.token_ids"][:, : info["keep_k"]],
                timesteps=info["timesteps"],
                guidance_scale=info["guidance_scale"],
                perform_norm_guidance=info["perform_norm_guidance"],
                generator=torch.Generator().manual_seed(HARNESS["noise_seed"]),
                image_size=HARNESS["latent_hw"] * tok.cfg.vae.downsample_factor,
            )
        return cache[run]

    return get


# ----------------------------------------------------------------------------- loading


def test_loaded_through_load_tokenizer(tok):
    dims = HARNESS["tiny_dims"]
    assert isinstance(tok, FlexTok) and tok.family == "flextok" and tok.ordered
    codebook = math.prod(CONFIG["regularizer"]["levels"])
    assert (tok.num_tokens, tok.codebook_size, tok.image_size) == (dims["n_reg"], codebook, HARNESS["image_size"])
    assert tok.has_decoder and not tok.training and tok.fingerprint
    assert sum(p.numel() for p in tok.parameters()) == HARNESS["num_params"]


def test_encoder_only_load_skips_decoder_weights(ckpt_dir, tok, io):
    enc = load_tokenizer(str(ckpt_dir), parts="encoder")
    full_keys = set(load_file(str(ckpt_dir / "model.safetensors")))
    kept = {k for k in full_keys if not k.startswith(FlexTok.decoder_prefixes)}
    assert set(enc.state_dict()) == kept and len(kept) < len(full_keys)
    assert not enc.has_decoder and not hasattr(enc, "decoder") and not hasattr(enc.vae.vae, "decoder")
    assert torch.equal(enc.encode(io["input.image_uint8"].float() / 255), io["enc.token_ids"])
    with pytest.raises(RuntimeError, match="encoder-only"):
        enc.decode_tokens(io["enc.token_ids"])


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_checkpoint_mismatch_fails_clearly(tmp_path, defect):
    sd = load_file(str(REF / f"{STEM}.safetensors"))
    key = "decoder.module_dict.dec_latent_dropout.nullcond"
    if defect == "missing":
        del sd[key]
    elif defect == "unexpected":
        sd["decoder.module_dict.dec_repa_head.weight"] = torch.zeros(2)
    else:
        sd[key] = torch.zeros(3)
    expected = {"missing": f"missing keys: {key}", "unexpected": "unexpected keys: decoder.module_dict.dec_repa_head",
                "shape": f"wrong shapes: {key}"}[defect]
    with pytest.raises(CheckpointError, match=re.escape(expected)):
        load_tokenizer(str(write_checkpoint(tmp_path, CONFIG, sd)))


def test_vae_architecture_sources(tok):
    """hf_hub_path null: the official base VAE with the node's latent channels; an inline vae_config
    overrides it; hf_hub_path set but its config absent: refused, naming the repo and the download."""
    cfg = copy.deepcopy(CONFIG)
    harness = cfg.pop("_reference_harness")
    base = FlexTokConfig.from_dict(cfg)
    assert (base.vae.block_out_channels, base.vae.layers_per_block, base.vae.norm_num_groups) == ((128, 256, 512, 512), 2, 32)
    assert base.vae.latent_channels == CONFIG["vae"]["latent_channels"] and base.vae.downsample_factor == 8
    assert base.vae_scaling_factor == CONFIG["vae"]["scaling_factor"]
    cfg["vae_config"] = harness["vae_base_cfg_override"]
    model = FlexTok.from_config(cfg)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in tok.state_dict().items()}
    assert model.vae.scaling_factor == CONFIG["vae"]["scaling_factor"]
    del cfg["vae_config"]
    cfg["vae"]["scaling_factor"] = None  # neither the node nor the official base config has one
    with pytest.raises(CheckpointError, match="no VAE scaling factor"):
        FlexTokConfig.from_dict(cfg)
    cfg["vae"]["hf_hub_path"] = "EPFL-VILAB/flextok_vae_c16"
    with pytest.raises(CheckpointError, match=r"EPFL-VILAB/flextok_vae_c16 .*`hf download EPFL-VILAB/flextok_vae_c16 config.json`"):
        FlexTokConfig.from_dict(cfg)


@pytest.mark.parametrize("path, value, message", [
    (("encoder", "module_dict", "enc_seq_packer", "mask_mode"), "full", "causal_last"),
    (("decoder", "module_dict", "dec_transformer", "adaLN_expansion"), 1, "adaLN_expansion"),
    (("decoder", "module_dict", "dec_to_patches", "use_mup_readout"), True, "use_mup_readout"),
    (("decoder", "module_dict", "dec_nested_dropout", "_target_"), "x.TruncatedNestedDropout", "dec_nested_dropout"),
])
def test_unsupported_config_is_refused(path, value, message):
    cfg = copy.deepcopy(CONFIG)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(CheckpointError, match=message):
        FlexTok.from_config(cfg)


def released_config(layout: dict, adaln_expansion: int = 2) -> dict:
    """The tiny config with a released layout's dims (the structure the key JSONs were made with)."""
    dims = layout["dims"]
    cfg = copy.deepcopy(CONFIG)
    del cfg["_reference_harness"]  # hf_hub_path null: the official base VAE (f8, 128..512 channels)
    for section, prefix in (("encoder", "encoder"), ("decoder", "decoder")):
        for node in cfg[section]["module_dict"].values():
            if "dim" in node:
                node["dim"] = dims[f"{prefix}_dim"]
    enc, dec = cfg["encoder"]["module_dict"], cfg["decoder"]["module_dict"]
    for node, prefix in ((enc["enc_transformer"], "encoder"), (dec["dec_transformer"], "decoder")):
        node.update(depth=dims[f"{prefix}_depth"], head_dim=dims["head_dim"])
    enc["enc_posemb_module"]["max_sizes"] = dec["dec_patches_posemb_module"]["max_sizes"] = dims["posemb_max_sizes"]
    enc["enc_register_module"].update(n_min=dims["registers"], n_max=dims["registers"])
    dec["dec_registers_posemb_module"]["max_sizes"] = [dims["registers"]]
    cfg["regularizer"]["levels"] = dims["fsq_levels"]
    dec["dec_transformer"]["adaLN_expansion"] = adaln_expansion
    dec["dec_seq_packer"]["per_subseq_embs"] = adaln_expansion == 2
    return cfg


@pytest.mark.parametrize("layout_path", LAYOUTS, ids=lambda p: p.name.split(".")[0])
def test_released_layout_on_meta_device(layout_path):
    layout = json.loads(layout_path.read_text())
    with torch.device("meta"):
        model = FlexTok.from_config(released_config(layout))
        alt = FlexTok.from_config(released_config(layout, adaln_expansion=1))
        enc_only = FlexTok.from_config(released_config(layout), parts="encoder")
    got = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert got == [(k["key"], k["shape"], k["dtype"]) for k in layout["keys"]]
    assert sum(v.numel() for v in model.state_dict().values()) == layout["num_elements_total"]
    assert (model.num_tokens, model.codebook_size, model.image_size) == (256, 64000, 256)
    alt_shapes = {k: list(v.shape) for k, v in alt.state_dict().items()}
    changed = layout["alternative_adaLN_expansion_1"]
    assert {k: alt_shapes[k] for k in changed["changed_shapes"]} == changed["changed_shapes"]
    assert sum(v.numel() for v in alt.state_dict().values()) == changed["num_elements_total"]
    assert list(enc_only.state_dict()) == [
        k["key"] for k in layout["keys"] if not k["key"].startswith(FlexTok.decoder_prefixes)
    ]


# ----------------------------------------------------------------------------- encoder


def test_token_ids_exact(tok, io, encoded):
    assert encoded.token_ids.dtype == torch.int64
    assert torch.equal(encoded.token_ids, io["enc.token_ids"])
    assert torch.equal(tok.encode(io["input.image_uint8"].float() / 255), io["enc.token_ids"])
    ids16 = tok.encode_uint8(io["input.image_uint8"])
    assert ids16.dtype == torch.uint16 and torch.equal(ids16.long(), io["enc.token_ids"])


@pytest.mark.parametrize("name", list(ENCODER_TENSORS) + ["enc.fsq_bounded"])
def test_encoder_intermediates(tok, io, encoded, name):
    if name == "enc.fsq_bounded":
        actual = tok.regularizer.bound(encoded.prequant)
    else:
        actual = getattr(encoded, ENCODER_TENSORS[name])
    close(actual, io[name], ENC_ATOL)


def test_fsq_ids_and_codes_are_inverse(tok, io):
    close(tok.regularizer.codes_from_ids(io["enc.token_ids"]), io["enc.quants"], 0.0)
    every = torch.arange(tok.codebook_size)
    codes = tok.regularizer.codes_from_ids(every)
    assert codes.abs().max() <= 1.0
    assert torch.equal(tok.regularizer.ids_from_codes(codes), every)


@pytest.mark.parametrize("k", KEEP_KS)
def test_prefix_encoding(tok, io, encoded, k):
    with torch.no_grad():
        prefix = tok.encode_features(io["input.image"], num_tokens=k)
    assert torch.equal(prefix.token_ids, io[f"enc.prefix_k{k}.token_ids"])
    assert torch.equal(prefix.token_ids, encoded.token_ids[:, :k])
    assert torch.equal(tok.encode(io["input.image_uint8"].float() / 255, num_tokens=k), encoded.token_ids[:, :k])
    close(prefix.prequant, io[f"enc.prefix_k{k}.prequant"], ENC_ATOL)
    close(prefix.prequant, encoded.prequant[:, :k], ENC_ATOL)


def test_sincos_tables(tok):
    sd = tok.state_dict()
    for key in ("encoder.module_dict.enc_posemb_module", "decoder.module_dict.dec_patches_posemb_module"):
        table = sd[f"{key}.posembs"]
        close(sincos_posemb_2d(table.shape[2], table.shape[3], table.shape[1]), table, 1e-6)


def test_encode_under_bf16_autocast(tok, io):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tok.encode_features(io["input.image"])
        codes, ids = tok.regularizer(out.prequant.bfloat16())
    assert out.vae_latent.dtype == torch.float32          # the VAE runs in its own dtype (fp32)
    assert codes.dtype == torch.float32 and ids.dtype == torch.int64
    assert out.token_ids.shape == io["enc.token_ids"].shape
    assert 0 <= out.token_ids.min() and out.token_ids.max() < tok.codebook_size
    ids16 = tok.encode_uint8(io["input.image_uint8"], precision="bf16")
    assert ids16.dtype == torch.uint16 and ids16.shape == io["enc.token_ids"].shape


def test_bad_inputs_are_refused(tok, io):
    with pytest.raises(ValueError, match="multiples"):
        tok.encode(torch.rand(1, 3, 60, 64))
    with pytest.raises(ValueError, match="number of tokens"):
        tok.encode(io["input.image"][:1], num_tokens=tok.num_tokens + 1)
    for k in (0, tok.num_tokens + 1):
        with pytest.raises(ValueError, match="number of tokens"):
            tok.sample(torch.zeros(1, k, dtype=torch.long), timesteps=1)


# ----------------------------------------------------------------------------- decoder


def test_initial_noise(tok, io, traces):
    gen = torch.Generator().manual_seed(HARNESS["noise_seed"])
    shape = (1, *io["dec.initial_noise"].shape[1:])
    drawn = torch.cat([torch.randn(shape, generator=gen) for _ in range(io["dec.initial_noise"].shape[0])])
    assert torch.equal(drawn, io["dec.initial_noise"])
    for run in RUNS:
        assert torch.equal(traces(run).x_t[0], io["dec.initial_noise"])


@pytest.mark.parametrize("run", list(RUNS))
def test_decoder_run(tok, io, traces, run):
    info, trace = RUNS[run], traces(run)
    steps = info["timesteps"]
    assert torch.equal(trace.timesteps, io[f"{run}.timesteps"])
    close(trace.x_t, io[f"{run}.x_t"], DEC_ATOL)
    close(trace.v_cond, io[f"{run}.v_cond"], DEC_ATOL)
    if info["guidance_scale"] != 1.0:
        close(trace.v_uncond, io[f"{run}.v_uncond"], DEC_ATOL)
        close(trace.velocity[0], io[f"{run}.v_guided_step0"], DEC_ATOL)
    else:
        assert trace.v_uncond is None and f"{run}.v_uncond" not in io
        assert torch.equal(trace.velocity, trace.v_cond)
    close(trace.x_t[1:], trace.x_t[:-1] - trace.velocity[:-1] / steps, 1e-6)
    close(trace.latent, io[f"{run}.latent_out"], DEC_ATOL)
    with torch.no_grad():
        close(tok.decode_latent(trace.latent), io[f"{run}.image_out"], IMG_ATOL)


def test_decode_tokens_matches_reference_image(tok, io):
    run = next(r for r, info in RUNS.items() if info["perform_norm_guidance"])
    info = RUNS[run]
    images = tok.decode_tokens(
        io["enc.token_ids"][:, : info["keep_k"]], timesteps=info["timesteps"],
        guidance_scale=info["guidance_scale"], perform_norm_guidance=True,
        generator=torch.Generator().manual_seed(HARNESS["noise_seed"]), image_size=HARNESS["image_size"],
    )
    close(images, io[f"{run}.image_out"] * 0.5 + 0.5, IMG_ATOL)


with safe_open(str(REF / f"{STEM}.io.safetensors"), "pt") as _io_file:
    STEP0_KEYS = sorted(k for k in _io_file.keys() if ".step0." in k)


@pytest.mark.parametrize("key", STEP0_KEYS)
def test_decoder_step0_inputs(tok, io, key):
    run, what = key.split(".step0.")
    info = RUNS[run]
    k, n = info["keep_k"], tok.num_tokens
    dec = tok.decoder
    with torch.no_grad():
        quants = tok.regularizer.codes_from_ids(F.pad(io["enc.token_ids"][:, :k], (0, n - k)))
        registers = dec.embed_registers(quants, keep_k=k)
        actual = {
            "registers_in": lambda: registers,
            "uncond_registers_in": lambda: dec.null_registers(registers),
            "patches_in": lambda: dec.embed_patches(io["dec.initial_noise"]),
            "temb": lambda: dec.time_embedding(io[f"{run}.timesteps"][0]),
        }[what]()
    close(actual, io[key], DEC_ATOL)
    if what == "registers_in":
        mask_token = dec.module_dict["dec_nested_dropout"].dropout_mask_token
        assert torch.equal(registers[:, k:], mask_token.expand_as(registers[:, k:]))


def test_every_pitfall_is_covered():
    pitfalls = json.loads((REF / f"{STEM}.pitfalls.json").read_text())
    names = [p for p in pitfalls if not p.startswith("baseline")]
    uncovered = [p for p in names if not any(fragment in p for fragment in PITFALL_TESTS)]
    assert not uncovered, f"pitfalls without a covering test: {uncovered}"
    module = sys.modules[__name__]
    assert all(hasattr(module, t) for tests in PITFALL_TESTS.values() for t in tests)

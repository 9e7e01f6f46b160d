"""Checkpoints exactly as published, loaded by hub repo id, ``hf://`` URL or bare safetensors file.

Every hub load goes through the real ``huggingface_hub`` against a real hub cache built in a temp
folder (``tests/hub_cache.py``), offline (``HF_HUB_OFFLINE``): nothing of the library is replaced.
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import scan_cache_dir
from PIL import Image
from safetensors.torch import load_file, save_file

from generator import GeneratorConfig, MaskGITTransformer, SamplerConfig
from generator.checkpoint import sampler_defaults
from tests.hub_cache import TOKEN_CANARY as CANARY
from tests.hub_cache import HubCache, use_hub_cache
from tests.titok_fixtures import REFERENCE, TITOK_REF, titok_config
from tokenizer import CheckpointError, build_tokenizer, load_tokenizer
from tokenizer.checkpoint import fingerprint, read_checkpoint
from tokenizer.flextok.config import HUB_NODES
from tokenizer.interpolation import resolve_interpolations

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
HUB_CONFIGS = TITOK_REF / "hub_configs"
TITOK_NAMES = ["titok_s128", "titok_b64", "titok_l32", "titok_bl64_vq8k", "titok_bl128_vq8k", "titok_sl256_vq8k"]
FLEX_REF = REFERENCE / "flextok"
FLEX_CONFIG = json.loads((FLEX_REF / "tiny_flextok.config.json").read_text())

# Official size names with their official depths but tiny widths: key names stay those of the release.
TINY_SIZES = {name: {"width": 32, "num_layers": depth, "num_heads": 2}
              for name, depth in (("small", 8), ("base", 12), ("large", 24))}
TINY_PIXEL = {"pixel_decoder": {"hidden_channels": 32, "z_channels": 16},
              "pixel_codebook": {"num_embeddings": 1024, "embedding_dim": 16}}


@pytest.fixture
def hub(tmp_path, monkeypatch) -> HubCache:
    return use_hub_cache(monkeypatch, tmp_path / "hub")


def published(name: str) -> dict:
    return json.loads((HUB_CONFIGS / f"{name}.config.json").read_text())


def released_layout(name: str) -> dict[str, list[int]]:
    return {k["key"]: k["shape"] for k in json.loads((TITOK_REF / "keys" / f"{name}.keys.json").read_text())["keys"]}


def tiny_published(name: str) -> dict:
    """A published config, unedited but for pretok's size extensions (tiny widths, official depths)."""
    cfg = published(name)
    vq = cfg["model"]["vq_model"]
    vq["model_sizes"] = TINY_SIZES
    if vq.get("finetune_decoder", True):
        vq.update(copy.deepcopy(TINY_PIXEL))
    return cfg


def random_weights(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.contiguous() for k, v in build_tokenizer(config).state_dict().items()}


def reference_two_stage() -> tuple[dict, dict[str, torch.Tensor]]:
    """The tiny two-stage reference model with its config in the published form of titok_l32: no
    finetune_decoder / is_legacy / quantize_mode, a generator block with an interpolation."""
    cfg = titok_config("tiny_vq_two_stage")
    for key in ("finetune_decoder", "is_legacy", "quantize_mode"):
        cfg["model"]["vq_model"].pop(key, None)
    cfg["model"]["generator"] = {"image_seq_len": "${model.vq_model.num_latent_tokens}"}
    return cfg, load_file(str(TITOK_REF / "tiny_vq_two_stage.safetensors"))


def test_fixture_cache_is_the_library_layout(hub):
    commit = hub.add("org/repo", {"config.json": b"{}", "model.safetensors": b"\0" * 8})
    (repo,) = scan_cache_dir(hub.root).repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, revision.commit_hash) == ("org/repo", "model", commit)
    assert set(revision.refs) == {"main"}
    assert {f.file_name for f in revision.files} == {"config.json", "model.safetensors"}


# ---------------------------------------------------------------------------------- TiTok


@pytest.mark.parametrize("name", TITOK_NAMES)
def test_published_titok_config_builds_the_official_layout(name):
    with torch.device("meta"):
        model = build_tokenizer(published(name))
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == released_layout(name)


@pytest.mark.parametrize("name", TITOK_NAMES)
def test_published_titok_loads_by_repo_id(hub, name):
    cfg = tiny_published(name)
    weights = random_weights(cfg)
    assert set(weights) == set(released_layout(name))  # tiny widths, the release's key names
    repo = f"yucornetto/tokenizer_{name}_imagenet"
    commit = hub.add_checkpoint(repo, cfg, weights)
    ckpt = read_checkpoint(repo)
    assert ckpt.source == f"hf://{repo}@{commit}" and ckpt.name == f"tokenizer_{name}_imagenet"
    assert ckpt.config == cfg  # as published: defaults and interpolations are applied when building
    tok = load_tokenizer(ckpt, parts="encoder")
    assert tok.fingerprint == fingerprint(cfg, weights)
    loaded = tok.state_dict()
    assert all(torch.equal(loaded[k], weights[k]) for k in loaded)
    vq = cfg["model"]["vq_model"]
    ids = tok.encode(torch.rand(1, 3, 256, 256))
    assert ids.shape == (1, vq["num_latent_tokens"]) and 0 <= ids.min() and ids.max() < vq["codebook_size"]


def test_titok_reference_ids_by_repo_id_revision_and_hf_url(hub):
    """Official defaults decide the model: the reference ids and pixels come back through every form."""
    cfg, weights = reference_two_stage()
    main = hub.add_checkpoint("pretok-test/titok-tiny", cfg, weights)
    v1 = hub.add_checkpoint("pretok-test/titok-tiny", {**cfg, "experiment": {"note": "v1"}}, weights, revision="v1")
    io = load_file(str(TITOK_REF / "tiny_vq_two_stage.io.safetensors"))
    snapshot = hub.root / "models--pretok-test--titok-tiny" / "snapshots" / main
    sub = hub.add("pretok-test/collection", {f"titok/{p.name}": p.read_bytes() for p in snapshot.iterdir()})
    for src, source in [
        ("pretok-test/titok-tiny", f"hf://pretok-test/titok-tiny@{main}"),
        ("pretok-test/titok-tiny@v1", f"hf://pretok-test/titok-tiny@{v1}"),
        (f"hf://pretok-test/titok-tiny@{main}", f"hf://pretok-test/titok-tiny@{main}"),
        ("hf://pretok-test/titok-tiny@v1", f"hf://pretok-test/titok-tiny@{v1}"),
        ("hf://pretok-test/collection/titok", f"hf://pretok-test/collection@{sub}/titok"),
        # a bare file whose header holds only {"format": "pt"}: the config.json beside it
        (str(snapshot / "model.safetensors"), str(snapshot / "model.safetensors")),
    ]:
        ckpt = read_checkpoint(src)
        assert ckpt.source == source, src
        tok = load_tokenizer(ckpt)
        assert torch.equal(tok.encode(io["image"]), io["tokens"].squeeze(1)), src
    decoded = tok.decode_tokens(io["tokens"].squeeze(1))
    torch.testing.assert_close(decoded, io["decoded_from_tokens"], atol=1e-4, rtol=1e-4)


def test_stage1_titok_encodes_and_refuses_to_decode(hub):
    """is_legacy with finetune_decoder=false (the official stage-1 model): same encoder and ids, but
    the decoder emits MaskGIT-VQGAN proxy-code logits, so decoding is refused clearly."""
    full = published("titok_l32")
    full["model"]["vq_model"]["finetune_decoder"] = False
    with torch.device("meta"):
        layout = {k: list(v.shape) for k, v in build_tokenizer(full).state_dict().items()}
    assert layout == {k: s for k, s in released_layout("titok_l32").items() if not k.startswith("pixel_")}
    cfg = tiny_published("titok_l32")
    cfg["model"]["vq_model"]["finetune_decoder"] = False
    hub.add_checkpoint("org/titok-l32-stage1", cfg, random_weights(cfg))
    tok = load_tokenizer("org/titok-l32-stage1")
    ids = tok.encode(torch.rand(2, 3, 256, 256))
    with pytest.raises(RuntimeError, match="stage-1 TiTok.*proxy codes"):
        tok.decode_tokens(ids)
    cfg["model"]["vq_model"].update(is_legacy=False, finetune_decoder=True)
    with pytest.raises(CheckpointError, match="finetune_decoder=true needs is_legacy=true"):
        build_tokenizer(cfg)


@pytest.mark.parametrize("value, message", [
    ("${model.vq_model.nope}", r"model.vq_model.token_size: interpolation \$\{model.vq_model.nope\} names no value"),
    ("${model.vq_model.token_size}", "cyclic interpolation"),
    ("${oc.env:HOME}", "unsupported interpolation"),
])
def test_bad_interpolations_are_refused(value, message):
    cfg = published("titok_l32")
    cfg["model"]["vq_model"]["token_size"] = value
    with pytest.raises(CheckpointError, match=message):
        build_tokenizer(cfg)
    resolved = resolve_interpolations({"a": {"b": [7]}, "c": "${a.b.0}", "d": "n=${a.b.0}"})
    assert resolved == {"a": {"b": [7]}, "c": 7, "d": "n=7"}


# ---------------------------------------------------------------------------------- source errors


def test_hub_errors_are_clear(hub, tmp_path, capsys):
    cfg, weights = reference_two_stage()
    hub.add_checkpoint("org/present", cfg, weights)
    with pytest.raises(CheckpointError, match=r"hub repo org/missing is not in the local hub cache .*no local folder "
                       r"org/missing.*HF_HUB_OFFLINE is set.*`hf download org/missing`"):
        load_tokenizer("org/missing")
    with pytest.raises(CheckpointError, match=r"revision 'v9' of hub repo org/present is not in the local hub cache "
                       r".*cached: main.*`hf download org/present --revision v9`"):
        load_tokenizer("org/present@v9")
    commit = hub.add("org/no-weights", {"config.json": json.dumps(cfg).encode()})
    with pytest.raises(CheckpointError, match=f"no weights in hf://org/no-weights@{commit}"):
        load_tokenizer("org/no-weights")
    with pytest.raises(CheckpointError, match="namespace/name"):
        load_tokenizer("hf://only-a-name")
    from jobs import pretokenize, sample

    assert pretokenize.main([str(tmp_path), str(tmp_path / "out"), "--tokenizer", "org/missing", "--no-progress"]) == 2
    assert not (tmp_path / "out").exists()
    assert sample.main(["org/missing-generator", "--tokenizer", "org/present", "--out", str(tmp_path / "g.png")]) == 2
    assert "hub repo org/missing-generator is not in the local hub cache" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- FlexTok


def flextok_weights() -> dict[str, torch.Tensor]:
    return load_file(str(FLEX_REF / "tiny_flextok.safetensors"))


def assert_reference_ids(src) -> None:
    io = load_file(str(FLEX_REF / "tiny_flextok.io.safetensors"))
    tok = load_tokenizer(src, parts="encoder")
    assert torch.equal(tok.encode(io["input.image_uint8"].float() / 255), io["enc.token_ids"])


def test_flextok_saved_the_official_way(hub, tmp_path):
    """Config in the safetensors header as {key: str(value)}: by repo id (a folder without
    config.json), as an hf:// file URL and as a local bare file."""
    metadata = {k: str(v) for k, v in FLEX_CONFIG.items()}  # flextok.utils.checkpoint.save_safetensors
    assert metadata["_target_"] == "flextok.flextok_wrapper.FlexTok"  # str() of a string: not a literal
    commit = hub.add_checkpoint("EPFL-VILAB/flextok-tiny", None, flextok_weights(), metadata=metadata)
    bare = tmp_path / "download" / "model.safetensors"
    bare.parent.mkdir()
    save_file(flextok_weights(), str(bare), metadata=metadata)
    for src in ("EPFL-VILAB/flextok-tiny", "hf://EPFL-VILAB/flextok-tiny/model.safetensors", str(bare)):
        ckpt = read_checkpoint(src)
        assert ckpt.config == FLEX_CONFIG, src
        assert_reference_ids(ckpt)
    assert ckpt.name == "download"
    assert read_checkpoint("hf://EPFL-VILAB/flextok-tiny/model.safetensors").source == \
        f"hf://EPFL-VILAB/flextok-tiny@{commit}/model.safetensors"

    evil = tmp_path / "evil.safetensors"
    save_file(flextok_weights(), str(evil), metadata={**metadata, "vae": "{'hf_hub_path': __import__('os').getcwd()}"})
    with pytest.raises(CheckpointError, match="header metadata key 'vae' is not a Python literal"):
        load_tokenizer(str(evil))


def hub_config(hf_hub_path: str | None, scaling_factor: float | None) -> dict:
    """The FlexTokFromHub config.json: the six nodes, no top-level _target_."""
    cfg = {node: copy.deepcopy(FLEX_CONFIG[node]) for node in HUB_NODES}
    cfg["vae"].update(hf_hub_path=hf_hub_path, scaling_factor=scaling_factor)
    return cfg


def test_flextok_hub_config_with_its_vae_repo(hub):
    weights = flextok_weights()
    vae_config = {**FLEX_CONFIG["_reference_harness"]["vae_base_cfg_override"], "latent_channels": 16,
                  "scaling_factor": FLEX_CONFIG["vae"]["scaling_factor"]}
    vae_weights = {k.removeprefix("vae.vae."): v for k, v in weights.items() if k.startswith("vae.vae.")}
    hub.add_checkpoint("pretok-test/flextok-vae-tiny", vae_config, vae_weights)  # diffusers layout: config + weights
    hub.add_checkpoint("EPFL-VILAB/flextok-tiny-hub", hub_config("pretok-test/flextok-vae-tiny", None), weights)
    ckpt = read_checkpoint("EPFL-VILAB/flextok-tiny-hub")
    assert ckpt.config["vae_config"] == vae_config  # self-contained: actors need no hub for the VAE
    assert_reference_ids(ckpt)
    assert load_tokenizer(ckpt, parts="encoder").vae.scaling_factor == vae_config["scaling_factor"]  # node: None

    hub.add_checkpoint("EPFL-VILAB/flextok-needs-vae", hub_config("EPFL-VILAB/flextok_vae_c16", 0.8), weights)
    with pytest.raises(CheckpointError, match=r"config.json of EPFL-VILAB/flextok_vae_c16 \(vae.hf_hub_path\).*"
                       r"not in the local hub cache.*`hf download EPFL-VILAB/flextok_vae_c16 config.json`"):
        load_tokenizer("EPFL-VILAB/flextok-needs-vae")


# ---------------------------------------------------------------------------------- generator


def test_published_generator_config_builds_the_official_layout():
    config = published("titok_l32")  # image_seq_len: "${model.vq_model.num_latent_tokens}"
    cfg = GeneratorConfig.from_official(config)
    assert cfg.num_tokens == 32
    with torch.device("meta"):
        model = MaskGITTransformer(cfg)
    ref = json.loads((TITOK_REF / "keys" / "generator_titok_l32.keys.json").read_text())
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k["key"]: k["shape"] for k in ref["keys"]}
    assert sampler_defaults(config) == SamplerConfig(
        num_steps=8, guidance_scale=4.5, guidance_schedule="linear", temperature=9.5, softmax_annealing=True
    )


def test_sample_a_published_generator_folder_by_repo_id(hub, tmp_path):
    """``pretok sample`` on published folders, in a fresh process configured by the environment only
    (HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN); the token is echoed nowhere."""
    tok_cfg, tok_weights = reference_two_stage()
    hub.add_checkpoint("yucornetto/tokenizer_titok_l32_imagenet", tok_cfg, tok_weights)
    gen_cfg = published("titok_l32")  # the generator repo shares the tokenizer's config.json
    gen_cfg["model"]["vq_model"] = tok_cfg["model"]["vq_model"]
    gen_cfg["model"]["generator"].update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64)
    torch.manual_seed(0)
    gen_weights = dict(MaskGITTransformer(GeneratorConfig.from_official(gen_cfg)).state_dict())
    gen_weights["model.embeddings.position_ids"] = torch.arange(17)[None]  # old transformers saved this buffer
    hub.add_checkpoint("yucornetto/generator_titok_l32_imagenet", gen_cfg, gen_weights)

    png = tmp_path / "grid.png"
    env = {**os.environ, "HF_HUB_CACHE": str(hub.root), "HF_HUB_OFFLINE": "1", "HF_TOKEN": CANARY,
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "jobs.sample", "yucornetto/generator_titok_l32_imagenet", "--tokenizer",
         "yucornetto/tokenizer_titok_l32_imagenet", "--out", str(png), "--classes", "0,1", "--per-class", "2",
         "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    side = 64 + 2
    assert Image.open(png).size == (2 * side + 2, 2 * side + 2)
    settings = "num_steps=8, guidance_scale=4.5, guidance_schedule='linear', guidance_power=3.0, temperature=9.5, " \
               "softmax_annealing=True"
    assert settings in run.stderr  # the published config's sampling defaults
    assert CANARY not in run.stdout + run.stderr and CANARY.encode() not in png.read_bytes()

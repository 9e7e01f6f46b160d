"""FlexTok config parsing: the official hydra dict -> a checked, frozen ``FlexTokConfig``.

Two published forms are read: the hub ``config.json`` (``FlexTokFromHub``: the six nodes ``vae``,
``encoder``, ``decoder``, ``regularizer``, ``flow_matching_noise_module``, ``pipeline``, no top-level
``_target_``) and the safetensors-header config (the same nodes under a top-level ``_target_``
naming ``flextok.flextok_wrapper.FlexTok``). Nothing is instantiated from ``_target_``: the fields
are read and checked, and unsupported variants are refused.

The VAE architecture is not part of the FlexTok config; as in the official ``StableDiffusionVAE``:

* with ``vae.hf_hub_path`` set it is that repo's ``config.json`` (``tokenizer.flextok.hub_vae``
  reads it when the checkpoint is read and stores it under ``vae_config``);
* with ``hf_hub_path`` null it is the official base config ``VAE_BASE_CONFIG`` with the node's
  ``latent_channels`` (the reference fixtures replace that base config by their
  ``_reference_harness.vae_base_cfg_override``, as the official code was run with it);
* an inline ``vae_config`` (pretok extension) overrides both.

``scaling_factor`` is the node's, else the VAE config's. Optional ``image_size`` (pretok extension):
the resolution ``decode_tokens`` renders; else ``_reference_harness.image_size``; else the largest
size the patch posemb grid covers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import CheckpointError
from .vae import VAEConfig

# The nodes FlexTokFromHub instantiates; its hub config.json holds exactly these.
HUB_NODES = ("vae", "encoder", "decoder", "regularizer", "flow_matching_noise_module", "pipeline")

# Official ``flextok.vae_wrapper.VAE_BASE_CFG`` (values), used when ``vae.hf_hub_path`` is null.
VAE_BASE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": None,
}

_DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class TransformerConfig:
    dim: int
    depth: int
    head_dim: int
    mlp_ratio: float
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @classmethod
    def from_dict(cls, cfg: dict, where: str) -> "TransformerConfig":
        if not cfg.get("gated_mlp", True):
            raise CheckpointError(f"{where}: gated_mlp=false is not supported (FlexTok uses SwiGLU)")
        return cls(
            dim=int(cfg.get("dim", 768)),
            depth=int(cfg.get("depth", 12)),
            head_dim=int(cfg.get("head_dim", 64)),
            mlp_ratio=float(cfg.get("mlp_ratio", 4.0)),
            qkv_bias=bool(cfg.get("qkv_bias", False)),
            proj_bias=bool(cfg.get("proj_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=bool(cfg.get("qk_norm", True)),
        )


# Parameterised / order-relevant modules of the official module dicts, with accepted classes.
# Parameter-free helpers (channel permutes, the sequence unpackers) are not checked.
_ENCODER_MODULES = {
    "enc_patch_emb": ("PatchEmbedder",),
    "enc_posemb_module": ("PositionalEmbeddingAdder",),
    "enc_register_module": ("Registers1D",),
    "enc_seq_packer": ("BlockWiseSequencePacker",),
    "enc_transformer": ("FlexTransformer",),
    "enc_to_latents": ("LinearHead",),
}
_DECODER_MODULES = {
    "dec_from_latents": ("LinearLayer",),
    "dec_registers_posemb_module": ("PositionalEmbeddingAdder",),
    "dec_nested_dropout": ("MaskedNestedDropout",),
    "dec_latent_dropout": ("LearnedNullCond", "ZeroNullCond"),
    "dec_noise_patch_emb": ("PatchEmbedder",),
    "dec_patches_posemb_module": ("PositionalEmbeddingAdder",),
    "dec_seq_packer": ("BlockWiseSequencePacker",),
    "dec_time_embedder": ("TimestepEmbedder",),
    "dec_transformer": ("FlexTransformer",),
    "dec_to_patches": ("ToPatchesLinearHead",),
}


def _class(node: dict) -> str:
    return str(node.get("_target_", "")).rsplit(".", 1)[-1]


def _module_dict(config: dict, section: str, expected: dict[str, tuple[str, ...]]) -> dict:
    try:
        modules = config[section]["module_dict"]
    except (KeyError, TypeError):
        raise CheckpointError(f"FlexTok config lacks {section}.module_dict") from None
    present = [name for name in modules if name in expected]
    if present != list(expected):
        raise CheckpointError(
            f"FlexTok {section}.module_dict must contain {list(expected)} in this order; found {list(modules)}"
        )
    for name, classes in expected.items():
        if _class(modules[name]) not in classes:
            got = modules[name].get("_target_")
            raise CheckpointError(f"{section}.{name}: expected one of {classes}, got {got!r}")
    return modules


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise CheckpointError(f"unsupported FlexTok config: {message}")


@dataclass(frozen=True)
class FlexTokConfig:
    vae: VAEConfig
    vae_scaling_factor: float
    vae_dtype: torch.dtype
    patch_size: tuple[int, int]
    num_registers: int
    fsq_levels: tuple[int, ...]
    encoder: TransformerConfig
    enc_posemb_grid: tuple[int, int]
    decoder: TransformerConfig
    dec_posemb_grid: tuple[int, int]
    adaln_expansion: int          # 2: separate modulation for patch and register tokens
    learned_nullcond: bool        # LearnedNullCond (key .nullcond) vs ZeroNullCond
    head_adaln: bool              # dec_to_patches with adaLN modulation
    time_freq_dim: int
    max_timestep: float
    image_size: int

    @classmethod
    def from_dict(cls, config: dict) -> "FlexTokConfig":
        """Read and check an official FlexTok hydra config (plus pretok's extensions)."""
        try:
            return cls._parse(config)
        except (KeyError, TypeError) as e:
            raise CheckpointError(f"FlexTok config lacks a required field: {e}") from e

    @classmethod
    def _parse(cls, config: dict) -> "FlexTokConfig":
        harness = config.get("_reference_harness") or {}
        vae_node = config.get("vae") or {}
        _require(_class(vae_node) == "StableDiffusionVAE", f"vae._target_={vae_node.get('_target_')!r}")
        vae = VAEConfig.from_dict(_vae_config(config, vae_node, harness))
        scaling = vae_node.get("scaling_factor") or vae.scaling_factor
        _require(scaling is not None, "no VAE scaling factor (vae.scaling_factor or vae_config.scaling_factor)")
        dtype = vae_node.get("dtype_override", "fp32")
        _require(dtype in _DTYPES, f"vae.dtype_override={dtype!r}")

        reg = config.get("regularizer") or {}
        _require(_class(reg) == "FSQ", f"regularizer._target_={reg.get('_target_')!r}")
        levels = tuple(int(v) for v in reg["levels"])
        pipe = config.get("pipeline") or {}
        _require(_class(pipe) == "MinRFPipeline", f"pipeline._target_={pipe.get('_target_')!r}")

        enc = _module_dict(config, "encoder", _ENCODER_MODULES)
        dec = _module_dict(config, "decoder", _DECODER_MODULES)
        patch = tuple(int(p) for p in enc["enc_patch_emb"]["patch_sizes"])
        for name in ("enc_patch_emb", "dec_noise_patch_emb"):
            node = enc.get(name) or dec[name]
            channels = node["channels_in"]
            _require(len(patch) == 2 and tuple(node["patch_sizes"]) == patch, f"{name}.patch_sizes")
            _require(channels == vae.latent_channels,
                     f"{name}.channels_in={channels} but the VAE has {vae.latent_channels} latent channels")
        _require(dec["dec_to_patches"]["channels_out"] == vae.latent_channels, "dec_to_patches.channels_out")
        _require(tuple(dec["dec_to_patches"]["patch_sizes"]) == patch, "dec_to_patches.patch_sizes")
        _require(int(pipe.get("out_channels", vae.latent_channels)) == vae.latent_channels, "pipeline.out_channels")

        registers = enc["enc_register_module"]
        n_reg = int(registers["n_max"])
        _require(registers.get("ordering_mode", "nested") == "nested", "enc_register_module.ordering_mode")
        _require(enc["enc_seq_packer"].get("mask_mode") == "causal_last",
                 "enc_seq_packer.mask_mode (need causal_last)")
        _require(dec["dec_seq_packer"].get("mask_mode") == "full", "dec_seq_packer.mask_mode (need full)")
        _require(list(enc["enc_seq_packer"]["input_list_read_keys"]) ==
                 [enc["enc_patch_emb"]["patches_list_write_key"], registers["registers_write_key"]],
                 "enc_seq_packer must pack [patches, registers]")
        _require(list(dec["dec_seq_packer"]["input_list_read_keys"]) ==
                 [dec["dec_noise_patch_emb"]["patches_list_write_key"], dec["dec_nested_dropout"]["read_write_key"]],
                 "dec_seq_packer must pack [patches, registers]")
        for name in ("enc_posemb_module", "dec_patches_posemb_module"):
            node = enc.get(name) or dec.get(name)
            sincos = node.get("posemb_type", "sincos") == "sincos"
            _require(sincos and node.get("posemb_scaling", "absolute") == "absolute",
                     f"{name} must be an absolute sincos posemb")
        reg_pe = dec["dec_registers_posemb_module"]
        _require(reg_pe.get("posemb_type") == "learnable_sum" and list(reg_pe["max_sizes"]) == [n_reg]
                 and reg_pe.get("posemb_scaling", "absolute") == "absolute",
                 "dec_registers_posemb_module must be a learnable_sum 1D posemb over all registers")
        _require(not dec["dec_latent_dropout"].get("replace_with_single_token", False),
                 "dec_latent_dropout.replace_with_single_token")
        _require(dec["dec_from_latents"]["dim_in"] == len(levels) == enc["enc_to_latents"]["dim_out"],
                 "enc_to_latents.dim_out / dec_from_latents.dim_in must equal the number of FSQ levels")
        for name, node in (("enc_to_latents", enc["enc_to_latents"]), ("dec_to_patches", dec["dec_to_patches"])):
            _require(not node.get("use_mup_readout", False), f"{name}.use_mup_readout")
            _require(node.get("proj_bias", True), f"{name}.proj_bias=false")

        enc_t = TransformerConfig.from_dict(enc["enc_transformer"], "enc_transformer")
        dec_t = TransformerConfig.from_dict(dec["dec_transformer"], "dec_transformer")
        _require(dec["dec_transformer"].get("adaLN_emb_read_key") is not None, "dec_transformer without adaLN")
        expansion = int(dec["dec_transformer"].get("adaLN_expansion", 1))
        per_subseq = bool(dec["dec_seq_packer"].get("per_subseq_embs", False))
        _require(expansion == (2 if per_subseq else 1),
                 f"adaLN_expansion={expansion} with per_subseq_embs={per_subseq}")
        for modules, width in ((enc, enc_t.dim), (dec, dec_t.dim)):
            for name, node in modules.items():
                _require(int(node.get("dim", width)) == width,
                         f"{name}.dim={node.get('dim')} but the transformer width is {width}")
        temb = dec["dec_time_embedder"]
        freq = int(temb.get("frequency_embedding_size", 256))
        _require(freq % 2 == 0, "odd dec_time_embedder.frequency_embedding_size")

        enc_grid = tuple(int(s) for s in enc["enc_posemb_module"]["max_sizes"])
        dec_grid = tuple(int(s) for s in dec["dec_patches_posemb_module"]["max_sizes"])
        factor = vae.downsample_factor * patch[0]
        image_size = config.get("image_size") or harness.get("image_size") or min(dec_grid) * factor
        return cls(
            vae=vae,
            vae_scaling_factor=float(scaling),
            vae_dtype=_DTYPES[vae_node.get("dtype_override", "fp32")],
            patch_size=patch,
            num_registers=n_reg,
            fsq_levels=levels,
            encoder=enc_t,
            enc_posemb_grid=enc_grid,
            decoder=dec_t,
            dec_posemb_grid=dec_grid,
            adaln_expansion=expansion,
            learned_nullcond=_class(dec["dec_latent_dropout"]) == "LearnedNullCond",
            head_adaln=dec["dec_to_patches"].get("adaLN_emb_read_key") is not None,
            time_freq_dim=freq,
            max_timestep=float(temb.get("max_timestep", 1000.0)),
            image_size=int(image_size),
        )


def is_flextok_config(config: dict) -> bool:
    """A FlexTok config in either published form (see the module docstring)."""
    if "flextok" in str(config.get("_target_", "")).lower():
        return True
    vae = config.get("vae")
    return (isinstance(vae, dict) and "flextok" in str(vae.get("_target_", "")).lower()
            and all(isinstance(config.get(node), dict) for node in HUB_NODES))


def missing_vae_config(path: str, why: str) -> CheckpointError:
    return CheckpointError(
        f"the VAE architecture of this FlexTok checkpoint is the config.json of {path} (vae.hf_hub_path), "
        f"which cannot be read: {why}. Download it with `hf download {path} config.json` (the hub cache is "
        "then used, also offline), or put that AutoencoderKL config into the checkpoint's config under 'vae_config'"
    )


def _vae_config(config: dict, vae_node: dict, harness: dict) -> dict:
    if "vae_config" in config:
        return config["vae_config"]
    if vae_node.get("hf_hub_path"):
        raise missing_vae_config(
            vae_node["hf_hub_path"], "this config carries no vae_config (load_tokenizer / read_checkpoint fetch it)"
        )
    base = harness.get("vae_base_cfg_override", VAE_BASE_CONFIG)
    return {**base, "latent_channels": vae_node.get("latent_channels", 16)}

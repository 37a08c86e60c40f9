"""VAE checkpoints (diffusers folders, the official / latent-diffusion layout) <-> our
``cheers.tokenizer.vae`` modules: configs, tensor names, and reading folders and files.

Three layouts are read:

* **official** (latent-diffusion / FLUX.2 / Cheers): ``encoder.conv_in``,
  ``encoder.down.{level}.block.{j}.{norm1,conv1,norm2,conv2,nin_shortcut}``,
  ``encoder.down.{level}.downsample.conv``, ``encoder.mid.{block_1,attn_1,block_2}``
  (``attn_1.{norm,q,k,v,proj_out}`` are 1x1 convs), ``encoder.norm_out``,
  ``encoder.conv_out``, ``encoder.quant_conv``; the decoder likewise with
  ``decoder.post_quant_conv`` and ``decoder.up.{level}.{block.{j},upsample.conv}``; ``bn.*``.
  ``up.{level}`` counts resolution levels from the full-resolution end, so it runs in the
  opposite order to diffusers' ``up_blocks`` (which follow the forward pass).
  In a Cheers checkpoint the VAE sits under ``model.vae_model.`` and the pixel decoder
  (``decoder.*`` + ``bn.*`` only) under ``model.vae_decoder_projector.``.
* **diffusers** folders of ``AutoencoderKL`` (SD / FLUX.1 type, no BatchNorm) and
  ``AutoencoderKLFlux2`` (FLUX.2, with ``bn.*``): top-level ``quant_conv``,
  ``post_quant_conv``, ``encoder.*`` / ``decoder.*`` in diffusers names.
* **ours**: see ``cheers/tokenizer/vae.py`` (the folder ``tokenizer/vae.py``).

The translation renames keys and reshapes the mid-block attention weights between 1x1 conv
``[C, C, 1, 1]`` (official) and linear ``[C, C]`` (diffusers, ours); values are untouched,
so official -> ours -> official is exact.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from safetensors import SafetensorError, safe_open

from cheers.config import VAEConfig
from cheers.errors import CheckpointError, ConfigError
from cheers.safetensors_io import fit_report, read_json, read_state_dict
from cheers.tokenizer.vae import VAE

log = logging.getLogger(__name__)

OFFICIAL_VAE_PREFIX = "model.vae_model."
OFFICIAL_PIXEL_DECODER_PREFIX = "model.vae_decoder_projector."

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"

# ------------------------------------------------------------------------------ configs

# Fields of the official (FLUX.2 ``AutoEncoderParams``) sub-configs.
_OFFICIAL_VAE_FIELDS = {
    "resolution",
    "in_channels",
    "ch",
    "out_ch",
    "ch_mult",
    "num_res_blocks",
    "z_channels",
}


def _official_part(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    part = config.get(name, {})
    if not isinstance(part, Mapping):
        raise ConfigError(f"{name}: expected a mapping, got {part!r}")
    unknown = sorted(set(part) - _OFFICIAL_VAE_FIELDS)
    if unknown:
        raise ConfigError(
            f"unknown key {name}.{unknown[0]} (known: {', '.join(sorted(_OFFICIAL_VAE_FIELDS))})"
        )
    return dict(part)


def config_from_official_vae(config: Mapping[str, Any]) -> VAEConfig:
    """``VAEConfig`` from an official Cheers ``config.json`` (the parsed dict).

    Reads ``vae_encoder_config`` and ``vae_decoder_config``; absent fields take the official
    defaults (ch 128, ch_mult [1, 2, 4, 4], 2 blocks, z 32), which are ``VAEConfig``'s own.
    ``resolution`` is ignored: the model is fully convolutional.
    """
    enc = _official_part(config, "vae_encoder_config")
    dec = _official_part(config, "vae_decoder_config")
    base = VAEConfig()
    z_enc = enc.get("z_channels", base.z_channels)
    z_dec = dec.get("z_channels", base.z_channels)
    if z_enc != z_dec:
        raise ConfigError(
            f"vae_encoder_config.z_channels={z_enc} != vae_decoder_config.z_channels={z_dec}"
        )
    return VAEConfig(
        in_channels=enc.get("in_channels", base.in_channels),
        out_channels=dec.get("out_ch", base.out_channels),
        ch=enc.get("ch", base.ch),
        ch_mult=list(enc.get("ch_mult", base.ch_mult)),
        num_res_blocks=enc.get("num_res_blocks", base.num_res_blocks),
        decoder_ch=dec.get("ch", base.decoder_ch),
        decoder_ch_mult=list(dec.get("ch_mult", base.decoder_ch_mult)),
        decoder_num_res_blocks=dec.get("num_res_blocks", base.decoder_num_res_blocks),
        z_channels=z_enc,
    )


def _as_mult(widths: list[int], key: str) -> tuple[int, list[int]]:
    """``[128, 256, 512, 512] -> (128, [1, 2, 4, 4])``."""
    base = widths[0]
    if any(w % base for w in widths):
        raise ConfigError(f"{key}={widths}: every width must be a multiple of the first")
    return base, [w // base for w in widths]


def config_from_diffusers_vae(config: Mapping[str, Any]) -> VAEConfig:
    """``VAEConfig`` from a diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` ``config.json``.

    Raises ``ConfigError`` naming the key for a variant our modules cannot express
    (other block types, activation, no mid-block attention, no quant convs).
    """
    name = config.get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderKLFlux2"):
        raise ConfigError(f"_class_name={name!r}: expected AutoencoderKL or AutoencoderKLFlux2")
    # A field left out of config.json takes the class's own default (they differ: FLUX.2
    # defaults to 32 latent channels and 2 blocks per level, AutoencoderKL to 4 and 1).
    cls = getattr(diffusers, name)
    defaults = {
        k: p.default
        for k, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    config = {**defaults, **config}
    requirements = {
        "act_fn": "silu",
        "mid_block_add_attention": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
    }
    for key, want in requirements.items():
        if config.get(key, want) != want:
            raise ConfigError(f"{key}={config[key]!r} is not supported (only {want!r})")
    for key, want in (
        ("down_block_types", "DownEncoderBlock2D"),
        ("up_block_types", "UpDecoderBlock2D"),
    ):
        bad = [t for t in config.get(key, ()) if t != want]
        if bad:
            raise ConfigError(f"{key} contains {bad[0]!r}; only {want!r} is supported")

    widths = list(config["block_out_channels"])
    ch, ch_mult = _as_mult(widths, "block_out_channels")
    dec_widths = list(config.get("decoder_block_out_channels") or widths)
    decoder_ch, decoder_ch_mult = _as_mult(dec_widths, "decoder_block_out_channels")
    patch = config.get("patch_size", (2, 2))  # AutoencoderKL has none: Cheers folds 2x2
    if isinstance(patch, int):
        patch = (patch, patch)
    if len(patch) != 2 or patch[0] != patch[1]:
        raise ConfigError(f"patch_size={patch!r}: only square latent patches are supported")
    layers = config["layers_per_block"]
    return VAEConfig(
        in_channels=config["in_channels"],
        out_channels=config["out_channels"],
        ch=ch,
        ch_mult=ch_mult,
        num_res_blocks=layers,
        decoder_ch=decoder_ch,
        decoder_ch_mult=decoder_ch_mult,
        decoder_num_res_blocks=layers,  # diffusers' decoder has layers_per_block + 1 too
        z_channels=config["latent_channels"],
        norm_groups=config["norm_num_groups"],
        latent_patch=patch[0],
        bn_eps=float(config.get("batch_norm_eps", VAEConfig().bn_eps)),
    )


# ------------------------------------------------------------------------------ name rules


@dataclass(frozen=True)
class _Rule:
    """One module-path correspondence, e.g. ``down.{i}.block.{j}.nin_shortcut`` <->
    ``down_blocks.{i}.resnets.{j}.conv_shortcut``.

    Fields: ``{i}``, ``{j}`` are copied; ``{lvl}`` is a decoder level, mirrored
    (``L - 1 - lvl``) between the two sides; ``{res}`` is one of a resnet's own layers.
    ``conv_as_linear`` marks 1x1-conv <-> linear weights.
    """

    a: str
    b: str
    conv_as_linear: bool = False


_FIELD = {"i": r"\d+", "j": r"\d+", "lvl": r"\d+", "res": r"norm1|conv1|norm2|conv2"}


def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for name, rx in _FIELD.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{rx})")
    return re.compile(pattern)


def _ldm_rules() -> list[_Rule]:
    """Official LDM names (a) <-> ours (b)."""
    rules = [
        _Rule("encoder.quant_conv", "encoder.quant_conv"),
        _Rule("encoder.conv_in", "encoder.net.conv_in"),
        _Rule("encoder.down.{i}.block.{j}.{res}", "encoder.net.down_blocks.{i}.resnets.{j}.{res}"),
        _Rule(
            "encoder.down.{i}.block.{j}.nin_shortcut",
            "encoder.net.down_blocks.{i}.resnets.{j}.conv_shortcut",
        ),
        _Rule(
            "encoder.down.{i}.downsample.conv", "encoder.net.down_blocks.{i}.downsamplers.0.conv"
        ),
        _Rule("decoder.post_quant_conv", "decoder.post_quant_conv"),
        _Rule("decoder.conv_in", "decoder.net.conv_in"),
        _Rule("decoder.up.{lvl}.block.{j}.{res}", "decoder.net.up_blocks.{lvl}.resnets.{j}.{res}"),
        _Rule(
            "decoder.up.{lvl}.block.{j}.nin_shortcut",
            "decoder.net.up_blocks.{lvl}.resnets.{j}.conv_shortcut",
        ),
        _Rule("decoder.up.{lvl}.upsample.conv", "decoder.net.up_blocks.{lvl}.upsamplers.0.conv"),
        _Rule("bn", "bn"),
    ]
    for part in ("encoder", "decoder"):
        rules += [
            _Rule(f"{part}.mid.block_1.{{res}}", f"{part}.net.mid_block.resnets.0.{{res}}"),
            _Rule(f"{part}.mid.block_2.{{res}}", f"{part}.net.mid_block.resnets.1.{{res}}"),
            _Rule(f"{part}.mid.attn_1.norm", f"{part}.net.mid_block.attentions.0.group_norm"),
            _Rule(f"{part}.norm_out", f"{part}.net.conv_norm_out"),
            _Rule(f"{part}.conv_out", f"{part}.net.conv_out"),
        ]
        for ldm, ours in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
            rules.append(
                _Rule(f"{part}.mid.attn_1.{ldm}", f"{part}.net.mid_block.attentions.0.{ours}", True)
            )
    return rules


def _diffusers_rules() -> list[_Rule]:
    """diffusers ``AutoencoderKL[Flux2]`` names (a) -> ours (b)."""
    rules = [
        _Rule("quant_conv", "encoder.quant_conv"),
        _Rule("post_quant_conv", "decoder.post_quant_conv"),
        _Rule("bn", "bn"),
    ]
    # Folders saved by old diffusers versions name the mid attention query/key/value/proj_attn.
    for part in ("encoder", "decoder"):
        for old, new in (
            ("query", "to_q"),
            ("key", "to_k"),
            ("value", "to_v"),
            ("proj_attn", "to_out.0"),
        ):
            rules.append(
                _Rule(
                    f"{part}.mid_block.attentions.0.{old}",
                    f"{part}.net.mid_block.attentions.0.{new}",
                    True,
                )
            )
        for new in ("to_q", "to_k", "to_v", "to_out.0"):
            rules.append(
                _Rule(
                    f"{part}.mid_block.attentions.0.{new}",
                    f"{part}.net.mid_block.attentions.0.{new}",
                    True,
                )
            )
    return rules


_LDM_RULES = [(r, _compile(r.a), _compile(r.b)) for r in _ldm_rules()]
_DIFFUSERS_RULES = [(r, _compile(r.a)) for r in _diffusers_rules()]
_PARAM = re.compile(r"(?P<path>.+)\.(?P<param>[^.]+)")


def _fill(template: str, groups: dict[str, str], levels: int) -> str | None:
    out = template
    for name, value in groups.items():
        if name == "lvl":
            if int(value) >= levels:
                return None  # no such decoder level: report the key as unknown
            value = str(levels - 1 - int(value))
        out = out.replace("{" + name + "}", value)
    return out


def _rename(key: str, levels: int, *, forward: bool) -> tuple[str, bool] | None:
    """``(new name, is a 1x1-conv/linear weight)`` for one key, or None when no rule fits."""
    m = _PARAM.fullmatch(key)
    if m is None:
        return None
    for rule, rx_a, rx_b in _LDM_RULES:
        hit = (rx_a if forward else rx_b).fullmatch(m["path"])
        if hit is None:
            continue
        path = _fill(rule.b if forward else rule.a, hit.groupdict(), levels)
        if path is None:
            return None
        return f"{path}.{m['param']}", rule.conv_as_linear and m["param"] == "weight"
    return None


def _conv_to_linear(t: torch.Tensor) -> torch.Tensor:
    # [C_out, C_in, 1, 1] -> [C_out, C_in]; anything else passes through for the shape check
    return t.flatten(1) if t.ndim == 4 and t.shape[2:] == (1, 1) else t


def _linear_to_conv(t: torch.Tensor) -> torch.Tensor:
    # [C_out, C_in] -> [C_out, C_in, 1, 1]
    return t[:, :, None, None] if t.ndim == 2 else t


def _translate(
    sd: Mapping[str, torch.Tensor], cfg: VAEConfig, *, forward: bool, source: str
) -> dict[str, torch.Tensor]:
    levels = len(cfg.decoder_ch_mult)
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        renamed = _rename(key, levels, forward=forward)
        if renamed is None:
            unknown.append(key)
            continue
        new, reshape = renamed
        if reshape:
            tensor = _conv_to_linear(tensor) if forward else _linear_to_conv(tensor)
        if new in out:
            raise CheckpointError(f"{source}: two keys map to {new!r} (second: {key!r})")
        out[new] = tensor
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown VAE key(s): {_describe(unknown)}")
    return out


def official_vae_name(key: str, cfg: VAEConfig) -> str:
    """The official LDM name of one of our keys (the key itself if it has none)."""
    renamed = _rename(key, len(cfg.decoder_ch_mult), forward=False)
    return key if renamed is None else renamed[0]


def _describe(names: list[str], limit: int = 8) -> str:
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... and {more} more" if more > 0 else "")


def official_vae_to_ours(
    sd: Mapping[str, torch.Tensor], cfg: VAEConfig, *, source: str = "official state dict"
) -> dict[str, torch.Tensor]:
    """Official LDM-layout ``VAE`` or pixel-decoder state dict (prefix already removed) -> ours.

    Works for a ``VAE`` (``encoder.*``, ``decoder.*``, ``bn.*``) and a ``PixelDecoder``
    (``decoder.*``, ``bn.*``). An unknown name raises ``CheckpointError`` naming it; missing
    and mis-shaped keys are found by ``cheers.safetensors_io.load_checked`` against the module.
    """
    return _translate(sd, cfg, forward=True, source=source)


def ours_to_official_vae(
    sd: Mapping[str, torch.Tensor], cfg: VAEConfig, *, source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`official_vae_to_ours` (``VAE`` or ``PixelDecoder`` state dict)."""
    return _translate(sd, cfg, forward=False, source=source)


def diffusers_vae_to_ours(
    sd: Mapping[str, torch.Tensor], *, source: str = "diffusers state dict"
) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` / ``AutoencoderKLFlux2`` state dict -> ours.

    ``bn.*`` is present only for FLUX.2; see :func:`load_vae_folder` for the stand-in
    statistics of a VAE without one.
    """
    out: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in sd.items():
        m = _PARAM.fullmatch(key)
        new = None
        if m is not None:
            for rule, rx in _DIFFUSERS_RULES:
                if rx.fullmatch(m["path"]):
                    new = f"{rule.b}.{m['param']}"
                    if rule.conv_as_linear and m["param"] == "weight":
                        tensor = _conv_to_linear(tensor)
                    break
            if new is None and key.startswith(("encoder.", "decoder.")):
                part, rest = key.split(".", 1)
                new = f"{part}.net.{rest}"
        if new is None:
            unknown.append(key)
        else:
            out[new] = tensor
    if unknown:
        raise CheckpointError(f"{source}: {len(unknown)} unknown VAE key(s): {_describe(unknown)}")
    return out


def ours_to_diffusers_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`diffusers_vae_to_ours`: our ``VAE`` state dict -> current diffusers names
    (``AutoencoderKLFlux2`` with ``bn.*``; without it, ``AutoencoderKL``). The mid-block
    attention stays linear, as diffusers stores it now."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in sd.items():
        if key.startswith(("encoder.quant_conv.", "decoder.post_quant_conv.")):
            new = key.split(".", 1)[1]
        elif key.startswith(("encoder.net.", "decoder.net.")):
            part, rest = key.split(".net.", 1)
            new = f"{part}.{rest}"
        elif key.startswith("bn."):
            new = key
        else:
            raise CheckpointError(f"no diffusers name for our VAE tensor {key!r}")
        out[new] = tensor
    return out


# ------------------------------------------------------------------------------ files


def _safetensors_keys(file: Path) -> list[str]:
    if not file.is_file():
        raise CheckpointError(f"{file}: file not found")
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from e


def _read_prefixed(file: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of ``file`` whose name starts with ``prefix`` (prefix removed).

    Only those tensors are read: the VAE inside a full Cheers checkpoint costs its own size.
    """
    keys = [k for k in _safetensors_keys(file) if k.startswith(prefix)]
    try:
        with safe_open(str(file), framework="pt") as f:
            return {k[len(prefix) :]: f.get_tensor(k) for k in keys}
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors: {e}") from e


def _official_weight_files(folder: Path) -> list[Path]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' object")
        return [folder / name for name in sorted(set(weight_map.values()))]
    raise CheckpointError(f"{folder}: neither {single.name} nor {index.name} found")


def _stand_in_bn(cfg: VAEConfig, scale: float, shift: float) -> dict[str, torch.Tensor]:
    """``bn.*`` equal to the scalar latent scaling ``x = (z - shift) * scale`` of SD / FLUX.1.

    var = 1/scale^2 - eps makes sqrt(var + eps) = 1/scale exactly the divisor.
    """
    var = 1.0 / scale**2 - cfg.bn_eps
    if var <= 0:
        raise CheckpointError(f"scaling_factor={scale} is too large for bn_eps={cfg.bn_eps}")
    c = cfg.latent_channels
    return {
        "bn.running_mean": torch.full((c,), float(shift)),
        "bn.running_var": torch.full((c,), var),
        "bn.num_batches_tracked": torch.tensor(0, dtype=torch.long),
    }


def _load_diffusers_folder(folder: Path, cfg: VAEConfig | None) -> tuple[dict, VAEConfig]:
    config_file = folder / "config.json"
    config = read_json(config_file)
    try:
        folder_cfg = config_from_diffusers_vae(config)
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    cfg = cfg or folder_cfg
    raw = read_state_dict(folder, weights_name=DIFFUSERS_WEIGHTS)
    sd = diffusers_vae_to_ours(raw, source=str(folder))
    if not any(k.startswith("bn.") for k in sd):
        scale = float(config.get("scaling_factor", 1.0))
        shift = float(config.get("shift_factor") or 0.0)
        log.warning(
            "%s has no latent BatchNorm; using its scaling_factor=%s, shift_factor=%s as bn "
            "statistics (call LatentNorm.fit_statistics for per-channel ones)",
            folder,
            scale,
            shift,
        )
        sd.update(_stand_in_bn(cfg, scale, shift))
    return sd, cfg


def _load_official_folder(folder: Path, cfg: VAEConfig | None) -> tuple[dict, VAEConfig]:
    config_file = folder / "config.json"
    try:
        folder_cfg = config_from_official_vae(read_json(config_file))
    except ConfigError as e:
        raise CheckpointError(f"{config_file}: {e}") from e
    cfg = cfg or folder_cfg
    raw: dict[str, torch.Tensor] = {}
    for file in _official_weight_files(folder):
        raw.update(_read_prefixed(file, OFFICIAL_VAE_PREFIX))
    if not raw:
        raise CheckpointError(f"{folder}: no {OFFICIAL_VAE_PREFIX}* tensors")
    return official_vae_to_ours(raw, cfg, source=str(folder)), cfg


def _load_original_file(file: Path, cfg: VAEConfig) -> dict[str, torch.Tensor]:
    keys = _safetensors_keys(file)
    anchor = "encoder.conv_in.weight"
    prefixes = [k[: -len(anchor)] for k in keys if k.endswith(anchor)]
    if not prefixes:
        raise CheckpointError(f"{file}: no '{anchor}': not a VAE in the original layout")
    prefix = min(prefixes, key=len)  # "", "first_stage_model.", "model.vae_model.", ...
    raw = _read_prefixed(file, prefix)
    # SD-style files keep the quant convs at the top level; FLUX.2 / Cheers inside encoder/decoder.
    for top, inner in (
        ("quant_conv.", "encoder.quant_conv."),
        ("post_quant_conv.", "decoder.post_quant_conv."),
    ):
        for k in [k for k in raw if k.startswith(top)]:
            raw[inner + k[len(top) :]] = raw.pop(k)
    sd = official_vae_to_ours(raw, cfg, source=str(file))
    if not any(k.startswith("bn.") for k in sd):
        log.warning(
            "%s has no latent BatchNorm; using identity statistics (call "
            "LatentNorm.fit_statistics)",
            file,
        )
        sd.update(_stand_in_bn(cfg, 1.0, 0.0))
    return sd


def load_vae_folder(path: str | Path, cfg: VAEConfig | None = None) -> dict[str, torch.Tensor]:
    """Read a VAE checkpoint in any supported layout; return a state dict of ``VAE(cfg)``.

    ``path`` may be:

    * a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or its
      ``.index.json``), or a pipeline folder with such a ``vae/`` subfolder: ``cfg`` defaults
      to :func:`config_from_diffusers_vae` of it. A VAE without BatchNorm (``AutoencoderKL``)
      gets ``bn`` statistics equal to its ``scaling_factor`` / ``shift_factor``;
    * an official Cheers checkpoint folder (``config.json`` with ``vae_encoder_config`` +
      ``model.safetensors``): the ``model.vae_model.*`` sub-tree;
    * a single safetensors file in the original layout (BFL ``ae.safetensors``, or the
      VAE inside a larger file): ``cfg`` is required.

    The result is checked against ``VAE(cfg)``: missing, unexpected or mis-shaped keys
    raise ``CheckpointError`` naming them.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
            path = path / "vae"
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json (expected a diffusers or Cheers folder)")
        config = read_json(path / "config.json")
        official = "vae_encoder_config" in config
        if official:
            sd, cfg = _load_official_folder(path, cfg)
        else:
            sd, cfg = _load_diffusers_folder(path, cfg)
    elif path.is_file() and path.suffix == ".safetensors":
        if cfg is None:
            raise CheckpointError(f"{path}: a single original-layout file needs a VAEConfig")
        official = True
        sd = _load_original_file(path, cfg)
    else:
        raise CheckpointError(f"{path}: not a VAE folder or .safetensors file")

    with torch.device("meta"):
        shape_only = VAE(cfg)  # names and shapes only, no memory
    display = (lambda k: official_vae_name(k, cfg)) if official else None
    fit_report(shape_only, sd, source=str(path), display=display).check("VAE")
    return sd

"""Typed configs, the flavour table, and strict YAML / dotted-override loading.

Every config is a ``@dataclass(kw_only=True)``. ``from_dict`` rebuilds one from plain
data and refuses unknown keys or values of the wrong type, naming the dotted key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cheers.errors import ConfigError

# --------------------------------------------------------------------------- components


@dataclass(kw_only=True)
class LLMConfig:
    """Qwen2 / Qwen2.5 / Qwen3 decoder-only transformer."""

    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_hidden_layers: int = 28
    num_attention_heads: int = 12
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen2); Qwen3 sets it
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True
    attention_bias: bool = True  # bias on q/k/v (Qwen2: yes, Qwen3: no)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"llm.hidden_size={self.hidden_size} is not divisible by "
                    f"llm.num_attention_heads={self.num_attention_heads}"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"llm.num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"llm.num_key_value_heads={self.num_key_value_heads}"
            )


@dataclass(kw_only=True)
class VAEConfig:
    """KL autoencoder in the original latent-diffusion layout (FLUX.2 type).

    ``num_res_blocks`` follows that layout: the encoder has ``num_res_blocks`` residual
    blocks per level, the decoder ``decoder_num_res_blocks + 1``.
    """

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    decoder_ch: int = 128
    decoder_ch_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    decoder_num_res_blocks: int = 2
    z_channels: int = 32
    norm_groups: int = 32
    latent_patch: int = 2  # the latent is patchified 2x2 before the BatchNorm
    bn_eps: float = 1e-4
    # latent channels 0-2 are the image's RGB average-pooled to the latent grid (False for every
    # released VAE): colour is then linear in the latent, so a mix of latents decodes to a mix of colours
    pooled_rgb_latent: bool = False

    @property
    def downsample(self) -> int:
        """Pixels per latent cell after patchify (8 * 2 = 16 at the reference)."""
        return 2 ** (len(self.ch_mult) - 1) * self.latent_patch

    @property
    def latent_channels(self) -> int:
        """Channels of the patchified latent (32 * 4 = 128 at the reference)."""
        return self.z_channels * self.latent_patch**2


@dataclass(kw_only=True)
class SiglipConfig:
    """SigLIP / SigLIP2 (fixed resolution) vision transformer."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    patch_size: int = 16
    image_size: int = 512
    num_channels: int = 3
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    # the attention-pooling head of released checkpoints: stored and loaded, output never used
    use_head: bool = True


@dataclass(kw_only=True)
class TokenizerConfig:
    """The unified vision tokenizer: VAE -> pixel decoder -> SigLIP2 -> 2x2 compressor."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    siglip: SiglipConfig = field(default_factory=SiglipConfig)
    image_size: int = 512
    compressor_hidden: int | None = None  # None: 4 x siglip width (the official MLP)
    compressor_ln_eps: float = 1e-5
    # scale every LLM token the compressor emits to this RMS (None: unscaled, as released): trained
    # from scratch, the image tokens otherwise grow until they drown the prompt in the residual stream
    compressor_out_rms: float | None = None
    # Add a trainable linear map of each LLM token's 2x2 latent cells to its compressor output
    # (not in the released model, whose LLM sees xt only through its pixel decoder and SigLIP2,
    # both trained with the rest; the shapes demo keeps its tiny ones frozen)
    latent_to_llm: bool = False


@dataclass(kw_only=True)
class FlowHeadConfig:
    """The cascaded flow-matching head. Widths come from the LLM (stage A) and SigLIP (stage B)."""

    stage_a_blocks: int = 7
    stage_a_heads: int = 12
    stage_a_kv_heads: int = 2
    stage_b_blocks: int = 3
    stage_b_heads: int = 16
    stage_b_kv_heads: int = 2  # the official code takes these from the text config
    mlp_ratio: int = 4
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    gate_ln_eps: float = 1e-5
    time_freq_dim: int = 256
    # the sinusoid reads t * time_scale; the released model uses t in [0, 1] as is, which leaves
    # most of its 128 frequencies (1e-4 .. 1 rad per unit t) nearly constant over [0, 1]
    time_scale: float = 1.0
    # Add a trainable linear map of xt to stage B's input at every latent cell, after the gate
    # (not in the released model, whose stage B sees xt only as SigLIP patch embeddings)
    latent_to_stage_b: bool = False
    # "official": stage-B RoPE positions are arange(N/2) repeated twice (the released model);
    # "raster": 0..N-1.
    stage_b_positions: Literal["official", "raster"] = "official"


# an edit starts from its source latent at t = 1 - strength: the paper's edits start at t = 0.1
EDIT_STRENGTH = 0.9
# the longest answer decoded unless told otherwise (tokens)
ANSWER_TOKENS = 128
# the ODE samplers of image generation: euler is the released model's, heun the second-order one
SAMPLERS = ("euler", "heun")


@dataclass(kw_only=True)
class TransportConfig:
    """Flow-matching time sampling, target and sampler defaults (see flow_head/transport.py)."""

    time_sampling: Literal["uniform", "shifted"] = "uniform"
    train_shift: float = 1.0  # for time_sampling="shifted"
    # what the head's output means; the loss is always on the velocity x1 - x0.
    prediction: Literal["velocity", "x1"] = "velocity"
    # with prediction="x1" the velocity is v = (x1_pred - xt) / max(1 - t, x1_loss_t_min), in the
    # loss and in sampling: the clamp bounds the 1 / (1 - t)^2 weight on nearly clean times
    x1_loss_t_min: float = 0.05
    # what the flow loss compares: "velocity" (released: MSE to x1 - x0, an x1 error weighed by
    # 1 / (1 - t)^2) or "x1" (the implied clean latent, so the noisy times that decide the layout
    # count as much as the clean ones); use "x1" with a small x1_loss_t_min, or the sampler's
    # velocity undershoots near t = 1
    loss_target: Literal["velocity", "x1"] = "velocity"
    cfg_drop_rate: float = 0.2
    sample_steps: int = 80
    sample_shift: float = 0.5
    cfg_scale: float = 9.5
    # classifier-free guidance only for lo <= t <= hi, the conditional velocity alone elsewhere
    # (Kynkaanniemi et al. 2024); [0, 1], every step, is the released sampler
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # the official sampler takes one extra Euler step of size 1/N past t = 1
    official_last_step: bool = True

    def __post_init__(self) -> None:
        iv = self.cfg_interval
        if len(iv) != 2 or not 0.0 <= iv[0] <= iv[1] <= 1.0:
            raise ConfigError(f"transport.cfg_interval={iv}: expected [lo, hi] with 0 <= lo <= hi <= 1")


@dataclass(kw_only=True)
class SpecialTokens:
    """Token ids the sequence builder needs (defaults: Qwen2.5 ids of the released model)."""

    pad: int = 151643  # <|endoftext|>
    chat_start: int = 151644  # <|im_start|>
    eos: int = 151645  # <|im_end|>
    image: int = 151665  # <image>: understanding placeholder
    image_gen: int = 151666  # <image_gen>: generation placeholder
    im_start: int = 151667  # opens an image block
    im_end: int = 151668  # closes an image block
    no_mean: int = 151669  # CFG null token


@dataclass(kw_only=True)
class ModelConfig:
    """The whole Cheers model."""

    flavour: str = "custom"  # a FLAVOURS name the other keys override; "custom": every key as given
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    tokens: SpecialTokens = field(default_factory=SpecialTokens)
    max_seq_len: int = 4096
    # T2I prompts without an image get a dummy image block prepended (official quirk)
    dummy_image_prefix: bool = True

    def __post_init__(self) -> None:
        tok = self.tokenizer
        if tok.image_size % tok.vae.downsample:
            raise ConfigError(
                f"tokenizer.image_size={tok.image_size} is not a multiple of the latent cell "
                f"size {tok.vae.downsample}"
            )
        if tok.vae.downsample != tok.siglip.patch_size:
            raise ConfigError(
                f"the latent grid must equal the SigLIP patch grid: VAE cell {tok.vae.downsample} px "
                f"!= tokenizer.siglip.patch_size={tok.siglip.patch_size}"
            )
        if (tok.image_size // tok.siglip.patch_size) % 2:
            raise ConfigError(
                f"the SigLIP patch grid {tok.image_size // tok.siglip.patch_size} must be even "
                "for the 2x2 compressor"
            )
        if self.llm.hidden_size % self.head.stage_a_heads:
            raise ConfigError(
                f"llm.hidden_size={self.llm.hidden_size} not divisible by head.stage_a_heads"
            )
        if tok.siglip.hidden_size % self.head.stage_b_heads:
            raise ConfigError(
                f"tokenizer.siglip.hidden_size={tok.siglip.hidden_size} not divisible by "
                "head.stage_b_heads"
            )

    @property
    def latent_grid(self) -> int:
        """Side of the latent / SigLIP patch grid (32 at 512 px)."""
        return self.tokenizer.image_size // self.tokenizer.siglip.patch_size

    @property
    def tokens_per_image(self) -> int:
        """LLM tokens per image after the 2x2 compressor (256 at 512 px)."""
        return (self.latent_grid // 2) ** 2


# --------------------------------------------------------------------------- flavours


def _flavour_cheers_1_5b() -> ModelConfig:
    return ModelConfig(flavour="cheers-1.5b")


def _flavour_debug() -> ModelConfig:
    """Tiny: 64 px images, 4x4 latent grid, 4 LLM tokens per image, a 2-layer LLM."""
    return ModelConfig(
        flavour="debug",
        llm=LLMConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
        tokenizer=TokenizerConfig(
            image_size=64,
            vae=VAEConfig(
                ch=32,
                ch_mult=[2, 1, 1, 1],
                num_res_blocks=1,
                decoder_ch=32,
                decoder_ch_mult=[2, 1, 1, 1],
                decoder_num_res_blocks=0,
                z_channels=8,
            ),
            siglip=SiglipConfig(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                patch_size=16,
                image_size=64,
                use_head=False,
            ),
        ),
        head=FlowHeadConfig(
            stage_a_blocks=2, stage_a_heads=4, stage_a_kv_heads=2,
            stage_b_blocks=1, stage_b_heads=4, stage_b_kv_heads=2,
        ),
        # ids 0..7: where ``train_bpe`` puts the special tokens of a tokenizer trained on the fly
        tokens=SpecialTokens(
            pad=0, chat_start=1, eos=2, image=3, image_gen=4, im_start=5, im_end=6, no_mean=7,
        ),
        max_seq_len=512,
    )


def _flavour_shapes() -> ModelConfig:
    """The ``shapes`` flavour: the whole Cheers architecture, small enough to train on a CPU.

    Where it departs from the released model, it is for a reason that holds at this size
    (evidence in benchmarks/RESULTS.md, "Shapes world"): ``transport.prediction="x1"``, since
    direct velocity prediction leaves speckle; ``transport.loss_target="x1"`` with a small
    ``x1_loss_t_min`` and training times shifted towards noise, since the prompt decides the
    colour near the noise end, which the velocity loss and uniform times starve (the shapes
    ladder); ``tokenizer.compressor_out_rms``, since image
    tokens trained from scratch otherwise grow until the prompt no longer moves them;
    ``head.time_scale``, so that t in [0, 1] spans the time frequencies; ``vae.pooled_rgb_latent``,
    so that a mix of latents decodes to a mix of colours, not another hue; ``latent_to_llm`` and
    ``latent_to_stage_b``, so that the LLM tokens and stage B read the noisy latent directly, not
    only through the frozen pixel decoder and semantic encoder; plain Euler to t = 1 and no dummy
    image prefix.
    """
    return ModelConfig(
        flavour="shapes",
        llm=LLMConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0),
        tokenizer=TokenizerConfig(
            image_size=64,
            vae=VAEConfig(ch=16, ch_mult=[1, 2, 4], num_res_blocks=1, decoder_ch=16, decoder_ch_mult=[1, 2, 4],
                          decoder_num_res_blocks=0, z_channels=4, norm_groups=8, pooled_rgb_latent=True),
            siglip=SiglipConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                patch_size=8, image_size=64, use_head=False),
            compressor_hidden=256,
            compressor_out_rms=0.05,  # image tokens at the scale of word embeddings, or they drown the prompt
            latent_to_llm=True,
        ),
        head=FlowHeadConfig(stage_a_blocks=2, stage_a_heads=6, stage_a_kv_heads=2, stage_b_blocks=2,
                            stage_b_heads=4, stage_b_kv_heads=2, mlp_ratio=2, stage_b_positions="raster",
                            time_scale=1000.0, latent_to_stage_b=True),
        transport=TransportConfig(prediction="x1", loss_target="x1", x1_loss_t_min=0.05, time_sampling="shifted",
                                  train_shift=0.33, cfg_drop_rate=0.1, sample_steps=20, sample_shift=1.0,
                                  cfg_scale=3.0, official_last_step=False),
        tokens=SpecialTokens(pad=0, chat_start=1, eos=2, image=3, image_gen=4, im_start=5, im_end=6, no_mean=7),
        max_seq_len=256,
        dummy_image_prefix=False,
    )


FLAVOURS: dict[str, typing.Callable[[], ModelConfig]] = {
    "debug": _flavour_debug,
    "shapes": _flavour_shapes,
    "cheers-1.5b": _flavour_cheers_1_5b,
}


def flavour(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a named flavour."""
    if name not in FLAVOURS:
        raise ConfigError(f"unknown flavour {name!r}; known: {', '.join(sorted(FLAVOURS))}")
    return FLAVOURS[name]()


# --------------------------------------------------------------------------- strict loading


def _check_value(tp: Any, value: Any, key: str) -> Any:
    """Coerce ``value`` to type ``tp`` or raise ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} fits none of {tp}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s} (valid keys of {prefix or cls.__name__}: "
            f"{', '.join(sorted(names))})"
        )
    kwargs = {k: _check_value(hints[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, JSON-able dict of a config."""
    return dataclasses.asdict(cfg)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins."""
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "model.llm.hidden_size=64"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(value, str):
            try:  # YAML 1.1 reads "1e-4" (no dot) as a string; on the command line it is a number
                value = float(value) if any(ch.isdigit() for ch in value) else value
            except ValueError:
                pass
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {p} is set both as a value and a section")
        node[parts[-1]] = value
    return out


# options that were removed, with the value that behaves as the code does now: config.json files
# written before hold them, and load while they hold that value
_REMOVED_TRANSPORT = {"flow_loss_weight": 1.0, "logit_normal_mean": 0.0, "logit_normal_std": 1.0}


def _drop_removed(data: dict[str, Any]) -> dict[str, Any]:
    transport = data.get("transport")
    if not isinstance(transport, dict) or not set(transport) & set(_REMOVED_TRANSPORT):
        return data
    transport = dict(transport)
    for key, same in _REMOVED_TRANSPORT.items():
        if key in transport and transport.pop(key) != same:
            raise ConfigError(f"model.transport.{key} was removed; only {same} (its old default) still loads")
    return {**data, "transport": transport}


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a dict that may name a base ``flavour`` and override parts of it."""
    data = _drop_removed(dict(data))
    name = data.get("flavour")
    if name is not None and name != "custom":  # "custom": every field given, no base
        if name not in FLAVOURS:
            raise ConfigError(f"model.flavour: unknown flavour {name!r}; known: {', '.join(sorted(FLAVOURS))}")
        data = merge(to_dict(flavour(name)), data)
    return from_dict(ModelConfig, data, prefix="model.")


def recipe_names() -> list[str]:
    """Names of the recipes that ship with the package (``configs/*.yaml``, installed as
    ``cheers.configs``)."""
    from importlib.resources import files

    return sorted(f.name[: -len(".yaml")] for f in files("cheers.configs").iterdir() if f.name.endswith(".yaml"))


def recipe_path(recipe: str | Path) -> Path:
    """The YAML file of a recipe given by path (an existing file) or by the name of a shipped
    one (``shapes``, ``shapes.yaml``, or ``configs/shapes.yaml`` as the README writes it,
    wherever the package is installed); raises ConfigError naming the shipped names."""
    path = Path(recipe)
    if path.is_file():
        return path
    from importlib.resources import as_file, files

    name = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    if str(path.parent) in (".", "configs") and name in recipe_names():
        # installed packages are plain folders (setup.py has no zip_safe), so the path stays valid
        with as_file(files("cheers.configs") / f"{name}.yaml") as shipped:
            return Path(shipped)
    raise ConfigError(f"config file not found: {recipe} (nor a shipped recipe: the names are "
                      f"{', '.join(recipe_names())})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def save_json(cfg: Any, path: str | Path) -> None:
    """Write a config as pretty JSON (the ``config.json`` beside every checkpoint)."""
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

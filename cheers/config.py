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
    # latent channels 0-2 are the image's RGB average-pooled to the latent grid (the encoder's
    # own outputs there are dropped); False for every released VAE. The shapes flavour uses it:
    # colour is then linear in the latent, so a half-confident prediction decodes to a faded
    # colour of the right hue (with a learned latent, halfway from the background to red
    # decoded green or black)
    pooled_rgb_latent: bool = False
    # with pooled_rgb_latent: latent channel 3 is the share of each cell covered by anything
    # that is not the plain background ``alpha_background`` (RGB in [0, 1]; a pixel at least
    # ``alpha_full_distance`` from it in some channel counts as fully covered), scaled to
    # [-1, 1]. The mean of many colours is close to a grey background, so a prompt that names
    # no colour asked the pooled RGB channels for nothing visible; the coverage channel says
    # where an object is whatever its colour. Off in every flavour: after 300 s, a reference conv
    # U-Net (benchmarks/shapes_reference_unet.py) went from colors 0.23 to 0.39-0.53 with it, and
    # the Cheers probes did not gain (benchmarks/RESULTS.md, session 15)
    pooled_alpha_latent: bool = False
    alpha_background: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    alpha_full_distance: float = 0.34

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
    # Scale every LLM token the compressor emits to this RMS (None: unscaled, as released).
    # A model trained from scratch otherwise grows the image tokens without bound (RMS
    # 0.07 -> 19 in the shapes demo) until they drown the prompt in the residual stream.
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
    # Give every head block a depthwise 3x3 convolution over its token grid (before the MLP;
    # not in the released head, off in every flavour). A plain DiT trained briefly on shapes
    # latents broke its samples into many small dots without it and drew whole blobs with it;
    # in the whole shapes model it did not raise GenEval (benchmarks/RESULTS.md, session 13)
    grid_conv: bool = False
    # "conv": stage B is a one-level convolutional U-Net (stage_b_blocks residual blocks per level,
    # modulated by the time embedding; cheers/flow_head/conv_stage.py) instead of DiT blocks.
    # Not in the released head; off in every flavour. With prompt_condition and the x1 loss, a
    # 300 s text-to-image probe drew compact objects (colors 0.172, against 0.000 with the DiT
    # stage B), but the 15-minute demo did not gain (benchmarks/RESULTS.md, session 14)
    stage_b_kind: Literal["dit", "conv"] = "dit"
    stage_b_conv_width: int | None = None  # channels of the conv stage B (None: the SigLIP width)
    # Add a linear map of the prompt state (the LLM's final state at the <im_start> before the
    # image, which has read the prompt and not the image) to both stages' time embedding.
    # Not in the released head, whose stages read the prompt only through the image tokens
    prompt_condition: bool = False


@dataclass(kw_only=True)
class TransportConfig:
    """Flow-matching time sampling, target and sampler defaults (see flow_head/transport.py)."""

    time_sampling: Literal["uniform", "logit_normal", "shifted"] = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0
    train_shift: float = 1.0  # for time_sampling="shifted"
    # what the head's output means; the loss is always on the velocity x1 - x0.
    prediction: Literal["velocity", "x1"] = "velocity"
    # with prediction="x1" the velocity is v = (x1_pred - xt) / max(1 - t, x1_loss_t_min), in the
    # loss and in sampling: the clamp bounds the 1 / (1 - t)^2 weight on nearly clean times
    x1_loss_t_min: float = 0.05
    # what the flow loss compares: "velocity" (the released model: MSE to x1 - x0, which weighs
    # an x1 error by 1 / (1 - t)^2) or "x1" (MSE of the implied clean latent, the same weight
    # at every t: the noisy times, where the layout is decided, count as much as the clean ones).
    # Use "x1" with a small x1_loss_t_min (0.05): with a larger clamp a head trained to the true
    # x1 makes the sampler's velocity undershoot near t = 1 (the shapes flavour's 0.25 fits only
    # the velocity loss, under which the head learns to absorb the clamp)
    loss_target: Literal["velocity", "x1"] = "velocity"
    flow_loss_weight: float = 1.0
    cfg_drop_rate: float = 0.2
    sample_steps: int = 80
    sample_shift: float = 0.5
    cfg_scale: float = 9.5
    # classifier-free guidance only for lo <= t <= hi, the conditional velocity alone elsewhere
    # (guidance in a limited interval, Kynkaanniemi et al. 2024). [0, 1]: every step, as released,
    # and in every flavour. On shapes models, starting at t = 0.2-0.5 removed most empty images
    # (a prompt with no colour guided away from the null prompt's busier average), but the
    # objects that appeared were mostly misdrawn and colour adherence fell (RESULTS, session 16)
    cfg_interval: list[float] = field(default_factory=lambda: [0.0, 1.0])
    # the official sampler takes one extra Euler step of size 1/N past t = 1
    official_last_step: bool = True

    def __post_init__(self) -> None:
        iv = self.cfg_interval
        if len(iv) != 2 or not 0.0 <= iv[0] <= iv[1] <= 1.0:
            raise ConfigError(f"transport.cfg_interval={iv}: expected [lo, hi] with 0 <= lo <= hi <= 1")


@dataclass(kw_only=True)
class AlignConfig:
    """Representation alignment of the generated image (REPA, Yu et al. 2024). Not in the
    released model; off (``weight`` 0) in every flavour unless set.

    During text-to-image training, the LLM's image-token states after layer ``layer`` (they
    read the noisy latent) pass through a small MLP, and the loss adds ``weight`` times
    (1 - cosine similarity) between its output and the semantic encoder's features of the
    clean image (each LLM token against its 2x2 SigLIP cells; a constant target: no gradient
    flows into the encoder through it). The LLM is thus asked to see the clean image's
    semantics through the noise early in its depth. On the shapes world
    it cost 10% of the steps and moved no score, in 300 s probes or the 15-minute demo
    (benchmarks/RESULTS.md, session 17).
    """

    weight: float = 0.0
    layer: int = 2  # 1 .. llm.num_hidden_layers
    proj_hidden: int = 512

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise ConfigError(f"align.weight={self.weight} must be >= 0")
        if self.layer < 1:
            raise ConfigError(f"align.layer={self.layer} must be >= 1 (layers count from 1)")
        if self.proj_hidden < 1:
            raise ConfigError(f"align.proj_hidden={self.proj_hidden} must be >= 1")


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

    flavour: str = "custom"
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    head: FlowHeadConfig = field(default_factory=FlowHeadConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
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
        if self.align.weight > 0 and self.align.layer > self.llm.num_hidden_layers:
            raise ConfigError(f"align.layer={self.align.layer} is past the LLM's "
                              f"{self.llm.num_hidden_layers} layers")
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


FLAVOURS: dict[str, typing.Callable[[], ModelConfig]] = {
    "debug": _flavour_debug,
    "cheers-1.5b": _flavour_cheers_1_5b,
}


def register_flavour(name: str, builder: typing.Callable[[], ModelConfig]) -> None:
    """Add a named flavour (used by the shapes world)."""
    FLAVOURS[name] = builder


def flavour(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a named flavour."""
    if name == "shapes" and name not in FLAVOURS:
        import cheers.shapes.flavour  # noqa: F401  (registers itself)
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


def model_config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """A ModelConfig from a dict that may name a base ``flavour`` and override parts of it."""
    data = dict(data)
    name = data.get("flavour")
    if name == "shapes":
        flavour(name)  # registers it
    if name is not None and name in FLAVOURS:
        base = to_dict(flavour(name))
        data = merge(base, data)
    return from_dict(ModelConfig, data, prefix="model.")


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

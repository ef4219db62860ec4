"""Typed configuration for every part of SFTok.

One letter set everywhere (DESIGN §1): B batch, K latent tokens, N proxy positions, V teacher
codebook, C token size, Q tokenizer codebook, W width, S decode steps.

All configs are frozen dataclasses. `ExperimentConfig` is the whole resolved configuration of a
trial (what a preset names and `--set key=value` overrides); `override()` applies dotted-path
overrides with type checking, and `to_dict()` / `from_dict()` round-trip through JSON/YAML.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    """ViT over [class ; patches ; K latent queries] -> K tokens of C dims."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    # The reference reinterprets (B, K, W) as (B, W, K, 1) with a plain reshape before the 1x1
    # conv_out (golden README item 2). Only imported official checkpoints set this.
    legacy_reshape: bool = False


@dataclass(frozen=True)
class QuantizerConfig:
    kind: Literal["vq", "optvq"] = "optvq"
    codebook_size: int = 8192  # Q
    commitment: float = 0.25  # DESIGN §1, paper Table 6
    codebook_weight: float = 1.0
    # OptVQ Sinkhorn: the cost (Euclidean distance minus its min) is multiplied by epsilon.
    sinkhorn_epsilon: float = 10.0
    sinkhorn_iters: int = 5
    # The reference runs Sinkhorn at inference too (ids depend on the batch); we default to the
    # batch-independent nearest code and keep the reference behaviour selectable (DESIGN §1).
    assign_at_inference: Literal["nearest", "sinkhorn"] = "nearest"


@dataclass(frozen=True)
class DecoderConfig:
    """ViT over [class ; N proxy tokens ; K condition tokens] -> B x N x V logits."""

    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class TeacherConfig:
    """MaskGIT-VQGAN (golden README item 7). Downsampling factor = 2 ** (len(channel_mult) - 1)."""

    hidden_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    codebook_size: int = 1024  # V
    # Where the weights come from: "train" (stage 0 on the preset's data) or "pretrained" (a file
    # in the official key layout: `weights` path, or the Hugging Face repo when online).
    source: Literal["train", "pretrained"] = "pretrained"
    weights: str | None = None
    hf_repo: str = "fun-research/TiTok"
    hf_filename: str = "maskgit-vqgan-imagenet-f16-256.bin"

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class TokenizerConfig:
    image_size: int = 256
    num_latent_tokens: int = 64  # K
    token_size: int = 32  # C
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # Stage-3 "fine-tuned decoder": pixels through the soft path (softmax(logits) @ teacher
    # codebook -> a trainable copy of the teacher decoder), golden README item 6.
    finetune_decoder: bool = False


@dataclass(frozen=True)
class DecodeConfig:
    """Multi-step masked decoding at inference (DESIGN §1 'Inference')."""

    steps: int = 8  # S
    schedule: Literal["arccos", "cosine", "linear", "square", "sqrt"] = "arccos"
    temperature: float = 0.0  # Gumbel temperature tau; annealed as tau * (1 - r); 0 = argmax
    confidence_noise: float = 0.0  # scale of Gumbel noise added to confidences


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    source: Literal["embedded", "folder", "webdataset"] = "embedded"
    path: str | None = None  # folder root / shard pattern; its validation counterpart below
    val_path: str | None = None
    image_size: int = 32
    # Embedded data: this many deterministic crops per training photo / per validation photo.
    train_crops_per_image: int = 64
    val_crops_per_image: int = 8
    # Folder data: "random" crops for training (the paper's preprocessing), or the fixed
    # "center" crop (+ the stream's flip): a finite pool whose teacher ids are computed once.
    train_crop: Literal["random", "center"] = "random"
    num_workers: int = 0
    seed: int = 0


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + linear warm-up + cosine to end_lr (paper Table 6)."""

    lr: float = 1.0e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 1.0e-4
    warmup_steps: int = 10_000
    end_lr: float = 1.0e-5
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0


@dataclass(frozen=True)
class StageConfig:
    """One training stage. Stage 1 and 2 differ only in `replacement` (DESIGN §1)."""

    steps: int = 1000
    batch_size: int = 32
    grad_accum: int = 1
    replacement: Literal["none", "vanilla", "sfvr"] = "sfvr"
    replace_ratio: float = 1.0  # sfvr: probability a visible position takes the step-1 argmax
    mask_schedule: Literal["arccos", "cosine", "linear", "square", "sqrt"] = "arccos"
    unmasked_weight: float = 0.1  # CE weight of visible positions (paper Table 6)
    quantizer_weight: float = 1.0
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float = 0.999  # 0 disables EMA
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    # Teacher ids M_g: "cache" looks them up when the training data is a finite pool
    # (sftok.train.teacher_ids; encoded once), "encode" runs the teacher on every batch.
    teacher_ids: Literal["cache", "encode"] = "cache"
    log_every: int = 10
    ckpt_every: int = 500
    # Stage 3 only (pixel-space fine-tuning through the soft path).
    l2_weight: float = 1.0
    lpips_weight: float = 1.0
    gan_weight: float = 0.5
    gan_start: int = 20_000
    lecam_weight: float = 0.001
    discriminator: Literal["patchgan", "dino"] = "patchgan"


@dataclass(frozen=True)
class TeacherTrainConfig:
    """Stage 0: train a small VQGAN teacher where no pretrained one exists."""

    steps: int = 2000
    batch_size: int = 32
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2.0e-4, betas=(0.5, 0.9), weight_decay=0.0, warmup_steps=100, end_lr=2.0e-5))
    commitment: float = 0.25
    l2_weight: float = 1.0
    lpips_weight: float = 0.0
    gan_weight: float = 0.0
    gan_start: int = 0
    log_every: int = 50
    ckpt_every: int = 500


@dataclass(frozen=True)
class TrainConfig:
    teacher: TeacherTrainConfig = field(default_factory=TeacherTrainConfig)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(replacement="none"))
    stage2: StageConfig = field(default_factory=StageConfig)
    stage3: StageConfig = field(default_factory=lambda: StageConfig(
        replacement="none", optim=OptimConfig(betas=(0.9, 0.999))))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    decode_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    trace_steps: int = 8  # S of the Figure-4a per-step trace
    batch_size: int = 32
    max_images: int | None = None  # None: the whole validation split
    temperature: float = 0.0
    seed: int = 0
    metrics: tuple[str, ...] = ("psnr", "ssim", "lpips", "rfid", "is", "tokens")
    grid_images: int = 8


# --------------------------------------------------------------------------------------------
# The whole trial
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExperimentConfig:
    preset: str = "tiny"
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        validate(self)


def validate(cfg: ExperimentConfig) -> None:
    """Cross-field checks; raise ConfigError naming the fields involved."""
    t, tok = cfg.teacher, cfg.tokenizer
    if tok.image_size % tok.encoder.patch_size:
        raise ConfigError("tokenizer.encoder.patch_size",
                          f"must divide tokenizer.image_size={tok.image_size}")
    if tok.image_size % t.downsample:
        raise ConfigError("teacher.channel_mult",
                          f"downsampling x{t.downsample} must divide image_size={tok.image_size}")
    if cfg.data.image_size != tok.image_size:
        raise ConfigError("data.image_size",
                          f"{cfg.data.image_size} != tokenizer.image_size={tok.image_size}")
    for path, w, h in [("tokenizer.encoder", tok.encoder.width, tok.encoder.heads),
                       ("tokenizer.decoder", tok.decoder.width, tok.decoder.heads)]:
        if w % h:
            raise ConfigError(f"{path}.heads", f"must divide width={w}")
    for name in ("stage1", "stage2", "stage3"):
        st = getattr(cfg.train, name)
        if not 0.0 <= st.replace_ratio <= 1.0:
            raise ConfigError(f"train.{name}.replace_ratio", "must be in [0, 1]")


def proxy_grid(cfg: ExperimentConfig) -> int:
    """Side of the teacher's code grid; N = proxy_grid ** 2."""
    return cfg.tokenizer.image_size // cfg.teacher.downsample


# --------------------------------------------------------------------------------------------
# Dict round-trip and dotted overrides
# --------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad config value; `field` is the dotted path of the offending field."""

    def __init__(self, field_path: str, message: str):
        self.field = field_path
        super().__init__(f"{field_path}: {message}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict (tuples become lists), JSON/YAML-safe."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; used for MLflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a (partial) nested dict; unknown keys and bad types raise."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        fpath = f"{path}{key}"
        if key not in names:
            raise ConfigError(fpath, f"unknown field (known: {', '.join(sorted(names))})")
        kwargs[key] = _coerce(hints[key], value, fpath)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(path.rstrip(".") or cls.__name__, str(e)) from e


def override(cfg: Any, overrides: dict[str, Any]) -> Any:
    """Return a copy of `cfg` with dotted-path overrides applied, e.g. {'train.stage2.steps': 5}.

    Values may be strings (from `--set key=value`); they are parsed as YAML scalars and checked
    against the field's type.
    """
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(".".join(parts[: i + 1]), "unknown config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(dotted, "unknown field")
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value != "" else value
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, path + ".")
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {list(args)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(path, f"bad value {value!r}: {'; '.join(errors)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(path, f"expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 (PyYAML) reads exponent numbers without a dot, e.g. `1e-4`, as strings.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(path, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return value
    return value

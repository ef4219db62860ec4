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
    # tau, the paper's "randomize temperature" (Table 6: 1.0): Gumbel noise of scale tau*(1-r) at
    # step r on the sampling *and* on the confidence used for re-masking, as the reference
    # sampler does. 0 = argmax with a deterministic order (the golden decode).
    temperature: float = 0.0
    # Advanced: a separate scale for the confidence noise; None = `temperature` (the paper).
    confidence_noise: float | None = None

    @property
    def confidence_scale(self) -> float:
        """The Gumbel scale (before annealing) of the confidence noise."""
        return self.temperature if self.confidence_noise is None else self.confidence_noise


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
    # Autocast dtype of the training forward. fp16 gets a dynamic loss scaler (the paper's
    # choice, Table 6); bf16 needs none (fp32's exponent range). See presets._paper.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # The SFVR step-1 pass (no grad; its argmax fills the visible positions) runs in float32
    # with autocast off, as the reference's `generate_guided_mask` does (it sits outside the
    # autocast wrapper): under bf16/fp16 near-tied logits can flip the argmax. False: autocast.
    sfvr_pass_fp32: bool = True
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
    # Stage 3 trains the decoder and the pixel decoder; the released code also trains the pixel
    # codebook (`pixel_quantize`, the soft path's V×Z table) while encoder and quantizer stay
    # frozen. The paper does not say; default = the released code.
    train_pixel_codebook: bool = True


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
    # Stage 3 input is guided like stage 2 (Table 6: "Guided Mask True, Single Step False").
    stage3: StageConfig = field(default_factory=lambda: StageConfig(
        replacement="sfvr", replace_ratio=1.0, optim=OptimConfig(betas=(0.9, 0.999))))


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalConfig:
    decode_steps: tuple[int, ...] = (1, 2, 4, 8, 16)
    trace_steps: int = 8  # S of the Figure-4a per-step trace
    batch_size: int = 32
    max_images: int | None = None  # None: the whole validation split
    # None: `ExperimentConfig.decode.temperature` (one knob, DecodeConfig); a number overrides
    # it for evaluation only. Every decode draws from a generator seeded with `seed`.
    temperature: float | None = None
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


# --------------------------------------------------------------------------------------------
# Validation: the range of every field, then the checks across fields
# --------------------------------------------------------------------------------------------

# The metric groups `sftok.evaluate` computes (one owner: the evaluator and the specs use it).
EVAL_METRICS = ("psnr", "ssim", "lpips", "rfid", "is", "tokens")


def _min(lo: float) -> tuple[Any, str]:
    return (lambda v: v >= lo), f"must be >= {lo}"


_POS = ((lambda v: v > 0), "must be > 0")
_UNIT = ((lambda v: 0.0 <= v <= 1.0), "must be in [0, 1]")
_EACH_POS_INT = ((lambda v: len(v) > 0 and all(x >= 1 for x in v)),
                 "must be a non-empty list of integers >= 1")
_OPT_POS_INT = ((lambda v: v is None or v >= 1), "must be >= 1 (or null for all)")
_OPT_NONNEG = ((lambda v: v is None or v >= 0), "must be >= 0 (or null for the default)")

# Per config class: field -> (check, what the value must be). Every numeric field has an entry
# (tests/test_config.py checks that), so a value out of range is refused where the config is
# built (`--dry-run` included), naming the field, and never reaches a trial.
_RANGES: dict[str, dict[str, tuple[Any, str]]] = {
    "EncoderConfig": {"width": _min(1), "depth": _min(1), "heads": _min(1), "mlp_ratio": _POS,
                      "patch_size": _min(1)},
    "DecoderConfig": {"width": _min(1), "depth": _min(1), "heads": _min(1), "mlp_ratio": _POS},
    "QuantizerConfig": {"codebook_size": _min(2), "commitment": _min(0),
                        "codebook_weight": _min(0), "sinkhorn_epsilon": _POS,
                        "sinkhorn_iters": _min(1)},
    "TeacherConfig": {"hidden_channels": _min(1), "channel_mult": _EACH_POS_INT,
                      "num_res_blocks": _min(1), "z_channels": _min(1), "codebook_size": _min(2)},
    "TokenizerConfig": {"image_size": _min(1), "num_latent_tokens": _min(1),
                        "token_size": _min(1)},
    "DecodeConfig": {"steps": _min(1), "temperature": _min(0),
                     "confidence_noise": _OPT_NONNEG},
    "DataConfig": {"image_size": _min(1), "train_crops_per_image": _min(1),
                   "val_crops_per_image": _min(1), "num_workers": _min(0), "seed": _min(0)},
    "OptimConfig": {"lr": _POS, "betas": ((lambda v: all(0.0 <= b < 1.0 for b in v)),
                                          "must both be in [0, 1)"),
                    "weight_decay": _min(0), "warmup_steps": _min(0), "end_lr": _min(0),
                    "grad_clip": ((lambda v: v >= 0), "must be >= 0 (0 = no clipping)")},
    "StageConfig": {"steps": _min(1), "batch_size": _min(1), "grad_accum": _min(1),
                    "replace_ratio": _UNIT, "unmasked_weight": _min(0),
                    "quantizer_weight": _min(0),
                    "ema_decay": ((lambda v: 0.0 <= v < 1.0), "must be in [0, 1) (0 = no EMA)"),
                    "log_every": _min(1), "ckpt_every": _min(1), "l2_weight": _min(0),
                    "lpips_weight": _min(0), "gan_weight": _min(0), "gan_start": _min(0),
                    "lecam_weight": _min(0)},
    "TeacherTrainConfig": {"steps": _min(1), "batch_size": _min(1), "commitment": _min(0),
                           "l2_weight": _min(0), "lpips_weight": _min(0), "gan_weight": _min(0),
                           "gan_start": _min(0), "log_every": _min(1), "ckpt_every": _min(1)},
    "EvalConfig": {"decode_steps": _EACH_POS_INT,
                   "trace_steps": ((lambda v: v >= 0), "must be >= 0 (0 = no trace)"),
                   "batch_size": _min(1), "max_images": _OPT_POS_INT, "temperature": _OPT_NONNEG,
                   "seed": _min(0),
                   "metrics": ((lambda v: len(v) > 0 and set(v) <= set(EVAL_METRICS)),
                               f"must be a non-empty list of {', '.join(EVAL_METRICS)}"),
                   "grid_images": _min(0)},
    "ExperimentConfig": {"seed": _min(0)},
}


def check_ranges(cfg: Any, path: str = "") -> None:
    """Range-check every field of `cfg` and of the configs nested in it (ConfigError names the
    dotted field, its value and the allowed range)."""
    rules = _RANGES.get(type(cfg).__name__, {})
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        where = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, where + ".")
        elif f.name in rules:
            ok, what = rules[f.name]
            if not ok(value):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(where, f"{what}, got {shown!r}")


def validate(cfg: ExperimentConfig) -> None:
    """Range checks of every field, then cross-field checks; ConfigError names the field."""
    check_ranges(cfg)
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
        self.message = message
        super().__init__(f"{field_path}: {message}")

    def __reduce__(self):  # survives pickling (Ray sends a trial's error to the driver)
        return (type(self), (self.field, self.message))


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

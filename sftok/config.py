"""Typed configuration for every part of SFTok.

One letter set everywhere (DESIGN §1): B batch, K latent tokens, N proxy positions, V teacher
codebook, C token size, Q tokenizer codebook, W width, S decode steps.

All configs are frozen dataclasses. `ExperimentConfig` is the whole resolved configuration of a
trial (what a preset names and `--set key=value` overrides); `override()` applies dotted-path
overrides with type checking, and `to_dict()` / `from_dict()` round-trip through JSON/YAML.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
import weakref
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
    # Where the weights come from: "train" (stage 0 on the preset's data), "pretrained" (a file
    # in the official key layout: `weights` path, or the Hugging Face repo when online) or
    # "shipped" (a teacher released with the library, `sftok/released/<shipped>.*`, the way
    # the paper presets load the released MaskGIT-VQGAN; issue 20).
    source: Literal["train", "pretrained", "shipped"] = "pretrained"
    weights: str | None = None
    hf_repo: str = "fun-research/TiTok"
    hf_filename: str = "maskgit-vqgan-imagenet-f16-256.bin"
    shipped: str | None = None
    # The weights file's sha256 (hex) the config was made for; a different file fails to load
    # with one line. None: not checked (a shipped teacher is always checked against its manifest).
    sha256: str | None = None

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
    # Embedded data: this many deterministic crops per training photo / per validation photo
    # (with fresh_crops: the number of samples per photo in one epoch of the training stream).
    train_crops_per_image: int = 64
    val_crops_per_image: int = 8
    # Folder data: "random" crops for training (the paper's preprocessing), or the fixed
    # "center" crop (+ the stream's flip): a finite pool whose teacher ids are computed once.
    train_crop: Literal["random", "center"] = "random"
    # Embedded training data that generalises (issue 9, sftok/data/embedded.py): a new crop for
    # every training sample instead of a fixed pool; the extra photos of scikit-image (greyscale
    # photos and textures), scikit-learn and matplotlib; this fraction of dead-leaves images.
    fresh_crops: bool = False
    extra_photos: bool = False
    dead_leaves: float = 0.0
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
    batch_size: int = 32  # one micro-batch (one forward pass; OptVQ's Sinkhorn balances within it)
    # Micro-batches per optimiser step over all workers: the effective batch is
    # batch_size × grad_accum at any number of workers W, each running grad_accum / W of them
    # (sftok.distributed; a W that does not divide it is refused).
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
    # Micro-batches per optimiser step over all workers (sftok.distributed), as for the stages.
    grad_accum: int = 1
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
    # Fractions r of the teacher ids revealed to the decoder when measuring the information
    # revealed tokens give it (paper §3.2; sftok.evaluate.revealed), with every trace. () = off.
    reveal_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)


# --------------------------------------------------------------------------------------------
# Class-conditional generation on tokenizer tokens (paper §3.3, §4.3, Table 2)
# --------------------------------------------------------------------------------------------

GuidanceSchedule = Literal["constant", "linear", "power-cosine"]


@dataclass(frozen=True)
class GeneratorModelConfig:
    """Bidirectional (BERT-style) transformer over [class token ; K image tokens].

    Paper §4.3 "consistent with the original MaskGIT"; the released generator config (the
    authors' fork of TiTok's `configs/training/generator/maskgit.yaml`): 24 layers, width 768,
    16 heads, MLP 3072 (ratio 4), dropout 0.1.
    """

    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1


@dataclass(frozen=True)
class GeneratorTrainConfig:
    """Generator training (the authors' `configs/sftok_maskgit.yaml`): AdamW 2e-4, betas
    (0.9, 0.96), wd 0.03, 10k warm-up then cosine to 1e-5, clip 1.0, EMA, bf16, label smoothing
    0.1, weight 0.1 on visible tokens, class dropped to the null class with probability 0.1,
    1M steps at 128 images per GPU."""

    steps: int = 1_000_000
    batch_size: int = 128
    grad_accum: int = 1
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=2.0e-4, betas=(0.9, 0.96), weight_decay=0.03, warmup_steps=10_000, end_lr=1.0e-5))
    label_dropout: float = 0.1  # P(class -> null class), for classifier-free guidance
    label_smoothing: float = 0.1
    unmasked_weight: float = 0.1
    mask_schedule: Literal["arccos", "cosine", "linear", "square", "sqrt"] = "arccos"
    ema_decay: float = 0.999  # 0 disables EMA; sampling uses the EMA weights when on
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    log_every: int = 50
    ckpt_every: int = 5000


@dataclass(frozen=True)
class SamplingConfig:
    """Guided multi-step sampling (released SFTok inference config: tau 1.0, s 4.5 constant).

    Guidance convention of the released code: logits = cond + s_k * (cond - uncond), s_k = 0 is
    the conditional model alone; `linear` uses s*k/S at step k, `power-cosine` the MDT schedule
    (see sftok.generation.guidance). tau anneals as tau*(1 - r) on sampling and confidence.
    """

    steps: int = 8
    schedule: Literal["arccos", "cosine", "linear", "square", "sqrt"] = "arccos"
    temperature: float = 1.0  # tau
    guidance_scale: float = 4.5  # s
    guidance_schedule: GuidanceSchedule = "constant"
    guidance_power: float = 3.0  # power-cosine exponent
    softmax_annealing: bool = False  # divide logits by 0.5 + 0.8 * (1 - r)


@dataclass(frozen=True)
class GenerationEvalConfig:
    """gFID protocol: `samples_per_class` per class (50 for ImageNet's 50k), uint8 images, FID
    against reference statistics of the training set (`reference_stats`: an .npz with mu/sigma,
    e.g. ADM's VIRTUAL_imagenet256_labeled.npz; None: computed from the training images)."""

    samples_per_class: int = 50
    batch_size: int = 125
    seed: int = 0
    reference_stats: str | None = None
    max_reference_images: int | None = None  # None: every training image (centre view)
    max_heldout_images: int | None = None  # calibration rows; None: the whole held-out split
    metrics: tuple[str, ...] = ("gfid", "is", "calibration", "tokens")
    grid_classes: int = 8  # classes drawn in the per-class sample grids
    grid_per_class: int = 8
    # Guidance sweep (s x schedule x tau), sampled from one trained generator; empty = the
    # `sampling` value alone. Each point logs eval/sweep/<schedule>/s<s>/tau<tau>/<metric>.
    sweep_scales: tuple[float, ...] = ()
    sweep_schedules: tuple[GuidanceSchedule, ...] = ()
    sweep_temperatures: tuple[float, ...] = ()


@dataclass(frozen=True)
class GenerationConfig:
    """The `generation` stage: pre-tokenise the training data with a finished tokenizer, train
    the generator on the tokens, sample class-balanced images, score them."""

    tokenizer: str | None = None  # checkpoint dir; None: the trial's own tokenizer stages
    num_classes: int = 1000  # C
    flips: bool = True  # also tokenise the horizontally flipped images
    # How token ids are assigned when pre-tokenising (recorded with the cache); nearest makes an
    # image's tokens independent of the rest of its batch (DESIGN §1).
    assign: Literal["nearest", "sinkhorn"] = "nearest"
    model: GeneratorModelConfig = field(default_factory=GeneratorModelConfig)
    train: GeneratorTrainConfig = field(default_factory=GeneratorTrainConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


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
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def __post_init__(self) -> None:
        validate(self)


# --------------------------------------------------------------------------------------------
# Validation: the range of every field, then the checks across fields
# --------------------------------------------------------------------------------------------

# The metric groups `sftok.evaluate` computes (one owner: the evaluator and the specs use it).
EVAL_METRICS = ("psnr", "ssim", "lpips", "rfid", "is", "tokens")
GENERATION_METRICS = ("gfid", "is", "calibration", "tokens")


def _metric_names(known: tuple[str, ...]) -> tuple[Any, str]:
    return (lambda v: len(v) > 0 and set(v) <= set(known)), \
        f"must be a non-empty list of {', '.join(known)}"


def _min(lo: float) -> tuple[Any, str]:
    return (lambda v: v >= lo), f"must be >= {lo}"


_POS = ((lambda v: v > 0), "must be > 0")
_UNIT = ((lambda v: 0.0 <= v <= 1.0), "must be in [0, 1]")
_UNIT_OPEN = ((lambda v: 0.0 <= v < 1.0), "must be in [0, 1)")
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
                   "val_crops_per_image": _min(1), "num_workers": _min(0), "seed": _min(0),
                   "dead_leaves": _UNIT_OPEN},
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
    "TeacherTrainConfig": {"steps": _min(1), "batch_size": _min(1), "grad_accum": _min(1),
                           "commitment": _min(0),
                           "l2_weight": _min(0), "lpips_weight": _min(0), "gan_weight": _min(0),
                           "gan_start": _min(0), "log_every": _min(1), "ckpt_every": _min(1)},
    "EvalConfig": {"decode_steps": _EACH_POS_INT,
                   "trace_steps": ((lambda v: v >= 0), "must be >= 0 (0 = no trace)"),
                   "batch_size": _min(1), "max_images": _OPT_POS_INT, "temperature": _OPT_NONNEG,
                   "seed": _min(0),
                   "metrics": _metric_names(EVAL_METRICS),
                   "grid_images": _min(0),
                   "reveal_fractions": ((lambda v: all(0.0 < r < 1.0 for r in v)
                                         and len({round(100 * r) for r in v}) == len(v)),
                                        "must be fractions in (0, 1), distinct in percent")},
    "ExperimentConfig": {"seed": _min(0)},
    # Generation (Table 2)
    "GenerationConfig": {"num_classes": _min(1)},
    "GeneratorModelConfig": {"width": _min(1), "depth": _min(1), "heads": _min(1),
                             "mlp_ratio": _POS, "dropout": _UNIT_OPEN},
    "GeneratorTrainConfig": {"steps": _min(1), "batch_size": _min(1), "grad_accum": _min(1),
                             "label_dropout": _UNIT_OPEN, "label_smoothing": _UNIT_OPEN,
                             "unmasked_weight": _min(0),
                             "ema_decay": ((lambda v: 0.0 <= v < 1.0),
                                           "must be in [0, 1) (0 = no EMA)"),
                             "log_every": _min(1), "ckpt_every": _min(1)},
    # s may be negative (s = -1 is the unconditional model alone); it must be a number.
    "SamplingConfig": {"steps": _min(1), "temperature": _min(0),
                       "guidance_scale": ((lambda v: math.isfinite(v)), "must be finite"),
                       "guidance_power": _POS},
    "GenerationEvalConfig": {"samples_per_class": _min(1), "batch_size": _min(1),
                             "seed": _min(0), "max_reference_images": _OPT_POS_INT,
                             "max_heldout_images": _OPT_POS_INT, "grid_classes": _min(0),
                             "grid_per_class": _min(0),
                             "metrics": _metric_names(GENERATION_METRICS),
                             "sweep_scales": ((lambda v: all(math.isfinite(x) for x in v)),
                                              "must all be finite"),
                             "sweep_temperatures": ((lambda v: all(x >= 0 for x in v)),
                                                    "must all be >= 0")},
}


def check_ranges(cfg: Any, path: str = "") -> None:
    """Range-check every field of `cfg` and of the configs nested in it (ConfigError names the
    dotted field, its value and the allowed range)."""
    if _in_range.get(id(cfg), _dead)() is cfg:
        return
    rules = _RANGES.get(type(cfg).__name__, {})
    for name, section in _layout(type(cfg)):
        value = getattr(cfg, name)
        where = f"{path}{name}"
        if section:
            if value is not None:
                check_ranges(value, where + ".")
        elif name in rules:
            ok, what = rules[name]
            if not ok(value):
                shown = list(value) if isinstance(value, tuple) else value
                raise ConfigError(where, f"{what}, got {shown!r}")
    _remember_in_range(cfg)


# Sections whose ranges passed, by id (a weak reference tells a live one from a reused id).
# Configs are frozen, so a section that passed once always passes: an override rebuilds the
# sections on its path, and only those are checked again (10,000 trials' configs share the
# rest).
_in_range: dict[int, weakref.ref] = {}


def _dead() -> None:
    return None


def _remember_in_range(cfg: Any) -> None:
    key = id(cfg)
    _in_range[key] = weakref.ref(cfg, lambda _ref: _in_range.pop(key, None))


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
    if t.source == "shipped" and not t.shipped:
        raise ConfigError("teacher.shipped", "is required with teacher.source=shipped (the name "
                                             "of a teacher in sftok/released/, e.g. tiny)")
    if t.sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", t.sha256):
        raise ConfigError("teacher.sha256", f"must be 64 lowercase hex digits, got {t.sha256!r}")
    if cfg.data.image_size != tok.image_size:
        raise ConfigError("data.image_size",
                          f"{cfg.data.image_size} != tokenizer.image_size={tok.image_size}")
    gen = cfg.generation.model
    for path, w, h in [("tokenizer.encoder", tok.encoder.width, tok.encoder.heads),
                       ("tokenizer.decoder", tok.decoder.width, tok.decoder.heads),
                       ("generation.model", gen.width, gen.heads)]:
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
    for name, section in _layout(type(cfg)):
        v = getattr(cfg, name)
        if section:
            v = None if v is None else to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[name] = v
    return out


@functools.cache
def _layout(cls: type) -> tuple[tuple[str, bool], ...]:
    """(field name, holds a config section) of each field of a config class, in order: a
    section is a field typed as a config class (or None). Walking a config by this plan rather
    than asking each value whether it is a dataclass is what keeps validating and serialising
    10,000 trials' configs to seconds."""
    def section(tp: Any) -> bool:
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            return any(section(a) for a in typing.get_args(tp))
        return dataclasses.is_dataclass(tp)

    return tuple((name, section(tp)) for name, tp in _type_hints(cls).items())


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
    hints = _type_hints(cls)
    names = hints.keys()
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
    against the field's type. The checks across fields run once, on the result (so two fields
    that must agree can change together). Sections no override touches are the same (frozen)
    objects as in `cfg`: expanding thousands of trials costs neither the time nor the memory of
    rebuilding every section of every trial.
    """
    # A sparse to_dict: only the sections on an override's path become dicts; from_dict
    # rebuilds those and keeps every other section as it is (`_coerce` passes instances).
    data = _fields_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if dataclasses.is_dataclass(child) and not isinstance(child, type):
                child = node[part] = _fields_dict(child)
            if not isinstance(child, dict):
                raise ConfigError(".".join(parts[: i + 1]), "unknown config section")
            node = child
        if parts[-1] not in node:
            raise ConfigError(dotted, "unknown field")
        if isinstance(value, str):
            import yaml

            value = yaml.safe_load(value) if value != "" else value
        node[parts[-1]] = value
    return from_dict(type(cfg), data)


def _fields_dict(cfg: Any) -> dict[str, Any]:
    """{field: value} of one dataclass instance, nested sections left as they are."""
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type of a config class (resolving the annotations' strings is
    most of the cost of building a config, so once per class)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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

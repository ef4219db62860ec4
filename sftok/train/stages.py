"""Stages 1-3 of SFTok training (DESIGN §1 'Stages (debias-and-fitting)').

- stage1, warm-up: replacement `none` (every proxy position masked, one-shot prediction).
- stage2, distribution alignment: replacement `sfvr` (or `vanilla` for the Table 3 baseline).
- stage3, optional fine-tuning in pixel space (`stage3.py`).

Stages 1/2 optimise the weighted token cross-entropy (masked 1, visible 0.1, normalised by the
weight sum) + quantizer_weight · quantizer loss, against the frozen teacher's ids M_g.

Stage N starts from stage N-1's final checkpoint (`init`). A stage's final checkpoint
(out_dir/final/model.safetensors) holds the **EMA weights when ema_decay > 0**, the raw weights
otherwise (final/stage.json says which); the raw weights stay in the last periodic checkpoint.

Batch semantics: `batch_size` is one micro-batch; an optimiser step sees batch_size·grad_accum
images (paper Table 6 stage 3: 8 per GPU × 8 GPUs = 64, accumulated twice).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sftok.checkpoint import save_model
from sftok.config import ExperimentConfig, StageConfig, to_dict
from sftok.teacher import FrozenTeacher
from sftok.train.ema import EMA
from sftok.train.loop import (
    Callback,
    LoopSpec,
    LoopTask,
    Precision,
    clip_and_step_async,
    compile_children,
    resolve_device,
    run_loop,
    to_images,
)
from sftok.train.losses import weighted_ce
from sftok.train.masking import build_proxy_inputs, sample_mask, step1_logits_fn
from sftok.train.optim import build_optimizer
from sftok.train.stage3 import PixelTask
from sftok.train.stage_setup import STAGES, build_tokenizer, load_init, stage_seed
from sftok.train.teacher_stage import teacher_identity


@dataclass
class StageResult:
    checkpoint: Path  # out_dir/final: model.safetensors (EMA weights if EMA on) + config.json
    steps: int
    metrics: dict[str, float]  # the last logged window
    history: list[dict[str, float]] = field(default_factory=list)  # every logged window


def stage_config(cfg: ExperimentConfig, stage: str) -> ExperimentConfig:
    """The resolved config a stage trains and saves (stage 3: finetune_decoder=True)."""
    if stage == "stage3" and not cfg.tokenizer.finetune_decoder:
        return dataclasses.replace(
            cfg, tokenizer=dataclasses.replace(cfg.tokenizer, finetune_decoder=True))
    return cfg


# Bump when the stage-training code changes what a stage produces for the same config; the
# source digest below catches code edits too, this marks intended format changes.
STAGE_FORMAT = 1


@functools.cache
def code_digest() -> str:
    """Hex digest of the `sftok` package's Python sources: part of every stage identity, so a
    result trained by other code (another checkout, an edit) is never reused."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def stage_identity(cfg: ExperimentConfig, stage: str, init_key: str | None) -> dict[str, Any]:
    """Everything a stage's trained result depends on (JSON-safe), for content addressing.

    The stage's resolved config (`stage_config`; minus `ckpt_every`, which changes only where
    periodic checkpoints fall, not the weights or the logged curve), the tokenizer, data (minus
    `num_workers`: the stream is exact with or without workers) and teacher configs (a trained
    teacher by its cache key, which covers its data and training; a pretrained one by its
    config and file), the seed (`stage_seed` derives masks, data order and init from it), the
    identity of the result the stage starts from (`init_key`, None for a fresh model), the
    stage format and the library's source digest. Not included: other stages' configs, decode
    and evaluation settings, the device and the trial's name.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    scfg = stage_config(cfg, stage)
    sdict = to_dict(getattr(scfg.train, stage))
    sdict.pop("ckpt_every", None)
    data = to_dict(cfg.data)
    data.pop("num_workers", None)
    return {"format": STAGE_FORMAT, "code": code_digest(), "stage": stage, "stage_config": sdict,
            "tokenizer": to_dict(scfg.tokenizer), "data": data,
            "teacher": teacher_identity(cfg), "seed": cfg.seed, "init": init_key}


def stage_key(identity: dict[str, Any]) -> str:
    """'<stage>-<16 hex>': the content address of a stage result with this identity."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    return f"{identity['stage']}-{hashlib.sha256(blob).hexdigest()[:16]}"


class TokenTask(LoopTask):
    """Stages 1 and 2: weighted token CE + quantizer loss (DESIGN §1)."""

    def __init__(self, cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher,
                 device: torch.device, init: Path | None = None):
        s: StageConfig = getattr(cfg.train, stage)
        self.name, self.cfg, self.scfg, self.teacher, self.device = stage, cfg, s, teacher, device
        seed = stage_seed(cfg, stage)
        torch.manual_seed(seed)  # initial weights and any dropout: reproducible per stage
        self.model = build_tokenizer(cfg, teacher).to(device)
        if init is not None:
            load_init(self.model, init)
        self.model.train()
        # Masks and replacement draws come from a generator on the device (no CPU draws copied
        # over every step); on CPU this is the same generator as before.
        self.generator = torch.Generator(device=device).manual_seed(seed + 1)
        self.precision = Precision(s.precision, device)
        self.optimizer = build_optimizer(self.model, s.optim, device)
        self.scaler = self.precision.scaler()
        self.ema = EMA(self.model, s.ema_decay) if s.ema_decay > 0 else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # fp16's scaler skips steps with inf gradients by design: only the loss is an error.
        self.finite_keys = ("loss",) if self.scaler.is_enabled() else ("loss", "grad_norm")
        if s.compile:
            compile_children(self.model)

    def step(self, batches: list[Any], step: int) -> dict[str, Tensor | float]:
        """One optimiser step. No host sync: the metrics stay 0-dim device tensors (run_loop
        reads them at logging boundaries and watches `finite_keys` there)."""
        s, model = self.scfg, self.model
        lr = self.begin_step(step, s.steps, s.optim)
        n = len(batches)
        loss_sum = ce_sum = q_sum = ce_m = ce_v = 0.0
        n_m = n_v = n_rep = 0
        for batch in batches:
            host = to_images(batch)
            images = host.to(self.device, non_blocking=True)
            targets = self.targets(host, images)  # M_g, B×N (no grad)
            b, num = targets.shape
            masked = sample_mask(s.replacement, b, num, s.mask_schedule, self.generator,
                                 self.device)
            with self.precision.autocast():
                q = model.encode(images)
                proxy = build_proxy_inputs(  # step-1 pass: same condition, no gradient
                    targets, masked, model.mask_id, s.replacement, s.replace_ratio,
                    first_step_fn=step1_logits_fn(model, q.z_q, s.sfvr_pass_fp32),
                    generator=self.generator)
                logits = model.decoder_logits(proxy.ids, q.z_q)
            ce = weighted_ce(logits, targets, masked, s.unmasked_weight)
            loss = ce.loss + s.quantizer_weight * q.loss.float()
            self.scaler.scale(loss / n).backward()
            loss_sum = loss_sum + loss.detach()
            ce_sum = ce_sum + ce.loss.detach()
            q_sum = q_sum + q.loss.detach().float()
            ce_m, ce_v = ce_m + ce.ce_sum_masked, ce_v + ce.ce_sum_visible
            n_m, n_v = n_m + ce.num_masked, n_v + ce.num_visible
            n_rep = n_rep + proxy.replaced.sum()
        grad_norm = clip_and_step_async(self.optimizer, self.scaler, self.params,
                                        s.optim.grad_clip)
        if self.ema is not None:
            self.ema.update(model)
        acc: dict[str, Tensor | float] = {
            "loss": loss_sum / n, "ce": ce_sum / n, "quant_loss": q_sum / n,
            "grad_norm": grad_norm, "ce_masked": ce_m / n_m.clamp_min(1),
            # replaced_frac: 0 when nothing is visible (stage 1), as before
            "replaced_frac": n_rep / n_v.clamp_min(1), "lr": lr}
        if s.replacement != "none":  # visible positions exist (n_v > 0 almost surely)
            acc["ce_visible"] = ce_v / n_v.clamp_min(1)
        return acc

    id_cache = None  # a TeacherIdCache when the training data is a finite pool

    def targets(self, host: Tensor, images: Tensor) -> Tensor:
        """The teacher ids M_g (B×N long, on the device) of a batch: `host` B×3×H×W as the
        stream gave it, `images` the same on the device. Looked up when cached, else encoded."""
        if self.id_cache is not None:
            ids = self.id_cache.lookup(host)
            if ids is not None:
                return ids.to(self.device, non_blocking=True)
        return self.teacher.encode_ids(images)


def build_stage_task(cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher,
                     device: torch.device, init: Path | None = None) -> LoopTask:
    """The stage's task (model, optimiser(s), EMA, generator, step) without data or files."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if stage == "stage3":
        return PixelTask(stage_config(cfg, stage), teacher, device, init=init)
    return TokenTask(cfg, stage, teacher, device, init=init)


def export_tokenizer(tmp: Path, task: LoopTask, cfg: ExperimentConfig) -> None:
    """final/model.safetensors (EMA weights if EMA is on) + final/config.json."""
    save_model(tmp, task.export_module(), cfg)


def train_stage(cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher, out_dir: Path,
                init: Path | None = None, callback: Callback | None = None,
                resume: bool = True, step_offset: int = 0,
                id_cache_dir: Path | None = None) -> StageResult:
    """Train one stage; resumable; returns immediately if out_dir already holds a finished one.

    stage: "stage1" | "stage2" | "stage3". init: previous stage's final checkpoint dir.
    callback(step_offset + step, metrics) every cfg.train.<stage>.log_every steps (metric names
    in docs/architecture.md). Raises NonFiniteLossError on a NaN/inf loss.
    id_cache_dir: where teacher-id caches of finite pools are kept (`teacher_ids`; None: built
    in memory for this call). Used by stages 1-2 with `teacher_ids="cache"`.
    """
    from sftok.data import TrainStream, build_train_dataset

    out_dir = Path(out_dir)
    if resume:
        from sftok.train.loop import read_final

        done = read_final(out_dir)
        if done is not None:
            return StageResult(done.final_dir, done.steps, done.metrics, done.history)
    scfg = stage_config(cfg, stage)
    s: StageConfig = getattr(scfg.train, stage)
    device = resolve_device(cfg.device)
    teacher = teacher.to(device)
    task = build_stage_task(scfg, stage, teacher, device, init=init)
    train_ds = build_train_dataset(cfg.data)
    if isinstance(task, TokenTask) and s.teacher_ids == "cache":
        from sftok.train.teacher_ids import TeacherIdCache

        task.id_cache = TeacherIdCache.load_or_build(teacher, train_ds, id_cache_dir,
                                                     teacher_identity(cfg), device)
    stream = TrainStream(train_ds, s.batch_size, seed=stage_seed(cfg, stage),
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda")
    spec = LoopSpec(stage=stage, steps=s.steps, grad_accum=s.grad_accum,
                    images_per_step=s.batch_size * s.grad_accum, log_every=s.log_every,
                    ckpt_every=s.ckpt_every, config=to_dict(scfg))
    result = run_loop(task, stream, out_dir, spec,
                      export=lambda tmp, t: export_tokenizer(tmp, t, scfg),
                      callback=callback, resume=resume, step_offset=step_offset,
                      init_checkpoint=Path(init) if init is not None else None)
    return StageResult(result.final_dir, result.steps, result.metrics, result.history)

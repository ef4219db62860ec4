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
images (paper Table 6 stage 3: 8 per GPU × 8 GPUs = 64, accumulated twice), whatever the
number of workers W: each of them runs grad_accum / W micro-batches (`sftok.distributed`).
The gradient-carrying forward of a micro-batch is one module (`TokenStep`, stage 3's
`PixelStep`), which DDP wraps when W > 1; a stage result does not depend on W (beyond float
reduction order), so W is not part of its identity.
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
from torch import Tensor, nn

from sftok.checkpoint import save_model
from sftok.config import ExperimentConfig, StageConfig, to_dict
from sftok.distributed import SINGLE, Workers, accum_per_worker, accumulating, wrap_ddp
from sftok.teacher import FrozenTeacher
from sftok.tokenizer import SFTok
from sftok.train.ema import EMA
from sftok.train.loop import (
    Callback,
    LoopSpec,
    LoopTask,
    Precision,
    Ratio,
    clip_and_step_async,
    compile_children,
    resolve_device,
    run_loop,
    to_images,
)
from sftok.train.losses import weighted_ce
from sftok.train.masking import build_proxy_inputs, draw_micro, step1_logits_fn
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


def check_world_size(cfg: ExperimentConfig, stages: list[str], world_size: int) -> None:
    """ConfigError (one line) unless `world_size` workers can train every stage in `stages`
    ("stage0" = the teacher, when it is trained; "stage1".."stage3"; "generation") with the
    preset's effective batch: W must divide each one's grad_accum. For a campaign to refuse an
    impossible --workers-per-trial before any compute."""
    for stage in stages:
        if stage == "stage0":
            if cfg.teacher.source != "train":
                continue
            s, field = cfg.train.teacher, "train.teacher.grad_accum"
        elif stage == "generation":
            s, field = cfg.generation.train, "generation.train.grad_accum"
        else:
            s, field = getattr(stage_config(cfg, stage).train, stage), f"train.{stage}.grad_accum"
        accum_per_worker(s.grad_accum, s.batch_size, world_size, field)


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


class TokenStep(nn.Module):
    """The gradient-carrying forward of one stage-1/2 micro-batch: the module DDP wraps.

    encode -> the no-grad SFVR step-1 pass (on the same, unwrapped, tokenizer: it needs no
    gradient and no all-reduce) -> decoder logits -> weighted CE + quantizer loss. Returns the
    loss (with gradient) and detached sums for the metrics.
    """

    def __init__(self, model: SFTok, s: StageConfig, precision: Precision):
        super().__init__()
        self.model, self.s, self.precision = model, s, precision

    def forward(self, images: Tensor, targets: Tensor, masked: Tensor,
                coin: Tensor | None) -> dict[str, Tensor]:
        """images B×3×H×W, targets M_g B×N, masked B×N (True = masked), coin B×N | None."""
        s, model = self.s, self.model
        with self.precision.autocast():
            q = model.encode(images)
            proxy = build_proxy_inputs(  # step-1 pass: same condition, no gradient
                targets, masked, model.mask_id, s.replacement, s.replace_ratio,
                first_step_fn=step1_logits_fn(model, q.z_q, s.sfvr_pass_fp32), coin=coin)
            logits = model.decoder_logits(proxy.ids, q.z_q)
        ce = weighted_ce(logits, targets, masked, s.unmasked_weight)
        return {"loss": ce.loss + s.quantizer_weight * q.loss.float(),
                "ce": ce.loss.detach(), "quant_loss": q.loss.detach().float(),
                "ce_sum_masked": ce.ce_sum_masked, "ce_sum_visible": ce.ce_sum_visible,
                "num_masked": ce.num_masked, "num_visible": ce.num_visible,
                "replaced": proxy.replaced.sum()}


# Parameters a stage-1/2 step never uses (the pixel path, when finetune_decoder is on early).
PIXEL_PATH = ("model.pixel_decoder.", "model.pixel_quantize.")


class TokenTask(LoopTask):
    """Stages 1 and 2: weighted token CE + quantizer loss (DESIGN §1)."""

    def __init__(self, cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher,
                 device: torch.device, init: Path | None = None,
                 workers: Workers = SINGLE):
        self.set_workers(workers)
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
        self.step_forward = wrap_ddp(TokenStep(self.model, s, self.precision), workers, device,
                                ignore=PIXEL_PATH)

    def step(self, batches: list[Any], step: int) -> dict[str, Tensor | float]:
        """One optimiser step on this rank's micro-batches. No host sync: the metrics stay
        0-dim device tensors (run_loop reads them at logging boundaries and watches
        `finite_keys` there)."""
        s = self.scfg
        lr = self.begin_step(step, s.steps, s.optim)
        n = len(batches)
        hosts = [to_images(batch) for batch in batches]
        draws = self.micro_draws(n, lambda: draw_micro(
            s.replacement, hosts[0].shape[0], self.model.num_positions, s.mask_schedule,
            self.generator, self.device))
        loss_sum = ce_sum = q_sum = ce_m = ce_v = 0.0
        n_m = n_v = n_rep = 0
        for i, (host, d) in enumerate(zip(hosts, draws)):
            images = host.to(self.device, non_blocking=True)
            targets = self.targets(host, images)  # M_g, B×N (no grad)
            with accumulating(self.step_forward, last=i == n - 1):
                out = self.step_forward(images, targets, d.masked, d.coin)
                self.scaler.scale(out["loss"] / n).backward()
            loss_sum = loss_sum + out["loss"].detach()
            ce_sum = ce_sum + out["ce"]
            q_sum = q_sum + out["quant_loss"]
            ce_m, ce_v = ce_m + out["ce_sum_masked"], ce_v + out["ce_sum_visible"]
            n_m, n_v = n_m + out["num_masked"], n_v + out["num_visible"]
            n_rep = n_rep + out["replaced"]
        grad_norm = clip_and_step_async(self.optimizer, self.scaler, self.params,
                                        s.optim.grad_clip)
        if self.ema is not None:
            self.ema.update(self.model)
        acc: dict[str, Tensor | float | Ratio] = {
            "loss": loss_sum / n, "ce": ce_sum / n, "quant_loss": q_sum / n,
            "grad_norm": grad_norm, "ce_masked": Ratio(ce_m, n_m),
            # replaced_frac: 0 when nothing is visible (stage 1), as before
            "replaced_frac": Ratio(n_rep, n_v), "lr": lr}
        if s.replacement != "none":  # visible positions exist (n_v > 0 almost surely)
            acc["ce_visible"] = Ratio(ce_v, n_v)
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
                     device: torch.device, init: Path | None = None,
                     workers: Workers = SINGLE) -> LoopTask:
    """The stage's task (model, optimiser(s), EMA, generator, step) without data or files."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    if stage == "stage3":
        return PixelTask(stage_config(cfg, stage), teacher, device, init=init, workers=workers)
    return TokenTask(cfg, stage, teacher, device, init=init, workers=workers)


def export_tokenizer(tmp: Path, task: LoopTask, cfg: ExperimentConfig) -> None:
    """final/model.safetensors (EMA weights if EMA is on) + final/config.json."""
    save_model(tmp, task.export_module(), cfg)


def train_stage(cfg: ExperimentConfig, stage: str, teacher: FrozenTeacher, out_dir: Path,
                init: Path | None = None, callback: Callback | None = None,
                resume: bool = True, step_offset: int = 0,
                id_cache_dir: Path | None = None,
                workers: Workers = SINGLE) -> StageResult:
    """Train one stage; resumable; returns immediately if out_dir already holds a finished one.

    stage: "stage1" | "stage2" | "stage3". init: previous stage's final checkpoint dir.
    callback(step_offset + step, metrics) every cfg.train.<stage>.log_every steps (metric names
    in docs/architecture.md). Raises NonFiniteLossError on a NaN/inf loss.
    id_cache_dir: where teacher-id caches of finite pools are kept (`teacher_ids`; None: built
    in memory for this call). Used by stages 1-2 with `teacher_ids="cache"`.
    workers: the process group to train on (every rank calls this with the same arguments;
    out_dir on storage they all read); W must divide the stage's grad_accum (ConfigError).
    """
    from sftok.data import TrainStream, build_train_dataset
    from sftok.train.loop import read_final

    out_dir = Path(out_dir)
    scfg = stage_config(cfg, stage)
    s: StageConfig = getattr(scfg.train, stage)
    per_worker = accum_per_worker(s.grad_accum, s.batch_size, workers.world_size,
                                  f"train.{stage}.grad_accum")
    if resume:
        done = workers.on_main("reading the finished stage", lambda: read_final(out_dir))
        if done is not None:
            return StageResult(done.final_dir, done.steps, done.metrics, done.history)
    device = resolve_device(workers.device or cfg.device)
    teacher = teacher.to(device)
    task = build_stage_task(scfg, stage, teacher, device, init=init, workers=workers)
    train_ds = build_train_dataset(cfg.data)
    if isinstance(task, TokenTask) and s.teacher_ids == "cache":
        from sftok.train.teacher_ids import TeacherIdCache

        def ids() -> TeacherIdCache | None:
            return TeacherIdCache.load_or_build(teacher, train_ds, id_cache_dir,
                                                teacher_identity(cfg), device)

        # Built once: rank 0 stores it and the others load it; held in memory only (no cache
        # dir), rank 0's is sent to the others.
        task.id_cache = (workers.main_first("building the teacher-id cache", ids)
                         if id_cache_dir is not None
                         else workers.on_main("building the teacher-id cache", ids))
    stream = TrainStream(train_ds, s.batch_size, seed=stage_seed(cfg, stage),
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                         rank=workers.rank, world_size=workers.world_size)
    spec = LoopSpec(stage=stage, steps=s.steps, grad_accum=per_worker,
                    images_per_step=s.batch_size * s.grad_accum, log_every=s.log_every,
                    ckpt_every=s.ckpt_every, config=to_dict(scfg))
    result = run_loop(task, stream, out_dir, spec,
                      export=lambda tmp, t: export_tokenizer(tmp, t, scfg),
                      callback=callback, resume=resume, step_offset=step_offset,
                      init_checkpoint=Path(init) if init is not None else None)
    return StageResult(result.final_dir, result.steps, result.metrics, result.history)

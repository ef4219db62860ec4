"""Stage 3: pixel-space fine-tuning through the soft path (DESIGN §1, paper Table 6).

What trains: the token decoder, the tokenizer's own copy of the teacher decoder
(`pixel_decoder`) and, when `train_pixel_codebook` (default, as the released code does), the
pixel codebook (`pixel_quantize`, initialised from the teacher's codebook). The encoder and the
quantizer are frozen (requires_grad False); the encoder runs in eval mode, the quantizer in
train mode so that its assignment is the one training used (OptVQ: Sinkhorn over the batch),
not the eval-mode nearest code.

Decoder input: guided like stage 2 (Table 6 "Guided Mask True, Single Step False"): random
arccos masks, visible positions carry the step-1 argmax (`replacement: sfvr`, ratio 1.0), so
the decoder and the soft path see the partly filled inputs of decode steps 2..S.

Losses (logged names in brackets; Figures 9-14): l2_weight · L2 [l2] + lpips_weight · LPIPS
[lpips] (skipped with a warning when the VGG weights are absent) + gan_weight · hinge-G [gan_g]
from `gan_start` on; the quantizer loss [quant_loss] of the frozen quantizer is logged and
added to the total [loss] as in the reference (it carries no gradient). The discriminator
(discriminator.py) is updated from `gan_start` with 0.5·hinge-D [gan_d] + lecam_weight · LeCam
[lecam] on its own learning-rate schedule [disc_lr]. During the generator's update the
discriminator's parameters have requires_grad False, so none of the generator's gradient
reaches them (the reference leaks it; DESIGN says do not copy that).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftok.config import ExperimentConfig, StageConfig
from sftok.teacher import FrozenTeacher
from sftok.train.discriminator import Adversary
from sftok.train.ema import EMA
from sftok.train.loop import (
    LoopTask,
    Precision,
    clip_and_step_async,
    compile_children,
    to_images,
)
from sftok.train.losses import load_lpips, lpips_loss
from sftok.train.masking import build_proxy_inputs, sample_mask, step1_logits_fn
from sftok.train.optim import build_optimizer
from sftok.train.stage_setup import build_tokenizer, load_init, stage_seed


def trainable_prefixes(s: StageConfig) -> tuple[str, ...]:
    """Parameter-name prefixes stage 3 trains (module docstring)."""
    return ("decoder.", "pixel_decoder.") + (("pixel_quantize.",) if s.train_pixel_codebook
                                             else ())


def pixel_path_trained(init: Path) -> bool:
    """Whether the checkpoint `init` (a stage's final dir, or a model file) carries a trained pixel
    path: False for the result of stage 1 or 2 (its stage.json says so), True otherwise (a
    stage-3 result, a released checkpoint)."""
    meta = (init if init.is_dir() else init.parent) / "stage.json"
    if not meta.is_file():
        return True
    return json.loads(meta.read_text()).get("stage") not in ("stage1", "stage2")


@torch.no_grad()
def init_pixel_path(model: nn.Module, teacher: FrozenTeacher) -> None:
    """Copy the teacher's codebook and decoder into the tokenizer's pixel path."""
    model.pixel_quantize.embedding.weight.copy_(teacher.codebook())
    model.pixel_decoder.load_state_dict(teacher.model.decoder.state_dict(), strict=True)


def freeze_for_stage3(model: nn.Module, s: StageConfig) -> list[nn.Parameter]:
    """requires_grad only for `trainable_prefixes(s)`; returns the trainable parameters."""
    prefixes = trainable_prefixes(s)
    trainable = []
    for name, p in model.named_parameters():
        on = name.startswith(prefixes)
        p.requires_grad_(on)
        if on:
            trainable.append(p)
    return trainable


def set_stage3_mode(model: nn.Module) -> None:
    """Train mode, except the frozen encoder (eval). The frozen quantizer stays in train mode:
    its assignment must be the training one (Sinkhorn), and it has no other train-mode state."""
    model.train()
    model.encoder.eval()


class PixelTask(LoopTask):
    """Stage-3 step: frozen encode -> decoder logits -> soft pixels -> L2/LPIPS/GAN."""

    def __init__(self, cfg: ExperimentConfig, teacher: FrozenTeacher, device: torch.device,
                 init: Path | None = None):
        s: StageConfig = cfg.train.stage3
        self.name, self.cfg, self.scfg, self.teacher, self.device = "stage3", cfg, s, teacher, device
        seed = stage_seed(cfg, "stage3")
        torch.manual_seed(seed)
        self.model = build_tokenizer(cfg, teacher).to(device)
        missing = load_init(self.model, init, allow_missing=("pixel_",)) if init else None
        # The pixel path starts from the teacher (DESIGN §1) unless the init has a trained one:
        # a stage-1/2 checkpoint has none, or, when finetune_decoder was on from stage 1, an
        # untrained random one (no stage-1/2 loss reaches it).
        if init is None or missing or not pixel_path_trained(Path(init)):
            init_pixel_path(self.model, teacher)
        self.params = freeze_for_stage3(self.model, s)
        set_stage3_mode(self.model)
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.precision = Precision(s.precision, device)
        self.optimizer = build_optimizer(self.model, s.optim, device)  # trainable params only
        self.scaler = self.precision.scaler()
        self.ema = EMA(self.model, s.ema_decay) if s.ema_decay > 0 else None
        self.lpips = load_lpips(device) if s.lpips_weight > 0 else None
        self.adversary = (Adversary(s.discriminator, cfg.tokenizer.image_size, s.optim, device,
                                    self.precision, lecam_weight=s.lecam_weight,
                                    start=s.gan_start, total_steps=s.steps,
                                    generator=self.generator)
                          if s.gan_weight > 0 else None)
        # fp16's scaler skips steps with inf gradients by design: there the norms are no error.
        norms = () if self.scaler.is_enabled() else ("grad_norm", "disc_grad_norm")
        self.finite_keys = ("loss", *Adversary.FINITE_KEYS, *norms)
        if s.compile:
            compile_children(self.model)

    def step(self, batches: list[Any], step: int) -> dict[str, Tensor | float]:
        """One optimiser step (and, from gan_start, one discriminator step). No host sync: the
        metrics stay 0-dim device tensors, `finite_keys` are checked by `run_loop`."""
        s, model = self.scfg, self.model
        lr = self.begin_step(step, s.steps, s.optim)
        gan_on = self.adversary is not None and step >= s.gan_start
        n = len(batches)
        acc: dict[str, Tensor | float] = {}
        reals, fakes = [], []
        for batch in batches:
            images = to_images(batch).to(self.device, non_blocking=True)
            targets = self.teacher.encode_ids(images)  # M_g: for the diagnostic CE (+ masking)
            b, num = targets.shape
            masked = sample_mask(s.replacement, b, num, s.mask_schedule, self.generator,
                                 self.device)
            with torch.no_grad():
                q = model.encode(images)  # frozen encoder + quantizer (Sinkhorn assignment)
            z_q = q.z_q
            with self.precision.autocast():
                proxy = build_proxy_inputs(
                    targets, masked, model.mask_id, s.replacement, s.replace_ratio,
                    first_step_fn=step1_logits_fn(model, z_q, s.sfvr_pass_fp32),
                    generator=self.generator)
                logits = model.decoder_logits(proxy.ids, z_q)
                recon = model.pixels_from_logits(logits)
            recon = recon.float()
            parts = {"l2": F.mse_loss(recon, images), "quant_loss": q.loss.float()}
            loss = s.l2_weight * parts["l2"] + s.quantizer_weight * parts["quant_loss"]
            if self.lpips is not None:
                parts["lpips"] = lpips_loss(self.lpips, recon, images)
                loss = loss + s.lpips_weight * parts["lpips"]
            if gan_on:
                with self.precision.autocast():
                    parts["gan_g"] = self.adversary.generator_loss(recon)
                loss = loss + s.gan_weight * parts["gan_g"]
            self.scaler.scale(loss / n).backward()
            with torch.no_grad():
                parts["ce"] = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            for k, v in {"loss": loss, **parts}.items():
                acc[k] = acc.get(k, 0.0) + v.detach().float() / n
            reals.append(images)
            fakes.append(recon.detach())
        acc["grad_norm"] = clip_and_step_async(self.optimizer, self.scaler, self.params,
                                               s.optim.grad_clip)
        if self.ema is not None:
            self.ema.update(model)
        if gan_on:
            acc.update(self.adversary.update(reals, fakes, self.adversary.lr_at(step)))
        acc["lr"] = lr
        return acc

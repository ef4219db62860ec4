"""Generator training on pre-tokenised data, through the shared resumable loop (`run_loop`).

One optimiser step: a batch of (tokens B×K, labels B) from `TokenStream`; labels dropped to the
null class with p = 0.1; arccos masks; weighted, label-smoothed CE (`masking.py`); AdamW with
the released config (`GeneratorTrainConfig`); EMA. The exported model (final/model.safetensors)
holds the EMA weights when EMA is on: sampling uses them (released recipe).

Data parallelism (sftok.distributed): the generator's forward runs through DDP; the label drops
and masks are drawn for every micro-batch of the step on every rank; the token stream of rank r
yields every W-th batch. Dropout draws from each rank's own torch RNG (rank r > 0 reseeded),
so a W-worker generator with dropout equals the one-process one in distribution, not bitwise.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sftok.checkpoint import save_model
from sftok.config import ExperimentConfig, GeneratorTrainConfig, to_dict
from sftok.data.seeding import generator as seeded_generator
from sftok.data.seeding import mix
from sftok.distributed import SINGLE, Workers, accum_per_worker, accumulating, wrap_ddp
from sftok.generation.masking import generator_loss, mask_tokens
from sftok.generation.model import MaskGITGenerator, drop_labels
from sftok.generation.pretokenize import TokenSet
from sftok.schedules import random_mask
from sftok.train.ema import EMA
from sftok.train.loop import (
    Callback,
    LoopSpec,
    LoopTask,
    Precision,
    clip_and_step,
    resolve_device,
    run_loop,
    scalar,
)
from sftok.train.optim import build_optimizer

STAGE = "generation"


class TokenStream:
    """Infinite, resumable batches (tokens B×K, labels B) over a TokenSet.

    Epoch e visits the rows in the permutation drawn from (seed, e); batches span epochs. The
    state is (epoch, position), so a restored stream yields what the uninterrupted one would.
    rank / world_size: rank r yields the r-th batch of every W (the state counts all of them).
    """

    def __init__(self, tokens: TokenSet, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError("TokenStream: batch_size must be >= 1")
        self.tokens, self.batch_size, self.seed = tokens, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.tokens), generator=seeded_generator(self.seed, epoch))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = self._perm(self.epoch)
        while True:
            batches = []
            for _ in range(self.world_size):  # one round: a batch for every rank
                parts, need = [], self.batch_size
                while need:
                    if self.position == len(perm):
                        self.epoch, self.position = self.epoch + 1, 0
                        perm = self._perm(self.epoch)
                    take = min(need, len(perm) - self.position)
                    parts.append(perm[self.position:self.position + take])
                    self.position += take
                    need -= take
                batches.append(parts)
            rows = torch.cat(batches[self.rank])
            yield self.tokens.tokens[rows], self.tokens.labels[rows]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def build_generator(cfg: ExperimentConfig, num_codes: int, num_tokens: int) -> MaskGITGenerator:
    g = cfg.generation
    return MaskGITGenerator(g.model, num_codes, num_tokens, g.num_classes)


class GeneratorTask(LoopTask):
    """The generation stage's trainable state and its training step."""

    def __init__(self, cfg: ExperimentConfig, num_codes: int, num_tokens: int,
                 device: torch.device, seed: int, workers: Workers = SINGLE):
        self.set_workers(workers)
        t: GeneratorTrainConfig = cfg.generation.train
        self.name, self.tcfg, self.device = STAGE, t, device
        torch.manual_seed(seed)  # initial weights and dropout: reproducible
        self.model = build_generator(cfg, num_codes, num_tokens).to(device).train()
        if workers.rank > 0:  # the same initial weights; independent dropout per rank
            torch.manual_seed(mix(seed, workers.rank))
        self.generator = torch.Generator().manual_seed(seed + 1)  # label drops + masks
        self.precision = Precision(t.precision, device)
        self.optimizer = build_optimizer(self.model, t.optim, device)
        self.scaler = self.precision.scaler()
        self.ema = EMA(self.model, t.ema_decay) if t.ema_decay > 0 else None
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_forward = wrap_ddp(self.model, workers, device)  # its forward is the step's

    def step(self, batches: list[Any], step: int) -> dict[str, float]:
        t, model = self.tcfg, self.model
        lr = self.begin_step(step, t.steps, t.optim)
        n = len(batches)
        b, k = batches[0][0].shape

        def draw() -> tuple[torch.Tensor, torch.Tensor]:  # one micro-batch's, in their order
            gdev = self.generator.device
            drop = torch.rand(b, generator=self.generator, device=gdev)  # = drop_labels' draw
            return drop, random_mask(b, k, t.mask_schedule, self.generator, gdev)

        draws = self.micro_draws(n, draw)
        acc = {"loss": 0.0, "acc_masked": 0.0}
        for i, ((tokens, labels), (drop, masked)) in enumerate(zip(batches, draws)):
            tokens, labels = tokens.to(self.device), labels.to(self.device)
            labels = drop_labels(labels, t.label_dropout, model.null_label, draws=drop)
            ids, masked = mask_tokens(tokens, model.mask_id, masked=masked)
            with accumulating(self.step_forward, last=i == n - 1):
                with self.precision.autocast():
                    logits = self.step_forward(ids, labels)
                ce = generator_loss(logits, tokens, masked, t.unmasked_weight,
                                    t.label_smoothing)
                self.finite("loss", ce.loss)
                self.scaler.scale(ce.loss / n).backward()
            acc["loss"] += scalar(ce.loss) / n
            hit = (logits.detach().argmax(-1) == tokens) & masked
            acc["acc_masked"] += float(hit.sum()) / max(int(masked.sum()), 1) / n
        acc["grad_norm"] = clip_and_step(self.optimizer, self.scaler, self.params,
                                         t.optim.grad_clip, check=not self.workers.distributed)
        if self.workers.distributed:
            self.finite("grad_norm", acc["grad_norm"])
        if self.ema is not None:
            self.ema.update(model)
        acc["lr"] = lr
        return acc


@dataclass
class GeneratorResult:
    checkpoint: Path  # out_dir/final: model.safetensors (EMA weights if EMA on) + config.json
    steps: int
    metrics: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


def train_generator(cfg: ExperimentConfig, tokens: TokenSet, out_dir: Path,
                    callback: Callback | None = None, resume: bool = True,
                    step_offset: int = 0, workers: Workers = SINGLE) -> GeneratorResult:
    """Train the generator on `tokens` for cfg.generation.train.steps; resumable like a stage.

    Labels must lie in [0, cfg.generation.num_classes). callback(step_offset + step, metrics)
    with keys loss, acc_masked, grad_norm, lr, images_per_s. workers: train on these ranks.
    """
    t = cfg.generation.train
    c = cfg.generation.num_classes
    if len(tokens) == 0:
        raise ValueError("train_generator: no tokens")
    if int(tokens.labels.min()) < 0 or int(tokens.labels.max()) >= c:
        raise ValueError(f"train_generator: the data's class labels span "
                         f"[{int(tokens.labels.min())}, {int(tokens.labels.max())}] but "
                         f"generation.num_classes={c}; set generation.num_classes to at least "
                         f"{int(tokens.labels.max()) + 1}")
    per_worker = accum_per_worker(t.grad_accum, t.batch_size, workers.world_size,
                                  "generation.train.grad_accum")
    device = resolve_device(workers.device or cfg.device)
    seed = cfg.seed * 1000 + 50
    task = GeneratorTask(cfg, int(tokens.meta["codebook_size"]), tokens.tokens.shape[1], device,
                         seed, workers)
    stream = TokenStream(tokens, t.batch_size, seed=seed + 2, rank=workers.rank,
                         world_size=workers.world_size)
    spec = LoopSpec(stage=STAGE, steps=t.steps, grad_accum=per_worker,
                    images_per_step=t.batch_size * t.grad_accum, log_every=t.log_every,
                    ckpt_every=t.ckpt_every, config=to_dict(cfg))
    res = run_loop(task, stream, Path(out_dir), spec,
                   export=lambda tmp, tk: save_model(tmp, tk.export_module(), cfg),
                   callback=callback, resume=resume, step_offset=step_offset)
    return GeneratorResult(res.final_dir, res.steps, res.metrics, res.history)

"""Stage 0: the teacher (DESIGN §1 'Teacher').

Paper presets load the MaskGIT-VQGAN file (`cfg.teacher.weights`, or the Hugging Face repo when
online). Small presets cannot download it, so they *train* a small MaskGitVQGAN on the preset's
data: nearest-code VQ with straight-through gradients, codebook + commitment losses, L2
reconstruction, optional LPIPS and hinge-GAN terms. The result is cached under a key derived
from the data, teacher and teacher-training configs, so every trial sharing them reuses it.

Not in the paper (which never trains its teacher): dead-code restarts. Nearest-code VQ with a
small uniform-initialised codebook tends to use a handful of codes; every `RESET_EVERY` steps
(during the first 80% of training) the codes unused in that window are re-initialised to random
encoder outputs of the current batch (drawn from the task generator, so resume stays exact).

Data parallelism: the VQGAN's forward runs through DDP; every step all-reduces the code counts,
and a reset step gathers every rank's encoder outputs in the one-process order, so every rank
resets the same codes to the same vectors. The effective batch is batch_size × grad_accum at
any number of workers, as for the tokenizer stages.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sftok.checkpoint import CONFIG, save_model
from sftok.config import ExperimentConfig, TeacherConfig, to_dict
from sftok.distributed import SINGLE, Workers, accum_per_worker, accumulating, wrap_ddp
from sftok.filelock import exclusive_lock
from sftok.released import content_hash, load_shipped, read_manifest
from sftok.storage import (
    DamagedFileError,
    StorageFullError,
    check_writable,
    rebuilding,
    record_digests,
    set_aside,
    verify_digests,
    writing,
)
from sftok.teacher import FrozenTeacher, MaskGitVQGAN, load_teacher_weights
from sftok.train.checkpointing import remove_temporaries
from sftok.train.discriminator import Adversary
from sftok.train.loop import (
    LoopSpec,
    LoopTask,
    Precision,
    clip_and_step,
    resolve_device,
    run_loop,
    scalar,
    to_images,
)
from sftok.train.losses import load_lpips, lpips_loss
from sftok.train.optim import build_optimizer
from sftok.weights import WeightsFileError

# Bump when the teacher training code changes what it produces: old cache entries are ignored.
TEACHER_FORMAT = 1
RESET_EVERY = 20
WEIGHTS_FILE = "model.safetensors"  # sftok.checkpoint layout: load_model() reads the entry
RECORD = "teacher.json"  # written last: a finished teacher's record, with its files' digests
PUBLISHED_FILES = (WEIGHTS_FILE, CONFIG)  # what the record's digests cover


class TeacherUnavailableError(FileNotFoundError):
    """A pretrained teacher was asked for but its weights cannot be found or downloaded."""


# --------------------------------------------------------------------------------------------
# Cache key and public entry point
# --------------------------------------------------------------------------------------------


def teacher_cache_key(cfg: ExperimentConfig) -> str:
    """'teacher-<16 hex>' from everything that determines a trained teacher's weights.

    Included: data config (minus num_workers), teacher architecture, teacher-training config
    (minus log/checkpoint cadence), and TEACHER_FORMAT. Excluded: the trial seed (trials with different seeds share one teacher;
    it is trained with data.seed) and the pretrained-source fields. Not the number of workers
    (a W-worker teacher equals the one-process one up to float reduction order).
    """
    data = to_dict(cfg.data)
    data.pop("num_workers", None)
    teacher = to_dict(cfg.teacher)
    for k in ("source", "weights", "hf_repo", "hf_filename", "shipped", "sha256"):
        teacher.pop(k, None)
    train = to_dict(cfg.train.teacher)
    for k in ("log_every", "ckpt_every"):  # cadence only: same weights either way
        train.pop(k, None)
    if train.get("grad_accum") == 1:  # the default: keys from before the field stay valid
        train.pop("grad_accum")
    payload = {"format": TEACHER_FORMAT, "data": data, "teacher": teacher, "train": train}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"teacher-{digest[:16]}"


def teacher_identity(cfg: ExperimentConfig) -> str:
    """What identifies the teacher's weights: the stage-0 cache key of a trained teacher; a
    shipped one's content hash ('shipped-<16 hex of its sha256>', from its manifest, which
    loading checks against the file); for a pretrained file its pinned `teacher.sha256`, else
    its architecture, path and size (hashing a 300 MB file for every trial would cost more
    than it protects against)."""
    if cfg.teacher.source == "train":
        return teacher_cache_key(cfg)
    if cfg.teacher.source == "shipped":
        return f"shipped-{read_manifest(cfg.teacher.shipped)['sha256'][:16]}"
    if cfg.teacher.sha256 is not None:
        return f"pretrained-{cfg.teacher.sha256[:16]}"
    t = to_dict(cfg.teacher)
    size = None
    if cfg.teacher.weights and Path(cfg.teacher.weights).expanduser().is_file():
        size = Path(cfg.teacher.weights).expanduser().stat().st_size
    blob = json.dumps({"teacher": t, "size": size}, sort_keys=True)
    return f"pretrained-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def get_teacher(cfg: ExperimentConfig, cache_dir: Path, callback=None,
                train_if_missing: bool = True) -> FrozenTeacher:
    """The frozen teacher of `cfg` (on cfg.device).

    source="pretrained": `cfg.teacher.weights`, else the Hugging Face file when online, else a
    `TeacherUnavailableError` saying where to put the file and which --set to use.
    source="train": stage 0, trained once under cache_dir/teacher_cache_key(cfg) (a file lock
    serialises concurrent callers; a finished entry is loaded, never retrained, once its files
    match the digests recorded when it was published; a damaged one is moved to
    cache_dir/.damaged/ and trained again, in one warning line). An unwritable cache_dir is
    refused before training, a full one stops it with `StorageFullError`. callback(step,
    metrics) receives the stage-0 metrics (`loss`, `l2`, `commit`, `psnr`, ...).
    train_if_missing=False only loads (evaluation, trials of a campaign whose driver trained the
    teacher): a missing entry raises `TeacherUnavailableError` (a damaged one
    `DamagedFileError`) instead of quietly training a different teacher than the one the
    tokenizer was trained against.
    """
    device = resolve_device(cfg.device)
    if cfg.teacher.source == "shipped":
        return load_shipped_teacher(cfg).to(device)
    if cfg.teacher.source == "pretrained":
        model = MaskGitVQGAN(cfg.teacher)
        path = _pretrained_path(cfg.teacher)
        digest = content_hash(path) if cfg.teacher.sha256 is not None else None
        if digest != cfg.teacher.sha256:
            raise WeightsFileError(
                f"teacher.weights={path}: sha256 {digest[:16]}… is not teacher.sha256="
                f"{cfg.teacher.sha256[:16]}…; give the file the config was made for, or drop "
                f"teacher.sha256")
        load_teacher_weights(model, path)
        return FrozenTeacher(model, cfg.tokenizer.image_size).to(device)
    entry = Path(cache_dir) / teacher_cache_key(cfg)
    if train_if_missing and not teacher_published(entry):  # before minutes of training
        check_writable(cache_dir, "the teacher cache")
    with exclusive_lock(entry.with_suffix(".lock")):
        if teacher_published(entry):
            try:
                return load_cached_teacher(cfg, entry).to(device)
            except DamagedFileError as e:
                if not train_if_missing:
                    raise DamagedFileError(e.path, e.what, f"{e.detail}; run the campaign "
                                           "again: its driver trains the teacher anew") from None
                rebuilding(e, f"moved to {set_aside(entry, entry.parent)}, training it again")
        if not train_if_missing:
            raise TeacherUnavailableError(
                f"no trained teacher for this data + teacher config in {entry} (key "
                f"{entry.name}). Point to the cache the tokenizer was trained with, or give "
                "the teacher's weights explicitly; training a new one would give a "
                "different codebook.")
        try:
            with writing(entry, f"the teacher (stage 0) cache entry {entry.name}"):
                train_teacher(cfg, entry, callback=callback)
        except StorageFullError:
            remove_temporaries(entry / "train")  # checkpoints stay: the next run resumes
            raise
        return load_cached_teacher(cfg, entry).to(device)


def teacher_published(entry: Path) -> bool:
    """Is a trained teacher published in cache entry `entry` (its record, written last)?"""
    return (Path(entry) / RECORD).is_file()


def load_shipped_teacher(cfg: ExperimentConfig) -> FrozenTeacher:
    """The teacher shipped with the library that `cfg.teacher.shipped` names (on CPU), after
    `sftok.released.load_shipped`'s checks: the name exists, the file's sha256 is its
    manifest's (and `teacher.sha256`'s), the config's architecture and image size are its."""
    shipped = load_shipped(cfg.teacher, cfg.tokenizer.image_size)
    model = MaskGitVQGAN(cfg.teacher)
    load_teacher_weights(model, safetensors.torch.load(shipped.weights))
    return FrozenTeacher(model, cfg.tokenizer.image_size)


def load_cached_teacher(cfg: ExperimentConfig, entry: Path) -> FrozenTeacher:
    """The teacher published in cache entry `entry`, its files checked against the digests
    recorded when it was published (`DamagedFileError` if one is truncated or altered).

    An entry published before digests were recorded is checked by loading it (safetensors
    refuses a truncated file) and then gets its digests.
    """
    entry = Path(entry)
    what = f"teacher cache entry {entry.name}"
    try:
        record = teacher_info(entry)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise DamagedFileError(entry / RECORD, what, f"unreadable record ({e})") from None
    files = record.get("files")
    if files:
        verify_digests(entry, files, what)
    model = MaskGitVQGAN(cfg.teacher)
    try:
        load_teacher_weights(model, entry / WEIGHTS_FILE)
    except (WeightsFileError, FileNotFoundError) as e:
        raise DamagedFileError(entry / WEIGHTS_FILE, what, " ".join(str(e).split())) from None
    if not files:
        record["files"] = record_digests(entry, PUBLISHED_FILES)
        with writing(entry, what):
            _write_json_atomic(entry / RECORD, record)
    return FrozenTeacher(model, cfg.tokenizer.image_size)


def teacher_info(entry: Path) -> dict[str, Any]:
    """The cached teacher's record: training time, steps, final metrics, validation PSNR, and
    the digests of its published files."""
    return json.loads((Path(entry) / RECORD).read_text())


def _pretrained_path(tcfg: TeacherConfig) -> Path:
    how = (f"Download '{tcfg.hf_filename}' from https://huggingface.co/{tcfg.hf_repo} and pass "
           f"--set teacher.weights=/path/to/{tcfg.hf_filename} (or use a preset whose teacher is "
           f"trained: --set teacher.source=train).")
    if tcfg.weights is not None:
        path = Path(tcfg.weights).expanduser()
        if not path.is_file():
            raise TeacherUnavailableError(f"teacher.weights={tcfg.weights}: file not found. {how}")
        return path
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise TeacherUnavailableError(f"no teacher.weights and huggingface_hub is not "
                                      f"installed. {how}") from None
    # The local cache first, so an offline machine with the file never touches the network.
    with contextlib.suppress(Exception):
        return Path(hf_hub_download(tcfg.hf_repo, tcfg.hf_filename, local_files_only=True))
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        raise TeacherUnavailableError(f"teacher weights not cached and HF_HUB_OFFLINE is set. "
                                      f"{how}")
    try:
        return Path(hf_hub_download(tcfg.hf_repo, tcfg.hf_filename, etag_timeout=10))
    except Exception as e:  # noqa: BLE001 (offline, auth, ... all end here)
        raise TeacherUnavailableError(f"could not download {tcfg.hf_repo}/{tcfg.hf_filename} "
                                      f"({type(e).__name__}: {e}). {how}") from None


# --------------------------------------------------------------------------------------------
# Stage 0 training
# --------------------------------------------------------------------------------------------


class CodeUsage(nn.Module):
    """Per-code assignment counts of the current reset window (a buffer, so it is checkpointed)."""

    def __init__(self, codebook_size: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.long))


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Mean over images of 10·log10(1 / MSE), images in [0, 1] (B×3×H×W)."""
    mse = ((x.float().clamp(0, 1) - y.float()) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


class TeacherTask(LoopTask):
    """Stage-0 step: VQGAN forward, L2 (+LPIPS, +GAN from gan_start) + VQ losses."""

    def __init__(self, cfg: ExperimentConfig, device: torch.device,
                 workers: Workers = SINGLE):
        self.set_workers(workers)
        tcfg = cfg.train.teacher
        self.name, self.cfg, self.tcfg, self.device = "stage0", cfg, tcfg, device
        torch.manual_seed(cfg.data.seed)  # initial weights: a function of the cache key only
        self.model = MaskGitVQGAN(cfg.teacher).to(device)
        self.usage = CodeUsage(cfg.teacher.codebook_size).to(device)
        self.generator = torch.Generator().manual_seed(cfg.data.seed + 1000)
        self.precision = Precision("fp32", device)  # small convnets: fp32 is fine everywhere
        self.optimizer = build_optimizer(self.model, tcfg.optim, device)
        self.scaler = self.precision.scaler()
        self.lpips = load_lpips(device) if tcfg.lpips_weight > 0 else None
        self.adversary = (Adversary("patchgan", cfg.data.image_size, tcfg.optim, device,
                                    self.precision, workers=workers)
                          if tcfg.gan_weight > 0 else None)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.step_forward = wrap_ddp(self.model, workers, device)  # its forward is the step's
        # The adversary's metrics are device tensors, checked by run_loop (fp32: no scaler).
        self.finite_keys = (*Adversary.FINITE_KEYS, "disc_grad_norm")

    def modules(self) -> dict[str, nn.Module]:
        return {**super().modules(), "usage": self.usage}

    def step(self, batches: list[Any], step: int) -> dict[str, float]:
        t = self.tcfg
        lr = self.begin_step(step, t.steps, t.optim)
        gan_on = self.adversary is not None and step >= t.gan_start
        n = len(batches)
        workers = self.workers
        sums: dict[str, float] = {}
        reals, fakes, latents = [], [], []
        counts = torch.zeros_like(self.usage.counts)
        for i, batch in enumerate(batches):
            images = to_images(batch).to(self.device, non_blocking=True)
            with accumulating(self.step_forward, last=i == n - 1):
                out = self.step_forward(images, commitment=t.commitment)
                l2 = F.mse_loss(out.recon.float(), images)
                loss = t.l2_weight * l2 + out.loss
                parts = {"l2": l2, "commit": out.losses["commitment"],
                         "codebook": out.losses["codebook"]}
                if self.lpips is not None:
                    parts["lpips"] = lpips_loss(self.lpips, out.recon, images)
                    loss = loss + t.lpips_weight * parts["lpips"]
                if gan_on:
                    parts["gan_g"] = self.adversary.generator_loss(out.recon)
                    loss = loss + t.gan_weight * parts["gan_g"]
                self.finite("loss", loss)
                self.scaler.scale(loss / n).backward()
            counts += torch.bincount(out.ids.flatten(), minlength=counts.numel())
            for k, v in {"loss": loss, **parts, "psnr": psnr(out.recon.detach(), images)}.items():
                sums[k] = sums.get(k, 0.0) + scalar(v) / n
            reals.append(images)
            fakes.append(out.recon.detach())
            latents.append(out.latent.detach())
        self.usage.counts += workers.all_reduce_sum(counts)  # every rank's codes of this step
        sums["grad_norm"] = clip_and_step(self.optimizer, self.scaler, self.params,
                                          t.optim.grad_clip, check=not workers.distributed)
        if workers.distributed:
            self.finite("grad_norm", sums["grad_norm"])
        if gan_on:
            sums.update(self.adversary.update(reals, fakes, lr))
        if (step + 1) % RESET_EVERY == 0:
            if step < 0.8 * t.steps:
                # The one-process batch: micro-batch j = a·W + r of rank r, in order of j.
                local = torch.stack(latents)  # A×B×Z×h×w
                every = torch.stack(workers.all_gather(local), 1).flatten(0, 1)
                sums["codes_reset"] = float(self._reset_dead_codes(every.flatten(0, 1)))
            sums["code_usage"] = float((self.usage.counts > 0).float().mean())
            self.usage.counts.zero_()
        sums["lr"] = lr
        return sums

    @torch.no_grad()
    def _reset_dead_codes(self, latent: Tensor) -> int:
        """Re-initialise codes unused this window to random encoder outputs of the batch."""
        dead = (self.usage.counts == 0).nonzero().flatten()
        if dead.numel() == 0:
            return 0
        flat = latent.permute(0, 2, 3, 1).reshape(-1, latent.shape[1])  # (B·N)×Z
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), generator=self.generator)
        self.model.quantizer.embedding.weight[dead] = flat[pick.to(flat.device)].to(
            self.model.quantizer.embedding.weight.dtype)
        return int(dead.numel())


def train_teacher(cfg: ExperimentConfig, entry: Path, callback=None,
                  resume: bool = True, curve_every: int = 0,
                  workers: Workers = SINGLE) -> dict[str, Any]:
    """Train stage 0 into cache entry `entry` (resumable under entry/train/); returns its record.

    Writes entry/model.safetensors (official key layout) + entry/config.json (resolved config)
    with `sftok.checkpoint.save_model`, and, last, entry/teacher.json (the marker of a finished
    teacher: time, metrics, val PSNR, the digests of the two files); with resume, a finished entry is
    returned as it is. workers: train on these ranks (each calls this; rank 0 validates, draws
    the curve and publishes).
    curve_every > 0: every that many steps (a multiple of log_every) and at the end, the
    learning curve gets a point (`curve_point`: held-out and training-image PSNR), rewritten to
    entry/curve.json as it goes (readable while training runs) and kept in the record's
    "curve" (with `process_s`, seconds since this process started, and `unix_time`). Points
    are pure functions of the weights at their step, so a resumed run keeps the points it had
    and adds the same ones an uninterrupted run would.
    """
    from sftok.data import TrainStream, build_datasets, build_train_view

    entry = Path(entry)
    if resume and (entry / RECORD).exists():
        return teacher_info(entry)  # finished: never retrained, its record never rewritten
    tcfg = cfg.train.teacher
    per_worker = accum_per_worker(tcfg.grad_accum, tcfg.batch_size, workers.world_size,
                                  "train.teacher.grad_accum")
    device = resolve_device(workers.device or cfg.device)
    t0 = time.perf_counter()
    train_ds, val_ds = build_datasets(cfg.data)
    train_view = build_train_view(cfg.data) if curve_every > 0 and workers.is_main else None
    task = TeacherTask(cfg, device, workers)
    stream = TrainStream(train_ds, tcfg.batch_size, seed=cfg.data.seed,
                         num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda",
                         rank=workers.rank, world_size=workers.world_size)
    spec = LoopSpec(stage="stage0", steps=tcfg.steps, grad_accum=per_worker,
                    images_per_step=tcfg.batch_size * tcfg.grad_accum,
                    log_every=tcfg.log_every, ckpt_every=tcfg.ckpt_every, config=to_dict(cfg))

    def export(tmp: Path, task: TeacherTask) -> None:
        save_model(tmp, task.model, cfg)

    curve_path = entry / "curve.json"
    curve = (json.loads(curve_path.read_text()) if resume and curve_path.exists() else [])

    def on_log(step: int, metrics: dict[str, float]) -> None:
        if train_view is not None and (step % curve_every == 0 or step == tcfg.steps) \
                and all(p["step"] != step for p in curve):
            frozen = FrozenTeacher(copy.deepcopy(task.model), cfg.tokenizer.image_size)
            curve.append({"step": step, **curve_point(frozen, val_ds, train_view, device),
                          "process_s": time.perf_counter() - t0, "unix_time": time.time()})
            entry.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(curve_path, curve)
        if callback is not None:
            callback(step, metrics)

    result = run_loop(task, stream, entry / "train", spec, export, callback=on_log,
                      resume=resume)

    def publish() -> dict[str, Any]:
        teacher = FrozenTeacher(MaskGitVQGAN(cfg.teacher), cfg.tokenizer.image_size)
        load_teacher_weights(teacher, result.final_dir / WEIGHTS_FILE)
        teacher = teacher.to(device)
        val = validation_psnr(teacher, val_ds, device)
        record = {"key": entry.name, "steps": result.steps,
                  "train_time_s": time.perf_counter() - t0, "metrics": result.metrics,
                  "history": result.history, "val_psnr": val["psnr"],
                  "val_code_usage": val["code_usage"], "val_images": val["images"]}
        if curve:
            record["curve"] = curve
        # Publish: weights + config (sftok.checkpoint layout, atomic), then the record with
        # their digests (checked whenever the entry is opened) — the marker of a finished
        # teacher, last.
        save_model(entry, teacher.model, cfg)
        record["files"] = record_digests(entry, PUBLISHED_FILES)
        _write_json_atomic(entry / RECORD, record)
        return record

    record = workers.on_main("publishing the teacher", publish)
    if callback is not None:
        callback(result.steps, {"val_psnr": record["val_psnr"]})
    return record


@torch.no_grad()
def validation_psnr(teacher: FrozenTeacher, val_ds, device: torch.device,
                    batch_size: int = 64, max_images: int | None = None) -> dict[str, float]:
    """Teacher reconstruction PSNR (mean over validation images) and code usage."""
    from sftok.data import val_batches

    total, count = 0.0, 0
    used = torch.zeros(teacher.codebook_size, dtype=torch.bool, device=device)
    for images in val_batches(val_ds, batch_size, max_images=max_images):
        images = images.to(device)
        ids = teacher.encode_ids(images)
        used[ids.flatten()] = True
        recon = teacher.decode_ids(ids)
        mse = ((recon - images) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        total += float((10 * torch.log10(1.0 / mse)).sum())
        count += images.shape[0]
    return {"psnr": total / max(count, 1), "code_usage": float(used.float().mean()),
            "images": float(count)}


def curve_point(teacher: FrozenTeacher, val_ds, train_view, device: torch.device,
                max_train_images: int = 512) -> dict[str, float]:
    """One point of the teacher's learning curve: PSNR on the held-out images (`val_psnr`, with
    `val_code_usage`) and on training images in their evaluation view (`train_psnr`, at most
    `max_train_images`), and the gap train - held-out (`gap_db`)."""
    val = validation_psnr(teacher, val_ds, device)
    train = validation_psnr(teacher, train_view, device, max_images=max_train_images)
    return {"val_psnr": val["psnr"], "train_psnr": train["psnr"],
            "gap_db": train["psnr"] - val["psnr"], "val_code_usage": val["code_usage"],
            "val_images": val["images"], "train_images": train["images"]}


def _write_json_atomic(path: Path, data: dict | list) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


__all__ = [
    "TeacherUnavailableError",
    "curve_point",
    "get_teacher",
    "load_cached_teacher",
    "load_shipped_teacher",
    "teacher_cache_key",
    "teacher_info",
    "teacher_published",
    "train_teacher",
    "validation_psnr",
]

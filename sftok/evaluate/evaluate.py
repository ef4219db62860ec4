"""`evaluate()`: every number of the paper's tables and figures for one tokenizer (issue 4).

For each S in `cfg.decode_steps` (Figure 8: 1, 2, 4, 8, 16; Table 1 uses S = 8) the images are
reconstructed with an S-step decode and scored: psnr_s{S}, ssim_s{S}, lpips_s{S}, rfid_s{S},
is_s{S}. S-independent: token_top1 / token_ce (decoder step-1 prediction vs the teacher's ids),
codebook_usage / codebook_entropy (tokenizer ids), num_images. Plus the Figure-4a trace of a
`cfg.trace_steps`-step decode (trace.py), with it the revealed-token information
(revealed.py: reveal_<kind>_r<pct>), and one grid per S (originals over reconstructions).
With `bounds` (bounds.py), the same metrics for the bit-matched naive-codec floors and the
teacher's ceiling: floor_tokenizer_<metric>, floor_teacher_<metric>, teacher_<metric>.

Streaming (bounded memory): the images arrive in batches and are never kept; per S we keep
metric sums, FID feature sums (D + D² floats) and IS logits (1008 floats / image), and the first
`cfg.grid_images` images for the grids. All pixel metrics see 8-bit images (as saved PNGs).

Metrics whose pretrained weights are absent offline (rFID/IS: Inception; LPIPS: its backbone)
are left out of `metrics` and listed in `unavailable` with one message each (DESIGN §2).

Randomness: the decodes of batch b draw from a generator seeded with `eval.seed` for b = 0 and
mix(eval.seed, b) after (`batch_seed`), so a batch's noise does not depend on who decodes it.

Sharded (issue 19): with W `workers`, the held-out images are split by batch (global batch b
on rank b mod W, `val_batches(..., rank=, world_size=)`); the sums, FID feature moments, IS
logits, token and trace sums, grid images and image digests are gathered to rank 0, which
computes the metrics and sends the same `EvalResult` to every rank. Equal to the
single-process evaluation up to the order of float sums (tests/test_data_parallel.py).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sftok.config import EVAL_METRICS, DecodeConfig, EvalConfig
from sftok.data.seeding import mix
from sftok.data.stream import image_batches
from sftok.data.uint8 import to_uint8
from sftok.distributed import SINGLE, Workers
from sftok.evaluate.bounds import Bounds
from sftok.evaluate.fid import (
    INCEPTION_NAME,
    LOAD_ERRORS,
    FeatureStats,
    ReferenceStatistics,
    fid_from_statistics,
    inception_score,
    open_features,
)
from sftok.evaluate.grid import image_grid
from sftok.evaluate.metrics import psnr, ssim
from sftok.evaluate.perceptual import LPIPSMetric, find_lpips_backbone
from sftok.evaluate.revealed import RevealAccumulator
from sftok.evaluate.tokens import TokenAccumulator
from sftok.evaluate.trace import TraceAccumulator
from sftok.progress import progress_disabled
from sftok.run_record import CEILING_PREFIX, bound_metric, parse_step_metric, step_metric


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)  # "psnr_s8", "rfid_s8", "token_top1", ...
    unavailable: dict[str, str] = field(default_factory=dict)  # "rfid" -> how to provide the weights
    trace: list[dict] = field(default_factory=list)  # trace.TRACE_COLUMNS rows, step 1..S
    grids: dict[int, np.ndarray] = field(default_factory=dict)  # S -> H×W×3 uint8


def _codebook_size(tokenizer) -> int:
    """Q, the tokenizer's codebook size (from its config, else its quantizer)."""
    for path in (("cfg", "quantizer", "codebook_size"), ("quantizer", "codebook_size"),
                 ("quantizer", "num_codes")):
        obj = tokenizer
        try:
            for p in path:
                obj = getattr(obj, p)
        except AttributeError:
            continue
        if isinstance(obj, int):
            return obj
    raise AttributeError("evaluate: cannot find the tokenizer's codebook size "
                         "(tokenizer.cfg.quantizer.codebook_size)")


def _default_device(tokenizer) -> torch.device:
    try:
        return next(tokenizer.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def batch_seed(seed: int, batch: int) -> int:
    """The seed of global batch `batch`'s decodes: `seed` itself for the first batch (a
    one-batch evaluation keeps the numbers it had when one generator served every batch)."""
    return seed if batch == 0 else mix(seed, batch)


def indexed_batches(images: Iterable, batch_size: int, max_images: int | None,
                    workers: Workers) -> Iterator[tuple[int, Tensor]]:
    """(global batch index b, images) of the batches this rank evaluates. One process: every
    batch of `image_batches`, numbered. Several: `images` must be this rank's share of a
    `val_batches(..., batch_size, max_images, rank=, world_size=)` (it knows each batch's
    global index)."""
    if not workers.distributed:
        yield from enumerate(image_batches(images, batch_size, max_images))
        return
    if not hasattr(images, "indexed") or (images.rank, images.world_size) != (
            workers.rank, workers.world_size):
        raise TypeError(f"evaluate on rank {workers.rank} of {workers.world_size}: images must "
                        f"be val_batches(..., rank={workers.rank}, "
                        f"world_size={workers.world_size}), this rank's share of the batches")
    if images.batch_size != batch_size or images.max_images != max_images:
        raise ValueError(f"evaluate: sharded val_batches must use eval's batch_size "
                         f"{batch_size} and max_images {max_images} (got {images.batch_size}, "
                         f"{images.max_images}): batches are the unit of the split")
    yield from images.indexed()


@dataclass
class _Partial:
    """One rank's sums over its batches (everything a metric needs; see module docstring)."""

    n_images: int
    sums: dict  # key -> {"psnr", "ssim", "lpips"}: sums over images
    logits: dict  # key -> [(b, IS logits of batch b)]
    grid: list  # [(b, originals uint8, {S: reconstructions uint8})]: the first grid_images
    tokens: TokenAccumulator | None
    trace: TraceAccumulator | None
    reveal: RevealAccumulator | None

    def merge(self, other: _Partial) -> None:
        self.n_images += other.n_images
        for k, part in other.sums.items():
            for m, v in part.items():
                self.sums[k][m] += v
        for k, part in other.logits.items():
            self.logits[k] += part
        self.grid += other.grid
        if self.tokens is not None:
            self.tokens.merge(other.tokens)
        if self.trace is not None:
            self.trace.merge(other.trace)
        if self.reveal is not None:
            self.reveal.merge(other.reveal)


def _agree(workers: Workers, what: str, ok: bool) -> None:
    """Every rank must have the same optional network, or the ranks' sums would not match."""
    have = workers.all_gather_object(ok)
    if len(set(have)) > 1:
        missing = [r for r, h in enumerate(have) if not h]
        raise RuntimeError(f"evaluate: {what} is unavailable on rank(s) {missing} but not on "
                           f"the others; give every worker the same weight files (environment "
                           f"variables, torch hub cache) or evaluate on one worker")


def dataset_key(cfg) -> str:
    """Key of an ExperimentConfig's validation images for the FID reference-statistics cache.

    One formula for every caller (the CLI and the experiment trials), so they share cached
    statistics; the cache still checks a hash of the images before using an entry.
    """
    d = cfg.data
    return (f"{d.source}-{d.path or 'embedded'}-{d.image_size}-{d.val_crops_per_image}-{d.seed}-"
            f"{cfg.eval.max_images}")


def evaluate(tokenizer, teacher, images: Iterable, cfg: EvalConfig, device=None,
             cache_dir: str | os.PathLike | None = None, inception_weights: str | None = None,
             progress: bool = True, *, decode_cfg: DecodeConfig | None = None,
             dataset_key: str | None = None, lpips_weights: str | None = None,
             lpips_net: str = "alex", fid_feature_extractor: str = INCEPTION_NAME,
             bounds: Bounds | None = None, workers: Workers = SINGLE) -> EvalResult:
    """Evaluate `tokenizer` (SFTok) with its frozen `teacher` on a stream of image batches.

    images: iterable of float B×3×H×W in [0, 1] (or (images, labels) batches); re-chunked to
        cfg.batch_size, cut at cfg.max_images. With several `workers`: this rank's
        `val_batches(val_ds, cfg.batch_size, cfg.max_images, rank=, world_size=)`.
    cfg: which S (decode_steps), which metrics, trace_steps, seed, and an optional temperature
        override (None: decode_cfg's).
    decode_cfg: the decode settings (schedule, temperature tau with the paper's semantics, see
        sftok.decoding; e.g. ExperimentConfig.decode); steps are taken from `cfg`.
    cache_dir + dataset_key: cache the FID reference statistics of these validation images
        under cache_dir/fid_stats/ (checked against a hash of the images).
    inception_weights / lpips_weights: local weight files (else env vars / torch hub cache).
    fid_feature_extractor: a torch-fidelity registered extractor (tests register a tiny one).
    bounds: floors and ceiling to score on the same images (`bounds.build_bounds(cfg)`).
    workers: evaluate sharded over these ranks (every rank calls this; all get the result).
    Deterministic for a fixed seed: batch b's decodes draw from a generator seeded with
    `batch_seed(cfg.seed, b)`.
    """
    wanted = set(cfg.metrics)
    unknown = wanted - set(EVAL_METRICS)
    if unknown:
        raise ValueError(f"evaluate: unknown metrics {sorted(unknown)} (known: {EVAL_METRICS})")
    device = torch.device(device) if device is not None else _default_device(tokenizer)
    base = decode_cfg or DecodeConfig()
    if cfg.temperature is not None:
        base = dataclasses.replace(base, temperature=cfg.temperature)
    decode_cfgs = {s: dataclasses.replace(base, steps=s) for s in cfg.decode_steps}
    result = EvalResult()

    # ---- pretrained feature networks: detect absence first, never download (DESIGN §2)
    features = None
    if wanted & {"rfid", "is"}:
        features, msg = open_features(fid_feature_extractor, inception_weights, device)
        for m in ("rfid", "is"):
            if msg and m in wanted:
                result.unavailable[m] = msg
        _agree(workers, "the FID/IS feature network", features is not None)
    lpips_metric = None
    if "lpips" in wanted:
        path, msg = find_lpips_backbone(lpips_net, lpips_weights)
        if path is not None:
            try:
                lpips_metric = LPIPSMetric(path, lpips_net, device)
            except LOAD_ERRORS as e:
                msg = f"could not load LPIPS backbone weights from {path}: {e}"
        if msg:
            result.unavailable["lpips"] = msg
        _agree(workers, "the LPIPS network", lpips_metric is not None)

    # The originals' FID statistics (cached under cache_dir by dataset_key, checked against a
    # hash of the images), accumulated in the same pass as the reconstructions.
    reference = (ReferenceStatistics(features, cache_dir, dataset_key, key_name="dataset_key",
                                     workers=workers)
                 if features is not None and "rfid" in wanted else None)

    # ---- accumulators (sums only; see module docstring), one set per reconstruction:
    # the S-step decodes (keys S, metric "psnr_s8") and the bounds (keys their prefixes,
    # "floor_tokenizer", ..., "teacher"; metric "teacher_psnr").
    steps = list(cfg.decode_steps)
    bounds = bounds or Bounds(ceiling=False)
    keys: list[int | str] = steps + bounds.metric_prefixes()
    floor_of = dict(zip(bounds.metric_prefixes(), bounds.floors.values()))
    part = _Partial(
        n_images=0, sums={k: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for k in keys},
        logits={k: [] for k in keys}, grid=[],
        tokens=TokenAccumulator(_codebook_size(tokenizer)) if "tokens" in wanted else None,
        trace=TraceAccumulator() if cfg.trace_steps > 0 else None,
        reveal=(RevealAccumulator(cfg.reveal_fractions, cfg.seed)
                if cfg.trace_steps > 0 and cfg.reveal_fractions else None))
    rec_stats = {k: FeatureStats() for k in keys}
    trace_cfg = dataclasses.replace(base, steps=cfg.trace_steps)

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_images, unit="img", desc="evaluate",
               disable=progress_disabled(progress) or not workers.is_main)
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.no_grad():
            for b_index, x in indexed_batches(images, cfg.batch_size, cfg.max_images, workers):
                x = x.to(device).float()
                b = x.shape[0]
                x_u8 = to_uint8(x)
                x_q = x_u8.float() / 255  # the 8-bit originals every pixel metric sees
                if reference is not None:
                    reference.update(x_u8, batch=b_index)
                if lpips_metric is not None and min(x.shape[-2:]) < lpips_metric.min_size:
                    result.unavailable["lpips"] = (
                        f"images of {x.shape[-2]}×{x.shape[-1]} px are too small for LPIPS-"
                        f"{lpips_net} (needs at least {lpips_metric.min_size} px)")
                    lpips_metric = None

                need_gt = (part.tokens is not None or part.trace is not None
                           or bounds.ceiling)
                gt = teacher.encode_ids(x) if need_gt else None  # M_g, B×N
                enc = tokenizer.encode(x)  # once per batch, shared by every step count S
                seed = batch_seed(cfg.seed, b_index)
                if part.tokens is not None:
                    part.tokens.update_codes(enc.ids)
                    # step 1 of inference: every proxy position masked (DESIGN §1)
                    masked = torch.full_like(gt, tokenizer.mask_id)
                    part.tokens.update_step1(tokenizer.decoder_logits(masked, enc.z_q), gt)
                if part.trace is not None:
                    res = tokenizer.generate(enc.z_q, trace_cfg,
                                             generator=_generator(device, seed), trace=True)
                    part.trace.update(res.trace, gt)
                if part.reveal is not None:
                    # Images numbered globally, so any W draws the same revealed sets: sharded
                    # batches are all of cfg.batch_size (indexed_batches checks it); one
                    # process counts the images it saw (any batching).
                    first = b_index * cfg.batch_size if workers.world_size > 1 else None
                    part.reveal.update(functools.partial(tokenizer.decoder_logits, z_q=enc.z_q),
                                       gt, tokenizer.mask_id, first=first)

                take = cfg.grid_images - sum(g[1].shape[0] for g in part.grid)
                grid_rec: dict[int, Tensor] = {}
                for k in keys:
                    if isinstance(k, int):
                        rec = tokenizer.pixels_from_latent(enc.z_q, teacher, decode_cfgs[k],
                                                           generator=_generator(device, seed))
                    elif k == CEILING_PREFIX:  # the ceiling: the teacher's decoder on its own codes
                        rec = teacher.decode_ids(gt)
                    else:  # a floor codec, on the same 8-bit originals as every metric
                        rec = floor_of[k].reconstruct(x_q)
                    rec_u8 = to_uint8(rec)
                    sums = part.sums[k]
                    if "psnr" in wanted:
                        sums["psnr"] += psnr(rec_u8, x_u8).sum().item()
                    if "ssim" in wanted:
                        sums["ssim"] += ssim(rec_u8, x_u8).sum().item()
                    if lpips_metric is not None:
                        sums["lpips"] += lpips_metric(rec_u8.float() / 255, x_q).sum().item()
                    if features is not None:
                        f_fid, f_isc = features(rec_u8)
                        if "rfid" in wanted:
                            rec_stats[k].update(f_fid)
                        if "is" in wanted:
                            part.logits[k].append((b_index, f_isc))
                    if take > 0 and isinstance(k, int):
                        grid_rec[k] = rec_u8[:take].cpu()
                if take > 0:  # this rank's first images; the merge keeps the first overall
                    part.grid.append((b_index, x_u8[:take].cpu(), grid_rec))
                part.n_images += b
                bar.update(b)
    finally:
        bar.close()
        tokenizer.train(was_training)

    # ---- gather (several workers): moments by all-reduce, the rest to rank 0
    if workers.distributed:
        for st in rec_stats.values():
            st.all_reduce(workers)
        if reference is not None:
            reference.gather()
        parts = workers.gather_object(part)
        if not workers.is_main:
            return workers.broadcast_object(None)
        for other in parts[1:]:
            part.merge(other)
        result = _finish(result, part, rec_stats, reference, keys, steps, wanted, features,
                         lpips_metric, cfg)
        return workers.broadcast_object(result)
    return _finish(result, part, rec_stats, reference, keys, steps, wanted, features,
                   lpips_metric, cfg)


def _finish(result: EvalResult, part: _Partial, rec_stats: dict,
            reference: ReferenceStatistics | None, keys: list, steps: list, wanted: set,
            features, lpips_metric, cfg: EvalConfig) -> EvalResult:
    """The metrics of all the sums (on rank 0 with several workers)."""
    n_images = part.n_images
    if n_images == 0:
        raise ValueError("evaluate: no images (empty stream or max_images=0)")
    m = result.metrics
    m["num_images"] = float(n_images)

    def name_of(metric: str, k: int | str) -> str:
        return step_metric(metric, k) if isinstance(k, int) else bound_metric(k, metric)

    for k in keys:
        for name in ("psnr", "ssim"):
            if name in wanted:
                m[name_of(name, k)] = part.sums[k][name] / n_images
        if lpips_metric is not None:
            m[name_of("lpips", k)] = part.sums[k]["lpips"] / n_images

    if reference is not None:
        ref, why = reference.result()
        if n_images < 2:  # the reconstructions' covariance, too
            ref, why = None, "rFID needs at least 2 images (a covariance)"
        if why:
            result.unavailable["rfid"] = why
        if ref is not None:
            for k in keys:
                m[name_of("rfid", k)] = fid_from_statistics(ref, rec_stats[k].statistics())
    if features is not None and "is" in wanted:
        for k in keys:  # in global batch order: the logits' order is part of IS's splits
            logits = [t for _, t in sorted(part.logits[k], key=lambda e: e[0])]
            m[name_of("is", k)] = inception_score(torch.cat(logits))[0]
    if part.tokens is not None:
        m.update(part.tokens.result())

    if part.trace is not None:
        result.trace = part.trace.rows()
    if part.reveal is not None:
        m.update(part.reveal.result())
    grid = sorted(part.grid, key=lambda e: e[0])
    if grid and cfg.grid_images > 0:
        orig = torch.cat([g[1] for g in grid])[:cfg.grid_images]
        result.grids = {s: image_grid(orig, torch.cat([g[2][s] for g in grid])[:cfg.grid_images])
                        for s in steps}
    return result


def format_table(result: EvalResult, steps: Iterable[int] | None = None) -> str:
    """Plain-text tables: per-S metrics, S-independent metrics, unavailable ones, the trace."""
    m = result.metrics
    if steps is None:
        steps = sorted({p[1] for p in map(parse_step_metric, m) if p})
    steps = list(steps)
    names = [n for n in ("rfid", "is", "psnr", "ssim", "lpips")
             if any(step_metric(n, s) in m for s in steps)]
    lines = ["S     " + "".join(f"{n:>10}" for n in names)]
    for s in steps:
        cells = "".join(f"{m[step_metric(n, s)]:>10.4f}" if step_metric(n, s) in m
                        else f"{'-':>10}" for n in names)
        lines.append(f"{s:<6}{cells}")
    tabled = {step_metric(n, s) for n in names for s in steps}
    other = {k: v for k, v in m.items() if k not in tabled}
    if other:
        lines.append("")
        lines += [f"{k:<18}{v:.4f}" for k, v in other.items()]
    if result.unavailable:
        lines.append("")
        lines += [f"unavailable {k}: {v}" for k, v in result.unavailable.items()]
    if result.trace:
        cols = list(result.trace[0])
        lines.append("")
        lines.append("".join(f"{c:>18}" for c in cols))
        for row in result.trace:
            lines.append("".join(f"{row[c]:>18.4f}" if isinstance(row[c], float)
                                 else f"{row[c]:>18}" for c in cols))
    return "\n".join(lines)

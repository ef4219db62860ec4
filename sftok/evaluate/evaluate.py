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
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sftok.config import EVAL_METRICS, DecodeConfig, EvalConfig
from sftok.data.stream import image_batches
from sftok.data.uint8 import to_uint8
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
             bounds: Bounds | None = None) -> EvalResult:
    """Evaluate `tokenizer` (SFTok) with its frozen `teacher` on a stream of image batches.

    images: iterable of float B×3×H×W in [0, 1] (or (images, labels) batches); re-chunked to
        cfg.batch_size, cut at cfg.max_images.
    cfg: which S (decode_steps), which metrics, trace_steps, seed, and an optional temperature
        override (None: decode_cfg's).
    decode_cfg: the decode settings (schedule, temperature tau with the paper's semantics, see
        sftok.decoding; e.g. ExperimentConfig.decode); steps are taken from `cfg`.
    cache_dir + dataset_key: cache the FID reference statistics of these validation images
        under cache_dir/fid_stats/ (checked against a hash of the images).
    inception_weights / lpips_weights: local weight files (else env vars / torch hub cache).
    fid_feature_extractor: a torch-fidelity registered extractor (tests register a tiny one).
    bounds: floors and ceiling to score on the same images (`bounds.build_bounds(cfg)`).
    Deterministic for a fixed seed and batch order: each decode gets a generator seeded with
    cfg.seed.
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

    # The originals' FID statistics (cached under cache_dir by dataset_key, checked against a
    # hash of the images), accumulated in the same pass as the reconstructions.
    reference = (ReferenceStatistics(features, cache_dir, dataset_key, key_name="dataset_key")
                 if features is not None and "rfid" in wanted else None)

    # ---- accumulators (sums only; see module docstring), one set per reconstruction:
    # the S-step decodes (keys S, metric "psnr_s8") and the bounds (keys their prefixes,
    # "floor_tokenizer", ..., "teacher"; metric "teacher_psnr").
    steps = list(cfg.decode_steps)
    bounds = bounds or Bounds(ceiling=False)
    keys: list[int | str] = steps + bounds.metric_prefixes()
    floor_of = dict(zip(bounds.metric_prefixes(), bounds.floors.values()))
    sums = {k: {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0} for k in keys}
    rec_stats = {k: FeatureStats() for k in keys}
    rec_logits: dict[int | str, list[Tensor]] = {k: [] for k in keys}
    tokens = TokenAccumulator(_codebook_size(tokenizer)) if "tokens" in wanted else None
    trace_acc = TraceAccumulator() if cfg.trace_steps > 0 else None
    reveal_acc = (RevealAccumulator(cfg.reveal_fractions, cfg.seed)
                  if trace_acc is not None and cfg.reveal_fractions else None)
    trace_cfg = dataclasses.replace(base, steps=cfg.trace_steps)
    gens = {s: _generator(device, cfg.seed) for s in steps}
    trace_gen = _generator(device, cfg.seed)
    grid_orig: list[Tensor] = []
    grid_rec: dict[int, list[Tensor]] = {s: [] for s in steps}
    n_grid = 0
    n_images = 0

    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_images, unit="img", desc="evaluate",
               disable=progress_disabled(progress))
    was_training = tokenizer.training
    tokenizer.eval()
    try:
        with torch.no_grad():
            for x in image_batches(images, cfg.batch_size, cfg.max_images):
                x = x.to(device).float()
                b = x.shape[0]
                x_u8 = to_uint8(x)
                x_q = x_u8.float() / 255  # the 8-bit originals every pixel metric sees
                if reference is not None:
                    reference.update(x_u8)
                if lpips_metric is not None and min(x.shape[-2:]) < lpips_metric.min_size:
                    result.unavailable["lpips"] = (
                        f"images of {x.shape[-2]}×{x.shape[-1]} px are too small for LPIPS-"
                        f"{lpips_net} (needs at least {lpips_metric.min_size} px)")
                    lpips_metric = None

                need_gt = tokens is not None or trace_acc is not None or bounds.ceiling
                gt = teacher.encode_ids(x) if need_gt else None  # M_g, B×N
                enc = tokenizer.encode(x)  # once per batch, shared by every step count S
                if tokens is not None or trace_acc is not None:
                    if tokens is not None:
                        tokens.update_codes(enc.ids)
                        # step 1 of inference: every proxy position masked (DESIGN §1)
                        masked = torch.full_like(gt, tokenizer.mask_id)
                        tokens.update_step1(tokenizer.decoder_logits(masked, enc.z_q), gt)
                    if trace_acc is not None:
                        res = tokenizer.generate(enc.z_q, trace_cfg, generator=trace_gen,
                                                 trace=True)
                        trace_acc.update(res.trace, gt)
                    if reveal_acc is not None:
                        reveal_acc.update(functools.partial(tokenizer.decoder_logits,
                                                            z_q=enc.z_q), gt, tokenizer.mask_id)

                take = min(b, cfg.grid_images - n_grid)
                if take > 0:
                    grid_orig.append(x_u8[:take].cpu())
                for k in keys:
                    if isinstance(k, int):
                        rec = tokenizer.pixels_from_latent(enc.z_q, teacher, decode_cfgs[k],
                                                           generator=gens[k])
                    elif k == CEILING_PREFIX:  # the ceiling: the teacher's decoder on its own codes
                        rec = teacher.decode_ids(gt)
                    else:  # a floor codec, on the same 8-bit originals as every metric
                        rec = floor_of[k].reconstruct(x_q)
                    rec_u8 = to_uint8(rec)
                    if "psnr" in wanted:
                        sums[k]["psnr"] += psnr(rec_u8, x_u8).sum().item()
                    if "ssim" in wanted:
                        sums[k]["ssim"] += ssim(rec_u8, x_u8).sum().item()
                    if lpips_metric is not None:
                        sums[k]["lpips"] += lpips_metric(rec_u8.float() / 255, x_q).sum().item()
                    if features is not None:
                        f_fid, f_isc = features(rec_u8)
                        if "rfid" in wanted:
                            rec_stats[k].update(f_fid)
                        if "is" in wanted:
                            rec_logits[k].append(f_isc)
                    if take > 0 and isinstance(k, int):
                        grid_rec[k].append(rec_u8[:take].cpu())
                n_grid += max(take, 0)
                n_images += b
                bar.update(b)
    finally:
        bar.close()
        tokenizer.train(was_training)

    if n_images == 0:
        raise ValueError("evaluate: no images (empty stream or max_images=0)")

    # ---- reduce
    m = result.metrics
    m["num_images"] = float(n_images)

    def name_of(metric: str, k: int | str) -> str:
        return step_metric(metric, k) if isinstance(k, int) else bound_metric(k, metric)

    for k in keys:
        for name in ("psnr", "ssim"):
            if name in wanted:
                m[name_of(name, k)] = sums[k][name] / n_images
        if lpips_metric is not None:
            m[name_of("lpips", k)] = sums[k]["lpips"] / n_images

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
        for k in keys:
            m[name_of("is", k)] = inception_score(torch.cat(rec_logits[k]))[0]
    if tokens is not None:
        m.update(tokens.result())

    if trace_acc is not None:
        result.trace = trace_acc.rows()
    if reveal_acc is not None:
        m.update(reveal_acc.result())
    if grid_orig:
        orig = torch.cat(grid_orig)
        result.grids = {s: image_grid(orig, torch.cat(grid_rec[s])) for s in steps}
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

"""Scoring a class-conditional generator (paper Table 2): gFID, IS, calibration, grids.

gFID protocol (released sampling script): `samples_per_class` class-balanced samples per class
(50 x 1000 = 50k on ImageNet), 8-bit images, Fréchet distance of their Inception features to
reference statistics of the *training* set: a provided .npz (ADM's
VIRTUAL_imagenet256_labeled.npz on ImageNet) or, when none is given, statistics computed from
the training images' centre view (cached like rFID's). Calibration rows against the same
statistics say what the generator could reach at best:
  calib_fid_heldout  real held-out images (the data's own sampling noise),
  calib_fid_recon    the tokenizer's reconstructions of real training tokens (the tokenizer's
                     ceiling: a perfect generator of these tokens scores this).
Offline, without the Inception weights, gFID / IS / calibration FIDs are reported unavailable
with the one message of `sftok.evaluate.fid` (DESIGN §2); token statistics are always given.

Metric names (flat; the runner prefixes `eval/`): gfid, is, calib_fid_heldout, calib_is_heldout,
calib_fid_recon, calib_is_recon, sample_codebook_usage, sample_codebook_entropy,
data_codebook_usage, data_codebook_entropy, num_samples, num_classes; a guidance sweep adds
`sweep/<schedule>/s<s>/tau<tau>/<metric>` for gfid, is and sample_codebook_usage.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from sftok.config import DecodeConfig, GenerationConfig, SamplingConfig
from sftok.data.stream import image_batches
from sftok.data.uint8 import to_uint8
from sftok.evaluate.fid import (
    INCEPTION_NAME,
    FeatureStats,
    ReferenceStatistics,
    fid_from_statistics,
    inception_score,
    load_statistics,
    open_features,
)
from sftok.evaluate.tokens import TokenAccumulator
from sftok.generation.pretokenize import TokenSet
from sftok.generation.sampling import class_balanced_labels, sample_tokens, tokens_to_images
from sftok.run_record import sweep_metric


@dataclass
class GenerationResult:
    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # metric -> why
    grid: np.ndarray | None = None  # per-class sample grid H×W×3 uint8 (one row per class)
    grid_classes: list[int] = field(default_factory=list)  # the class of each grid row
    sweep: list[dict] = field(default_factory=list)  # rows: schedule, scale, temperature, metrics


GRID_PAD = 2  # pixels between and around the images of a class grid


def class_grid(images: Tensor, rows: int, pad: int = GRID_PAD, pad_value: int = 255
               ) -> np.ndarray:
    """uint8 (rows·n)×3×H×W, grouped by row -> uint8 grid with `rows` rows of n images."""
    b, c, h, w = images.shape
    if images.dtype != torch.uint8 or rows < 1 or b % rows:
        raise ValueError("class_grid: uint8 images whose count is a multiple of rows")
    n = b // rows
    out = np.full((rows * h + (rows + 1) * pad, n * w + (n + 1) * pad, c), pad_value, np.uint8)
    arr = images.detach().cpu().permute(0, 2, 3, 1).numpy()
    for i in range(b):
        r, j = divmod(i, n)
        y, x = pad + r * (h + pad), pad + j * (w + pad)
        out[y:y + h, x:x + w] = arr[i]
    return out


def sweep_points(g: GenerationConfig) -> list[SamplingConfig]:
    """The sampling configs of the guidance sweep (s x schedule x tau); [] when none is set."""
    e, s = g.eval, g.sampling
    if not (e.sweep_scales or e.sweep_schedules or e.sweep_temperatures):
        return []
    return [dataclasses.replace(s, guidance_scale=float(sc), guidance_schedule=sch,
                                temperature=float(t))
            for sch, sc, t in itertools.product(e.sweep_schedules or (s.guidance_schedule,),
                                                e.sweep_scales or (s.guidance_scale,),
                                                e.sweep_temperatures or (s.temperature,))]


class _Scorer:
    """Streams uint8 images into FID feature sums, IS logits and nothing else."""

    def __init__(self, features):
        self.features, self.stats, self.logits = features, FeatureStats(), []

    def update(self, images_u8: Tensor) -> None:
        if self.features is not None:
            f, logits = self.features(images_u8)
            self.stats.update(f)
            self.logits.append(logits)

    def scores(self, ref: dict | None) -> dict[str, float]:
        if self.features is None or self.stats.n < 2:
            return {}
        out = {"is": inception_score(torch.cat(self.logits))[0]}
        if ref is not None:
            out["fid"] = fid_from_statistics(ref, self.stats.statistics())
        return out


def _reference(cfg: GenerationConfig, features, images: Iterable | None, cache_dir,
               reference_key: str | None, unavailable: dict) -> dict | None:
    """FID reference statistics: the provided file, else those of `images` (cached by
    reference_key, a cached entry checked against a hash of the images)."""
    if cfg.eval.reference_stats:
        return load_statistics(cfg.eval.reference_stats)
    if images is None:
        unavailable["gfid"] = ("no FID reference statistics: set generation.eval.reference_stats "
                               "to an .npz with mu/sigma or provide the training images")
        return None
    ref = ReferenceStatistics(features, cache_dir, reference_key and f"gen-{reference_key}",
                              key_name="reference_key")
    for x in images:
        ref.update(to_uint8(x[0] if isinstance(x, (tuple, list)) else x))
    stats, why = ref.result()
    if why:
        unavailable["gfid"] = why
    return stats


def _sample_point(generator, tokenizer, teacher, classes: list[int], sampling: SamplingConfig,
                  cfg: GenerationConfig, decode_cfg: DecodeConfig, features, device,
                  keep_grid: int) -> tuple[_Scorer, TokenAccumulator, Tensor | None]:
    """Sample `samples_per_class` per class in batches; returns scorer, token stats, grid
    images (the first `keep_grid` samples of each of the first grid_classes classes)."""
    e = cfg.eval
    labels = class_balanced_labels(classes, e.samples_per_class)
    g_tok = torch.Generator(device=device).manual_seed(e.seed)
    g_pix = torch.Generator(device=device).manual_seed(e.seed + 1)
    scorer, tokens = _Scorer(features), TokenAccumulator(generator.num_codes)
    grid_sel = set(classes[:e.grid_classes]) if keep_grid else set()
    kept: dict[int, list[Tensor]] = {c: [] for c in grid_sel}
    for start in range(0, len(labels), e.batch_size):
        y = labels[start:start + e.batch_size].to(device)
        ids = sample_tokens(generator, y, sampling, g_tok)
        tokens.update_codes(ids.cpu())
        need_pixels = features is not None or any(len(kept[c]) < keep_grid for c in kept)
        if not need_pixels:
            continue
        x_u8 = to_uint8(tokens_to_images(tokenizer, teacher, ids, decode_cfg, g_pix))
        scorer.update(x_u8)
        for img, c in zip(x_u8.cpu(), y.tolist()):
            if c in kept and len(kept[c]) < keep_grid:
                kept[c].append(img)
    grid = None
    if kept:
        rows = [torch.stack(kept[c]) for c in classes[:e.grid_classes]]
        grid = torch.cat(rows)
    return scorer, tokens, grid


@torch.no_grad()
def evaluate_generation(generator, tokenizer, teacher, cfg: GenerationConfig,
                        decode_cfg: DecodeConfig, real_tokens: TokenSet, *,
                        reference_images: Iterable | None = None,
                        heldout_images: Iterable | None = None, device=None,
                        cache_dir: str | os.PathLike | None = None,
                        reference_key: str | None = None,
                        inception_weights: str | None = None,
                        fid_feature_extractor: str = INCEPTION_NAME) -> GenerationResult:
    """Score `generator` (MaskGITGenerator, eval mode) on the classes of `real_tokens`.

    tokenizer / teacher / decode_cfg: how tokens become pixels (the tokenizer's own S-step
    decoder). real_tokens: the training TokenSet (classes, data token statistics, and the
    calib_fid_recon row). reference_images / heldout_images: iterables of float B×3×H×W in
    [0, 1] (or (images, labels)); reference_key caches the computed reference statistics.
    """
    device = torch.device(device) if device is not None else next(generator.parameters()).device
    e, wanted = cfg.eval, set(cfg.eval.metrics)
    res = GenerationResult()
    m = res.metrics
    classes = real_tokens.classes()
    features = None
    if wanted & {"gfid", "is", "calibration"}:
        features, msg = open_features(fid_feature_extractor, inception_weights, device)
        for name in ("gfid", "is", "calibration"):
            if msg and name in wanted:
                res.unavailable[name] = msg
    ref = None
    if features is not None and wanted & {"gfid", "calibration"}:
        ref = _reference(cfg, features, reference_images, cache_dir, reference_key,
                         res.unavailable)

    was = generator.training, tokenizer.training
    generator.eval()
    tokenizer.eval()
    try:
        scorer, toks, grid = _sample_point(generator, tokenizer, teacher, classes, cfg.sampling,
                                           cfg, decode_cfg, features, device, e.grid_per_class)
        sc = scorer.scores(ref)
        if "gfid" in wanted and "fid" in sc:
            m["gfid"] = sc["fid"]
        if "is" in wanted and "is" in sc:
            m["is"] = sc["is"]
        if "tokens" in wanted:
            r = toks.result()
            m["sample_codebook_usage"] = r["codebook_usage"]
            m["sample_codebook_entropy"] = r["codebook_entropy"]
            data = TokenAccumulator(generator.num_codes)
            data.update_codes(real_tokens.tokens)
            r = data.result()
            m["data_codebook_usage"] = r["codebook_usage"]
            m["data_codebook_entropy"] = r["codebook_entropy"]
        m["num_samples"] = float(len(classes) * e.samples_per_class)
        m["num_classes"] = float(len(classes))
        if grid is not None:
            res.grid = class_grid(grid, len(classes[:e.grid_classes]))
            res.grid_classes = classes[:e.grid_classes]

        for point in sweep_points(cfg):
            sc_p, toks_p, _ = _sample_point(generator, tokenizer, teacher, classes, point, cfg,
                                            decode_cfg, features, device, 0)
            row = {"schedule": point.guidance_schedule, "scale": point.guidance_scale,
                   "temperature": point.temperature,
                   "sample_codebook_usage": toks_p.result()["codebook_usage"]}
            scores = sc_p.scores(ref)
            if "fid" in scores:
                row["gfid"] = scores["fid"]
            if "is" in scores:
                row["is"] = scores["is"]
            res.sweep.append(row)
            for k in ("gfid", "is", "sample_codebook_usage"):
                if k in row:
                    m[sweep_metric(point.guidance_schedule, point.guidance_scale,
                                   point.temperature, k)] = row[k]

        if "calibration" in wanted and features is not None:
            if heldout_images is not None:
                real = _Scorer(features)
                for x in image_batches(heldout_images, e.batch_size, e.max_heldout_images):
                    real.update(to_uint8(x))
                _put_calib(m, "heldout", real.scores(ref))
            rec = _Scorer(features)
            rows = balanced_real_tokens(real_tokens, classes, e.samples_per_class)
            g_pix = torch.Generator(device=device).manual_seed(e.seed + 2)
            for start in range(0, rows.shape[0], e.batch_size):
                ids = rows[start:start + e.batch_size].to(device)
                rec.update(to_uint8(tokens_to_images(tokenizer, teacher, ids, decode_cfg,
                                                     g_pix)))
            _put_calib(m, "recon", rec.scores(ref))
    finally:
        generator.train(was[0])
        tokenizer.train(was[1])
    return res


def balanced_real_tokens(tokens: TokenSet, classes: list[int], per_class: int) -> Tensor:
    """Up to `per_class` unflipped token rows of each class (in class order): the real-token
    counterpart of the class-balanced samples, for the calib_fid_recon row."""
    plain = ~tokens.flipped
    return torch.cat([tokens.tokens[plain & (tokens.labels == c)][:per_class] for c in classes])


def _put_calib(m: dict, name: str, scores: dict[str, float]) -> None:
    if "fid" in scores:
        m[f"calib_fid_{name}"] = scores["fid"]
    if "is" in scores:
        m[f"calib_is_{name}"] = scores["is"]

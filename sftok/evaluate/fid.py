"""rFID and Inception Score through torch-fidelity (paper Table 1, Figure 8).

The features come from torch-fidelity's feature extractors (by default its standard
"inception-v3-compat" network with the TF-ported FID weights
`weights-inception-2015-12-05-6726825d.pth`, layer "2048" for FID and "logits_unbiased" for IS),
and the numbers from torch-fidelity's own `fid_statistics_to_metric` / `isc_features_to_metric`,
so our rFID / IS are the field's. What we add is streaming (DESIGN §2 'bounded memory'):
FID needs only the running sums Σx and Σxxᵀ of the features (`FeatureStats`), never the
images; IS keeps the 1008 logits per image (4 KB / image), not the image.

Reference statistics: rFID compares reconstructions with the *same* validation images
(as the paper does), gFID samples with the training images. Their Gaussian is computed while the
images stream by and cached per key, checked against a hash of the images
(`ReferenceStatistics`, `ReferenceStatsCache`).

Offline (DESIGN §2): the Inception weights are never downloaded from here. They are found as
(1) an explicit path, (2) $SFTOK_INCEPTION_WEIGHTS, (3) torch-fidelity's default download
location `<torch hub dir>/checkpoints/weights-inception-2015-12-05-6726825d.pth`; when none
exists, `find_inception_weights` says so with one message and rFID / IS are reported as
unavailable — torch-fidelity never gets the chance to try the network.
"""
from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sftok.data.uint8 import ContentHash
from sftok.weights import find_weights

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "SFTOK_INCEPTION_WEIGHTS"


def _inception_url() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError:  # only the message needs it: say where, without the package
        return "torch-fidelity's GitHub releases (torch-fidelity itself is not installed here)"
    return URL_INCEPTION_V3


# --------------------------------------------------------------------------------------------
# The Fréchet distance
# --------------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein²) distance of N(mu1, sigma1) and N(mu2, sigma2).

    d² = ‖mu1 − mu2‖² + tr(sigma1) + tr(sigma2) − 2·tr((sigma1^½ sigma2 sigma1^½)^½).
    mu: (D,), sigma: D×D symmetric PSD. The trace term uses the symmetric form and `eigh`
    (eigenvalues of a PSD matrix, negatives from round-off clipped to 0), which stays real and
    stable for the rank-deficient covariances of small evaluation sets (n < D).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"frechet_distance: shapes mu {mu1.shape}/{mu2.shape}, "
                         f"sigma {s1.shape}/{s2.shape}")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # sigma1^½
    m = root1 @ s2 @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_covmean = np.sqrt(np.clip(ev, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


class FeatureStats:
    """Running mean and covariance of D-dim features, in float64 (bounded memory for FID).

    update(features n×D) accumulates n, Σx, Σxxᵀ; `mu` and `sigma` equal np.mean and np.cov
    (unbiased, ddof=1 — what torch-fidelity computes from the full feature matrix).
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self.sum = None if dim is None else np.zeros(dim)
        self.outer = None if dim is None else np.zeros((dim, dim))

    def update(self, features: Tensor) -> None:
        f = features.detach().double().reshape(features.shape[0], -1)
        if self.sum is None:
            self.sum = np.zeros(f.shape[1])
            self.outer = np.zeros((f.shape[1], f.shape[1]))
        self.n += f.shape[0]
        self.sum += f.sum(0).cpu().numpy()
        self.outer += (f.T @ f).cpu().numpy()

    @property
    def mu(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError("FeatureStats: the covariance needs at least 2 samples")
        mu = self.mu
        return (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1)

    def statistics(self) -> dict[str, np.ndarray]:
        """{'mu': (D,), 'sigma': D×D} — torch-fidelity's statistics format."""
        return {"mu": self.mu, "sigma": self.sigma}


def fid_from_statistics(stats1: dict[str, np.ndarray], stats2: dict[str, np.ndarray]) -> float:
    """FID of two {'mu', 'sigma'} statistics by torch-fidelity's `fid_statistics_to_metric`."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    s1 = {k: np.asarray(v, np.float64) for k, v in stats1.items()}
    s2 = {k: np.asarray(v, np.float64) for k, v in stats2.items()}
    return float(fid_statistics_to_metric(s1, s2, verbose=False)[KEY_METRIC_FID])


def inception_score(logits: Tensor, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """IS (mean, std over splits) of per-image logits n×L by torch-fidelity's
    `isc_features_to_metric` (shuffled with its default seed; splits = min(splits, n))."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    out = isc_features_to_metric(logits.detach().cpu().float(), splits=min(splits, len(logits)),
                                 shuffle=True, rng_seed=seed)
    return float(out[KEY_METRIC_ISC_MEAN]), float(out[KEY_METRIC_ISC_STD])


# --------------------------------------------------------------------------------------------
# Finding the weights offline
# --------------------------------------------------------------------------------------------


def hub_checkpoint_dir() -> Path:
    """Where torch.hub (and so torch-fidelity / torchvision) caches downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(path: str | os.PathLike | None = None) -> tuple[Path | None, str]:
    """(path to the Inception FID weights, "") or (None, one message saying how to provide them).

    Looks at `path`, then $SFTOK_INCEPTION_WEIGHTS, then the torch hub cache; never downloads.
    """
    hub_file = hub_checkpoint_dir() / INCEPTION_FILENAME
    how = (f"set {INCEPTION_ENV}=/path/to/{INCEPTION_FILENAME} (or pass inception_weights=...), "
           f"or put the file in the torch hub cache as {hub_file} "
           f"(it is torch-fidelity's standard file, downloadable from {_inception_url()})")
    return find_weights("Inception-v3 FID weights", ("inception_weights", path), INCEPTION_ENV,
                        hub_file, how)


# --------------------------------------------------------------------------------------------
# Streaming feature extraction
# --------------------------------------------------------------------------------------------


class FidelityFeatures:
    """A torch-fidelity feature extractor that maps uint8 images to (FID features, IS logits).

    name: a torch-fidelity registered extractor; the standard "inception-v3-compat" needs
        `weights_path` (see `find_inception_weights`), a test extractor may need none.
    __call__(images uint8 B×3×H×W) -> (fid_features B×D float32, isc_logits B×L float32), on CPU.
    """

    def __init__(self, name: str = INCEPTION_NAME, weights_path: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu"):
        from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
        from torch_fidelity.utils import create_feature_extractor

        if name not in FEATURE_EXTRACTORS_REGISTRY:
            raise ValueError(f"unknown torch-fidelity feature extractor {name!r}")
        cls = FEATURE_EXTRACTORS_REGISTRY[name]
        self.name = name
        self.fid_layer = cls.get_default_feature_layer_for_metric("fid")
        self.isc_layer = cls.get_default_feature_layer_for_metric("isc")
        kwargs = {"verbose": False}
        if weights_path is not None:
            # torch-fidelity loads the file with weights_only=False; check first that it is a
            # plain tensor file (DESIGN §2: torch.load only with weights_only=True).
            torch.load(weights_path, map_location="cpu", weights_only=True)
            kwargs["feature_extractor_weights_path"] = str(weights_path)
        elif name == INCEPTION_NAME:
            raise FileNotFoundError(find_inception_weights()[1])  # never let it download
        layers = list(dict.fromkeys([self.fid_layer, self.isc_layer]))
        self.extractor = create_feature_extractor(name, layers, cuda=False, **kwargs)
        self.extractor.to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if images.dtype != torch.uint8:
            raise TypeError("FidelityFeatures expects uint8 images B×3×H×W")
        out = self.extractor.convert_features_tuple_to_dict(self.extractor(images.to(self.device)))
        return out[self.fid_layer].float().cpu(), out[self.isc_layer].float().cpu()


# --------------------------------------------------------------------------------------------
# Reference statistics, cached per dataset
# --------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # D×D
    num_images: int
    content_sha256: str

    def statistics(self) -> dict[str, np.ndarray]:
        return {"mu": self.mu, "sigma": self.sigma}


class ReferenceStatsCache:
    """FID statistics of a dataset's validation images under
    `cache_dir/fid_stats/<dataset key>-<extractor>-<layer>.npz` (mu, sigma, n, content sha256)."""

    def __init__(self, cache_dir: str | os.PathLike, dataset_key: str, extractor: str, layer: str):
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{dataset_key}-{extractor}-{layer}")
        self.path = Path(cache_dir) / "fid_stats" / f"{safe}.npz"

    def load(self) -> ReferenceStats | None:
        if not self.path.is_file():
            return None
        with np.load(self.path, allow_pickle=False) as z:
            return ReferenceStats(mu=z["mu"], sigma=z["sigma"], num_images=int(z["num_images"]),
                                  content_sha256=str(z["content_sha256"]))

    def save(self, stats: ReferenceStats) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp.npz")
        np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_images=stats.num_images,
                 content_sha256=stats.content_sha256)
        os.replace(tmp, self.path)  # atomic: concurrent trials never read a half-written file


class ReferenceStatistics:
    """The FID reference statistics of a stream of real images, cached per key.

    Feed every real batch (uint8 B×3×H×W) to `update`, then `result()`. With `cache_dir` and
    `key` a cached entry (`ReferenceStatsCache`) is used only if the stream's content hash is
    the one it was computed on, and the features are extracted only on a miss (then cached).
    Used by rFID (the validation images) and gFID (the training images) alike.
    """

    def __init__(self, features: FidelityFeatures, cache_dir: str | os.PathLike | None = None,
                 key: str | None = None, key_name: str = "key"):
        self.features, self.key, self.key_name = features, key, key_name
        self.cache = (ReferenceStatsCache(cache_dir, key, features.name, features.fid_layer)
                      if cache_dir is not None and key else None)
        self.cached = self.cache.load() if self.cache is not None else None
        self.stats = FeatureStats() if self.cached is None else None
        self.content = ContentHash()

    def update(self, images_u8: Tensor) -> None:
        self.content.update(images_u8)
        if self.stats is not None:
            self.stats.update(self.features(images_u8)[0])

    def result(self) -> tuple[dict[str, np.ndarray] | None, str]:
        """({'mu', 'sigma'}, "") or (None, one message saying why there are none)."""
        if self.cached is not None:
            if self.cached.content_sha256 != self.content.hexdigest():
                return None, (f"cached FID reference statistics {self.cache.path} were computed "
                              f"on other images ({self.key_name}={self.key!r}); delete the file "
                              f"or use another {self.key_name}")
            return self.cached.statistics(), ""
        if self.stats.n < 2:
            return None, "FID reference statistics need at least 2 images (a covariance)"
        ref = ReferenceStats(self.stats.mu, self.stats.sigma, self.stats.n,
                             self.content.hexdigest())
        if self.cache is not None:
            self.cache.save(ref)
        return ref.statistics(), ""


# What loading a wrong or corrupt weights file raises (torch.load, load_state_dict, vassert).
LOAD_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError)


def open_features(name: str = INCEPTION_NAME, weights: str | os.PathLike | None = None,
                  device: torch.device | str = "cpu") -> tuple[FidelityFeatures | None, str]:
    """(FidelityFeatures, "") or (None, one message saying why FID / IS are unavailable).

    The standard Inception network is looked up offline (`find_inception_weights`); a test
    extractor registered with torch-fidelity needs no file. Never downloads (DESIGN §2).
    """
    path, msg = (None, "")
    if name == INCEPTION_NAME:
        path, msg = find_inception_weights(weights)
    if msg:
        return None, msg
    try:
        return FidelityFeatures(name, path, device), ""
    except LOAD_ERRORS as e:  # a corrupt or wrong file: say which
        return None, f"could not load the FID feature extractor from {path}: {e}"


def load_statistics(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """{'mu', 'sigma'} from an .npz file of FID reference statistics (ADM's
    VIRTUAL_imagenet256_labeled.npz layout: arrays `mu` (D,) and `sigma` D×D; extra arrays
    such as ADM's `arr_0` features are ignored)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"FID reference statistics {p} not found: provide an .npz with "
                                "arrays mu and sigma (e.g. ADM's VIRTUAL_imagenet256_labeled.npz)")
    with np.load(p, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{p}: FID reference statistics need arrays 'mu' and 'sigma', "
                             f"found {sorted(z.files)}")
        return {"mu": np.asarray(z["mu"], np.float64), "sigma": np.asarray(z["sigma"], np.float64)}

"""Statistics the paper lacks: mean ± 95% CI over seeds (Student t) and paired differences.

The paper reports single runs. We repeat every arm over seeds; an arm's interval is
mean ± t_{n-1, 0.975} · s / √n, and two arms are compared by the paired difference over the
seeds both have (same seed = same data order and initialisation), which removes the
seed-to-seed variance the arms share.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as _st


@dataclass(frozen=True)
class Interval:
    mean: float
    half: float  # half-width of the interval; NaN when n < 2
    n: int
    std: float

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def overlaps(self, other: Interval) -> bool | None:
        """True when the intervals share a point; None (undetermined) when either is undefined
        (n < 2), so that a missing interval is never read as overlap or separation."""
        if math.isnan(self.half) or math.isnan(other.half):
            return None
        return self.low <= other.high and other.low <= self.high

    def fmt(self, digits: int = 3) -> str:
        return format_ci(self.mean, self.half, digits)


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and Student-t confidence half-width of the finite values (NaNs dropped)."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, 1, math.nan)
    std = float(x.std(ddof=1))
    t = float(_st.t.ppf(0.5 + confidence / 2, df=n - 1))
    return Interval(mean, t * std / math.sqrt(n), n, std)


def summarize(df: pd.DataFrame, by: str | list[str], value: str,
              confidence: float = 0.95) -> pd.DataFrame:
    """Per group: n, mean, std, ci_low, ci_high, ci_half of column `value`."""
    rows = []
    for key, g in df.groupby(by, sort=True, dropna=False):
        iv = mean_ci(g[value], confidence)
        keys = key if isinstance(key, tuple) else (key,)
        names = by if isinstance(by, list) else [by]
        rows.append({**dict(zip(names, keys)), "n": iv.n, "mean": iv.mean, "std": iv.std,
                     "ci_low": iv.low, "ci_high": iv.high, "ci_half": iv.half})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class PairedDiff:
    a: str
    b: str
    diff: Interval  # of (b - a) over common seeds
    seeds: tuple
    p_value: float  # two-sided paired t-test; NaN when n < 2 or the differences are constant

    @property
    def excludes_zero(self) -> bool:
        return not math.isnan(self.diff.half) and (self.diff.low > 0 or self.diff.high < 0)


def paired_diff(df: pd.DataFrame, arm_col: str, seed_col: str, value: str, a, b,
                confidence: float = 0.95) -> PairedDiff:
    """Difference value[b] - value[a] over the seeds both arms have (finite values only)."""
    va = df[df[arm_col] == a].groupby(seed_col)[value].mean()
    vb = df[df[arm_col] == b].groupby(seed_col)[value].mean()
    common = va.index.intersection(vb.index)
    d = (vb.loc[common] - va.loc[common]).astype(float)
    d = d[np.isfinite(d)]
    iv = mean_ci(d.values, confidence)
    p = math.nan  # undefined for n < 2 and for zero-variance differences (t = ±inf or 0/0)
    if iv.n >= 2 and iv.std > 0:
        p = float(_st.ttest_1samp(d.values, 0.0).pvalue)
    return PairedDiff(str(a), str(b), iv, tuple(sorted(d.index.tolist())), p)


def format_ci(mean: float, half: float, digits: int = 3) -> str:
    """'4.330 ± 0.120', or just the mean when the half-width is undefined; '—' for no data."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "—"
    if half is None or (isinstance(half, float) and math.isnan(half)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def format_p(p: float) -> str:
    """'<0.001', '0.042', or 'n/a' when the p-value is undefined (NaN)."""
    if p is None or math.isnan(p):
        return "n/a"
    return "<0.001" if p < 1e-3 else f"{p:.3f}"


def paired_table(df: pd.DataFrame, arm_col: str, seed_col: str, value: str,
                 pairs: Iterable[tuple], confidence: float = 0.95) -> pd.DataFrame:
    """One row per (a, b) pair: b - a over common seeds, its CI, and the paired t-test p."""
    rows = []
    for a, b in pairs:
        pd_ = paired_diff(df, arm_col, seed_col, value, a, b, confidence)
        rows.append({"a": a, "b": b, "n_common_seeds": pd_.diff.n, "diff_mean": pd_.diff.mean,
                     "ci_low": pd_.diff.low, "ci_high": pd_.diff.high, "p_value": pd_.p_value,
                     "excludes_zero": pd_.excludes_zero})
    return pd.DataFrame(rows)


def rank_groups(means: dict, higher_is_better: bool, rel_tol: float = 1e-9) -> list[list]:
    """Keys ordered best first, equal means (within rel_tol) grouped: [[a], [b, c], ...]."""
    keys = sorted(means, key=lambda k: means[k], reverse=higher_is_better)
    groups: list[list] = []
    for k in keys:
        if groups and math.isclose(means[groups[-1][0]], means[k], rel_tol=rel_tol, abs_tol=0.0):
            groups[-1].append(k)
        else:
            groups.append([k])
    return groups


def order_text(groups: list[list], fmt=str) -> str:
    """[[a], [b, c]] -> 'a > b = c' (best first)."""
    return " > ".join(" = ".join(fmt(k) for k in g) for g in groups)

"""95% intervals for every reported measure.

Where a condition has two or more seeds the interval is a t-interval over the seeds' values
("seeds-t95"): seeds are the replicates. With one seed there is nothing to spread over, so
the examples are resampled instead ("bootstrap95", percentile interval, seeded per cell so a
rerun or the other engine gives the same bounds).
"""

from __future__ import annotations

import math
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

SEEDS_T = "seeds-t95"
BOOTSTRAP = "bootstrap95"
BOOT_CHUNK = 100  # resamples drawn at once: bounds memory at B x n for wide correlations


@dataclass(frozen=True)
class Estimate:
    value: float | None
    lo: float | None = None
    hi: float | None = None


def rng_for(*key: object) -> np.random.Generator:
    """A generator seeded by the cell's name alone, so bounds never depend on run order."""
    return np.random.default_rng(zlib.crc32("\x1f".join(str(k) for k in key).encode()))


def finite(xs: Sequence[float | None]) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


def t_interval(values: Sequence[float | None]) -> Estimate:
    """Mean and 95% t-interval; one value gives no interval, none gives nothing."""
    from scipy import stats

    v = finite(values)
    if not v:
        return Estimate(None)
    mean = float(np.mean(v))
    if len(v) < 2:
        return Estimate(mean)
    half = float(stats.t.ppf(0.975, len(v) - 1)) * float(np.std(v, ddof=1)) / math.sqrt(len(v))
    return Estimate(mean, mean - half, mean + half)


def percentile(draws: np.ndarray) -> tuple[float | None, float | None]:
    """2.5th and 97.5th percentiles of the finite draws; none when most draws are undefined
    (a resampled denominator below the headroom floor, a constant resample)."""
    d = draws[np.isfinite(draws)]
    if d.size < max(2, draws.size // 2):
        return None, None
    lo, hi = np.percentile(d, [2.5, 97.5])
    return float(lo), float(hi)


def resample_chunks(n: int, resamples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Bootstrap indices into n points, BOOT_CHUNK resamples (rows) at a time."""
    for start in range(0, resamples, BOOT_CHUNK):
        yield rng.integers(0, n, size=(min(BOOT_CHUNK, resamples - start), n))


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xc = x - x.mean(axis=1, keepdims=True)
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(axis=1) / np.sqrt((xc**2).sum(axis=1) * (yc**2).sum(axis=1))


def bootstrap_correlation(x: np.ndarray, y: np.ndarray, resamples: int, rng: np.random.Generator) -> dict[str, tuple]:
    """Percentile bounds of Pearson and Spearman r over resampled points. Spearman's r of a
    resample is taken as Pearson's r of the resampled original ranks: the same statistic up to
    how repeated points tie, and vectorised, which a paper-scale example-level table needs."""
    from scipy.stats import rankdata

    n = len(x)
    rx, ry = rankdata(x), rankdata(y)
    pearson, spearman = [], []
    for idx in resample_chunks(n, resamples, rng):
        pearson.append(_rowwise_pearson(x[idx], y[idx]))
        spearman.append(_rowwise_pearson(rx[idx], ry[idx]))
    return {"pearson_r": percentile(np.concatenate(pearson)), "spearman_r": percentile(np.concatenate(spearman))}


@dataclass(frozen=True)
class Correlation:
    n: int
    pearson_r: float | None
    pearson_p: float | None
    spearman_r: float | None
    spearman_p: float | None


def _clean(v: float) -> float | None:
    v = float(v)
    return None if math.isnan(v) else v


def correlate(x: list[float | None] | np.ndarray, y: list[float | None] | np.ndarray) -> Correlation:
    """Pearson and Spearman with two-sided p-values over the pairs where both are defined;
    None where fewer than 3 pairs remain or one side is constant."""
    from scipy import stats

    xa = np.array([np.nan if v is None else v for v in x], dtype=np.float64)
    ya = np.array([np.nan if v is None else v for v in y], dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    xa, ya = xa[ok], ya[ok]
    n = int(ok.sum())
    if n < 3 or np.ptp(xa) == 0 or np.ptp(ya) == 0:
        return Correlation(n, None, None, None, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pr = stats.pearsonr(xa, ya)
        sr = stats.spearmanr(xa, ya)
    return Correlation(n, _clean(pr.statistic), _clean(pr.pvalue), _clean(sr.statistic), _clean(sr.pvalue))


def correlation_estimates(by_seed: dict[object, tuple[list, list]], resamples: int, key: tuple) -> dict[str, object]:
    """Pearson and Spearman r of x against y with their intervals. Points are grouped by
    seed: with two or more seeds r is computed per seed and the mean and t-interval taken
    over seeds; with one seed r is that seed's and the points are bootstrapped. p-values are
    those of all points together."""
    xs = [v for s in sorted(by_seed, key=str) for v in by_seed[s][0]]
    ys = [v for s in sorted(by_seed, key=str) for v in by_seed[s][1]]
    pooled = correlate(xs, ys)
    out: dict[str, object] = {
        "n": pooled.n,
        "pearson_r": pooled.pearson_r,
        "pearson_p": pooled.pearson_p,
        "spearman_r": pooled.spearman_r,
        "spearman_p": pooled.spearman_p,
        "pearson_r_lo": None,
        "pearson_r_hi": None,
        "spearman_r_lo": None,
        "spearman_r_hi": None,
        "n_seeds": len(by_seed),
        "interval": SEEDS_T if len(by_seed) >= 2 else BOOTSTRAP,
    }
    if len(by_seed) >= 2:
        per = [correlate(*by_seed[s]) for s in sorted(by_seed, key=str)]
        for name in ("pearson_r", "spearman_r"):
            est = t_interval([getattr(c, name) for c in per])
            out[name], out[f"{name}_lo"], out[f"{name}_hi"] = est.value, _clip(est.lo), _clip(est.hi)
        return out
    if pooled.pearson_r is None:
        return out
    xa = np.array([np.nan if v is None else v for v in xs], dtype=np.float64)
    ya = np.array([np.nan if v is None else v for v in ys], dtype=np.float64)
    ok = np.isfinite(xa) & np.isfinite(ya)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounds = bootstrap_correlation(xa[ok], ya[ok], resamples, rng_for(*key))
    for name, (lo, hi) in bounds.items():
        out[f"{name}_lo"], out[f"{name}_hi"] = lo, hi
    return out


def _clip(v: float | None) -> float | None:
    return None if v is None else max(-1.0, min(1.0, v))


def bootstrap_mean_of_counts(
    values: np.ndarray, counts: np.ndarray, resamples: int, rng: np.random.Generator
) -> tuple[float | None, float | None]:
    """Percentile bounds of the mean of n = sum(counts) points, `counts[i]` of them equal to
    `values[i]`. Resampling n points is a multinomial draw over the distinct values (the
    same distribution), so a resample costs O(distinct values) rather than O(n)."""
    n = int(counts.sum())
    if n < 2:
        return None, None
    draws = rng.multinomial(n, counts / n, size=resamples) @ values.astype(np.float64) / n
    return percentile(draws)

"""Paired bootstrap intervals for differences between two answering modes (or recipes).

Both modes answered the same questions, so the difference is computed per question and
the questions are resampled with replacement (the pairing is kept: a resample draws a
question with both of its scores). The interval is the percentile interval of the
resampled mean differences. A difference is *distinguishable from zero* at this sample
size when its interval excludes 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_SEED = 0
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``a - b`` over paired questions, with its bootstrap interval."""

    diff: float
    ci_low: float
    ci_high: float
    n: int
    level: float = 0.95

    @property
    def distinguishable(self) -> bool:
        """The interval excludes zero."""
        return self.ci_low > 0 or self.ci_high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "distinguishable": self.distinguishable}

    def __str__(self) -> str:
        return f"{self.diff:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}] (n={self.n})"


def paired_bootstrap(a: list[float] | np.ndarray, b: list[float] | np.ndarray, *, resamples: int = DEFAULT_RESAMPLES,
                     level: float = 0.95, seed: int = DEFAULT_SEED) -> PairedDiff:
    """Bootstrap interval of ``mean(a - b)``; ``a[i]`` and ``b[i]`` score the same question."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be two 1-D arrays of one length, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = a.shape[0]
    if n == 0:
        return PairedDiff(float("nan"), float("nan"), float("nan"), 0, level)
    d = a - b
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ELEMENTS // n)  # resamples drawn per block: memory stays bounded for large n
    means = np.concatenate([d[rng.integers(0, n, size=(min(rows, resamples - s), n))].mean(axis=1)
                            for s in range(0, resamples, rows)])
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return PairedDiff(float(d.mean()), float(lo), float(hi), n, level)


def paired_scores(rows: list[dict], key_a: tuple, key_b: tuple, metric: str = "f1",
                  key=lambda r: (r["mode"], r.get("init"))) -> tuple[list[float], list[float]]:
    """Scores of the questions answered under both ``key_a`` and ``key_b`` (by question id), aligned."""
    a = {r["id"]: r[metric] for r in rows if key(r) == key_a and metric in r}
    b = {r["id"]: r[metric] for r in rows if key(r) == key_b and metric in r}
    ids = sorted(a.keys() & b.keys())
    return [a[i] for i in ids], [b[i] for i in ids]

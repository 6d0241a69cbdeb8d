"""An answer is a distribution over seeds: per-seed values -> mean, 95% interval, test, verdict.

A claim such as "bound pairs move closer than controls" is about fine-tuning in general, not about one
run, so it is measured once per seed (a seed is the whole pipeline: its own base, fine-tunes and data
order) and judged on the spread of those N numbers:

* interval  mean ± t(0.975, N-1) · s / √N, Student's t over seeds (s the sample standard deviation).
            Why t and not a bootstrap: at N = 5 a percentile bootstrap resamples the same five numbers,
            so its interval never leaves their range and its spread of the mean is too small by
            √((N-1)/N) before any other error; it undercovers badly (Efron & Tibshirani 1993, "An
            Introduction to the Bootstrap", §13). The t interval is exact for normal per-seed values
            and widens honestly as N shrinks (t(0.975, 4) = 2.776 against the normal 1.960).
* test      a one-sample t-test of the mean against the claim's threshold, two-sided, so that at level
            α = 0.05 "rejected" is exactly "the 95% interval excludes the threshold".
* family    one report makes many verdicts; Holm's step-down correction (Holm 1979, "A Simple
            Sequentially Rejective Multiple Test Procedure") keeps the chance of any false verdict in
            the report at most α, whatever the dependence between the tests, and rejects at least as
            much as Bonferroni.
* verdict   "true" or "false" only when the corrected test rejects, in the claim's direction or against
            it; otherwise "not settled by N seeds". The interval is always shown with it.

* power     before a design is trusted to answer, ask what it can detect: `detectable_effect` is the
            smallest true mean difference from the threshold that the two-sided t-test at level α finds
            with probability `power`, given the seed-to-seed spread s and N seeds (the noncentral t:
            Cohen 1988, "Statistical Power Analysis for the Behavioral Sciences", ch. 2). A claim whose
            effect is below it will read "not settled" most of the time, whatever is true.

If every seed gives the same value (s = 0: a count that came out equal, or a weight LoRA cannot touch
staying bit-identical), t is undefined. The interval is that point, and the test falls back to the
sign test: N values all on one side of the threshold have probability 2 · 2^-N under a null symmetric
about it, so N equal values alone never settle a claim below six seeds, even before the correction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from minilm.errors import MinilmError

ALPHA = 0.05  # family-wise error of one report's verdicts


@dataclass(frozen=True)
class Finding:
    """One number a claim rests on, measured once per seed, and what the claim says about it."""

    label: str                  # which model / part of the claim: "full", "lora-qv-r8 forgets less"
    values: tuple[float, ...]   # one per seed, in seed order
    threshold: float            # fixed in the claim's text before the run
    above: bool                 # the claim: mean > threshold (True) or mean < threshold (False)
    mean: float
    low: float                  # the 95% t interval over seeds (NaN below two seeds)
    high: float
    p: float                    # two-sided one-sample t-test of mean = threshold, uncorrected

    @property
    def n(self) -> int:
        return len(self.values)


def finding(label: str, values: Sequence[float], threshold: float, *, above: bool = True,
            level: float = 1 - ALPHA) -> Finding:
    """The mean, the `level` t interval and the t-test against `threshold` of per-seed `values`.

    t = (mean - threshold) / (s / √N), p = 2 · P(T_{N-1} > |t|); interval mean ± t_{(1+level)/2, N-1} s/√N.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0 or not np.isfinite(x).all():
        raise MinilmError(f"{label}: expected one finite number per seed, got {list(values)}")
    mean, n = float(x.mean()), len(x)
    if n < 2:  # no spread to judge by
        return Finding(label, tuple(x.tolist()), threshold, above, mean, float("nan"), float("nan"), 1.0)
    s = float(x.std(ddof=1))
    if s == 0:
        p = 1.0 if mean == threshold else min(1.0, 2.0 ** (1 - n))  # the sign test, all N on one side
        return Finding(label, tuple(x.tolist()), threshold, above, mean, mean, mean, p)
    se = s / np.sqrt(n)
    half = float(stats.t.ppf((1 + level) / 2, df=n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean - threshold) / se, df=n - 1))
    return Finding(label, tuple(x.tolist()), threshold, above, mean, float(mean - half), float(mean + half), p)


def detectable_effect(spread: float, n: int, alpha: float = ALPHA, power: float = 0.8) -> float:
    """Smallest |mean - threshold| that a two-sided one-sample t-test at level `alpha` over `n` seeds rejects
    with probability `power`, when per-seed values have standard deviation `spread`.

    Under the alternative, t = (mean - threshold) / (s/√n) follows the noncentral t with n-1 degrees of
    freedom and noncentrality δ√n/σ; solve P(|t| > t_{1-α/2}) = power for δ.
    """
    if n < 2 or not 0 < alpha < 1 or not 0 < power < 1 or not spread >= 0:
        raise MinilmError(f"detectable_effect needs n >= 2 seeds, 0 < alpha, power < 1 and spread >= 0; got n={n}, "
                          f"alpha={alpha}, power={power}, spread={spread}")
    if spread == 0:
        return 0.0
    df, critical = n - 1, float(stats.t.ppf(1 - alpha / 2, n - 1))

    def shortfall(nc):  # the far tail is tiny for nc > 0; scipy returns NaN for some of its values
        return float(stats.nct.sf(critical, df, nc) + np.nan_to_num(stats.nct.cdf(-critical, df, nc))) - power

    high = 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10)) * spread / np.sqrt(n)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values: reject hypothesis i at family-wise level α iff adjusted[i] <= α.

    Sorted ascending p_(1) <= ... <= p_(m), adjusted p_(j) = max over i <= j of min(1, (m - i + 1) p_(i)):
    the smallest is compared with α/m, the next with α/(m-1), ..., stopping at the first that fails.
    """
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])  # (m - i + 1) p_(i), i from 1
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)  # step-down: once one fails, all larger fail
    return adjusted


def verdict(f: Finding, p_adjusted: float, alpha: float = ALPHA) -> str:
    """'true' / 'false' when the (corrected) test rejects, by which side the mean lies on; else not settled."""
    if p_adjusted > alpha:
        return f"not settled by {f.n} seed{'s' if f.n != 1 else ''}"
    return "true" if (f.mean > f.threshold) == f.above else "false"


def settle(findings: Sequence[Finding], alpha: float = ALPHA) -> list[str]:
    """The verdict of each finding, Holm-corrected over all of them (one report's family)."""
    adjusted = holm([f.p for f in findings]) if findings else []
    return [verdict(f, q, alpha) for f, q in zip(findings, adjusted)]


def combine(labelled: Sequence[tuple[str, str]]) -> str:
    """One claim's verdict from its findings' (label, verdict): the common verdict if they agree,
    else which labels it is true, false and not settled for ("true for full; not settled by 5 seeds
    for lora-qv-r8")."""
    verdicts = [v for _, v in labelled]
    if verdicts and all(v == verdicts[0] for v in verdicts):
        return verdicts[0]
    parts = {}
    for label, v in labelled:
        parts.setdefault(v, []).append(label)
    return "; ".join(f"{v} for {', '.join(labels)}" for v, labels in parts.items())


def interval_text(f: Finding, digits: int = 3) -> str:
    """'+0.012 [-0.004, +0.028]' — the mean and its interval, as the report prints them."""
    if not np.isfinite(f.low):
        return f"{f.mean:+.{digits}g} (one seed: no interval)"
    return f"{f.mean:+.{digits}g} [{f.low:+.{digits}g}, {f.high:+.{digits}g}]"


def judge(claims: Sequence[dict], alpha: float = ALPHA) -> list[dict]:
    """Every claim's verdict from its findings, Holm-corrected over all the findings of one report.

    A claim is {"claim": text with its thresholds, "findings": [Finding, ...], "note": why it may differ
    from the literature, "evidence": optional extra text}; the result keeps each finding's per-seed values,
    mean, interval, p, Holm p and verdict (JSON-ready), the smallest effect its spread lets the test find with
    80% power at Holm's strictest level α/m (`detectable`), the claim's combined verdict and its evidence line.
    """
    family = [f for c in claims for f in c["findings"]]
    adjusted = iter(holm([f.p for f in family]))
    strictest = alpha / max(1, len(family))  # Holm's first step: what this report can detect at worst
    out = []
    for c in claims:
        rows = []
        for f in c["findings"]:
            q = float(next(adjusted))
            rows.append({"label": f.label, "values": list(f.values), "mean": f.mean, "low": f.low, "high": f.high,
                         "threshold": f.threshold, "above": f.above, "p": f.p, "p_holm": q,
                         "verdict": verdict(f, q, alpha), "detectable": detectable_effect(
                             float(np.std(f.values, ddof=1)), f.n, strictest) if f.n > 1 else float("nan")})
        combined = combine([(r["label"], r["verdict"]) for r in rows])
        evidence = "; ".join(f"{f.label}: {interval_text(f)}" for f in c["findings"])
        out.append({"claim": c["claim"], "verdict": combined,
                    "evidence": evidence + (". " + c["evidence"] if c.get("evidence") else ""),
                    "note": "" if combined == "true" else c.get("note", ""), "findings": rows})
    return out


def method_text(seed_list: Sequence[int], n_verdicts: int, alpha: float = ALPHA) -> str:
    """One paragraph for a report: what a seed is, which interval, which test and correction."""
    n = len(seed_list)
    return (f"{n} seed{'s' if n != 1 else ''} ({', '.join(map(str, seed_list))}); each is the whole pipeline: its "
            "own corpus sample, base pretraining, fine-tunes and batch order. Every number is the mean over seeds "
            "with its 95% Student-t interval (at a handful of seeds a bootstrap cannot leave the range of the "
            f"values it resamples). The report makes {n_verdicts} verdicts, one per finding; each is a two-sided "
            f"one-sample t-test against the threshold in its claim, Holm-corrected over all {n_verdicts}, so the "
            f"chance that any verdict here is wrong is at most {alpha:g}. A verdict is 'true' or 'false' only when "
            f"its corrected test decides it, otherwise 'not settled by {n} seeds'.")

"""Statistics of an online experiment and the decision rule. Pure functions, no I/O.

The unit of randomization is the user (:func:`~recsys_platform.experiments.definition.assign`),
so the unit of analysis is the user too: a user's impressions are not independent (one user
clicks more than another), and a two-proportion test on impressions would understate the
variance. The primary metric is a ratio of per-user sums (clicks / impressions, watch time /
requests); its variance comes from the delta method over users (Deng et al., "Applying the
Delta Method in Metric Analytics", 2018), and arms are compared with a two-sided z-test on the
difference. With one impression per user this is exactly the two-proportion z-test.

Sample-ratio mismatch: a chi-square test (1 degree of freedom) of the users seen per arm
against the configured share. A p-value below ``srm_alpha`` means the assignment or the
logging is broken, and no metric of that experiment can be trusted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from recsys_platform.experiments.definition import CONTROL, TREATMENT, Experiment

METHOD = "delta-method z-test on per-user ratios (users as units), two-sided"
SRM_METHOD = "chi-square goodness of fit on users per arm, 1 df"
_NORMAL = NormalDist()
# The per-impression frame analysed: one row per served impression of the experiment.
COLUMNS = ("user_id", "request_id", "item_id", "arm", "clicked", "watch_time_ms",
           "degraded", "latency_ms")

PROMOTE, ROLLBACK, CONTINUE, EXPIRE = "promote", "rollback", "continue", "expire"


@dataclass(frozen=True)
class ArmStats:
    """One arm's counts, its primary metric and its guardrail values."""

    users: int
    requests: int
    impressions: int
    clicks: int
    value: float  # the primary metric
    variance: float  # of ``value``, delta method over users
    fallback_rate: float  # requests with a degraded stage / requests
    p99_latency_ms: float
    distinct_items: int


@dataclass(frozen=True)
class Comparison:
    """Treatment minus control on the primary metric."""

    difference: float
    relative_lift: float  # difference / control value
    ci_low: float
    ci_high: float
    z: float
    p_value: float
    method: str = METHOD


@dataclass(frozen=True)
class Srm:
    """Observed users per arm against the expected share."""

    control_users: int
    treatment_users: int
    expected_share: float
    chi2: float
    p_value: float
    mismatch: bool
    method: str = SRM_METHOD


@dataclass
class Report:
    """Everything ``decide`` looked at."""

    experiment: str
    metric: str
    control: ArmStats | None
    treatment: ArmStats | None
    comparison: Comparison | None
    srm: Srm | None
    guardrail_breaches: list[str] = field(default_factory=list)
    shadow: dict[str, float] = field(default_factory=dict)  # offline-on-live, shadow mode
    pending: int = 0  # impressions whose label window is still open
    as_of: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numbers for MLflow (``control/ctr``, ``lift/p_value``, ``srm/p_value``...)."""
        out: dict[str, float] = {"pending_impressions": float(self.pending)}
        for arm, stats in ((CONTROL, self.control), (TREATMENT, self.treatment)):
            if stats is not None:
                for key, value in asdict(stats).items():
                    out[f"{arm}/{self.metric if key == 'value' else key}"] = float(value)
        if self.comparison is not None:
            for key in ("difference", "relative_lift", "ci_low", "ci_high", "z", "p_value"):
                out[f"lift/{key}"] = float(getattr(self.comparison, key))
        if self.srm is not None:
            out["srm/chi2"], out["srm/p_value"] = self.srm.chi2, self.srm.p_value
        out.update({f"shadow/{k}": float(v) for k, v in self.shadow.items()})
        return {k: v for k, v in out.items() if math.isfinite(v)}


@dataclass(frozen=True)
class Decision:
    """What ``decide`` concluded: ``promote``, ``rollback``, ``continue`` or ``expire``."""

    action: str
    reasons: list[str]

    @property
    def ends(self) -> bool:
        return self.action != CONTINUE


def ratio_estimate(numerator: np.ndarray, denominator: np.ndarray) -> tuple[float, float]:
    """``sum(num) / sum(den)`` over users and its variance by the delta method.

    Args:
        numerator: Per-user sums, e.g. clicks. # (users,)
        denominator: Per-user sums, e.g. impressions; all > 0. # (users,)

    Returns:
        ``(ratio, variance)``; the variance is ``inf`` with fewer than two users.
    """
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    n = len(num)
    if n == 0 or den.sum() <= 0:
        return float("nan"), float("inf")
    ratio = float(num.sum() / den.sum())
    if n < 2:
        return ratio, float("inf")
    var_n, var_d = num.var(ddof=1), den.var(ddof=1)
    cov = float(np.cov(num, den, ddof=1)[0, 1])
    variance = (var_n - 2 * ratio * cov + ratio**2 * var_d) / (n * den.mean() ** 2)
    return ratio, float(max(variance, 0.0))


def compare(control: ArmStats, treatment: ArmStats, confidence: float) -> Comparison:
    """Two-sided z-test of treatment - control with a ``confidence`` interval."""
    diff = treatment.value - control.value
    se = math.sqrt(control.variance + treatment.variance)
    z_crit = _NORMAL.inv_cdf(0.5 + confidence / 2)
    if se == 0.0 or not math.isfinite(se):
        z = 0.0 if diff == 0 or not math.isfinite(se) else math.copysign(math.inf, diff)
        p = 1.0 if z == 0.0 else 0.0
        low, high = (diff, diff) if se == 0.0 else (-math.inf, math.inf)
    else:
        z = diff / se
        p = math.erfc(abs(z) / math.sqrt(2))
        low, high = diff - z_crit * se, diff + z_crit * se
    lift = diff / control.value if control.value else float("nan")
    return Comparison(diff, lift, low, high, z, p)


def srm_check(control_users: int, treatment_users: int, share: float,
              alpha: float) -> Srm:
    """Chi-square test of users per arm against ``share`` for the treatment."""
    total = control_users + treatment_users
    if total == 0:
        return Srm(0, 0, share, 0.0, 1.0, False)
    expected = (total * (1 - share), total * share)
    chi2 = sum((obs - exp) ** 2 / exp for obs, exp in
               zip((control_users, treatment_users), expected, strict=True) if exp > 0)
    p = math.erfc(math.sqrt(chi2 / 2))  # survival function of chi-square with 1 df
    return Srm(control_users, treatment_users, share, chi2, p, p < alpha)


def arm_stats(frame: pd.DataFrame, metric: str) -> ArmStats | None:
    """One arm's stats from its rows of :data:`COLUMNS` (None when it has no rows)."""
    if frame.empty:
        return None
    per_user = frame.groupby("user_id").agg(
        clicks=("clicked", "sum"), impressions=("clicked", "size"),
        watch=("watch_time_ms", lambda s: float(np.nansum(s))),
        requests=("request_id", "nunique"))
    if metric == "ctr":
        value, variance = ratio_estimate(per_user["clicks"], per_user["impressions"])
    else:  # watch_time_per_request
        value, variance = ratio_estimate(per_user["watch"], per_user["requests"])
    requests = frame.drop_duplicates("request_id")
    degraded = requests["degraded"].fillna("").astype(str).str.len() > 0
    latency = requests["latency_ms"].astype(np.float64).dropna()
    return ArmStats(
        users=int(len(per_user)), requests=int(len(requests)), impressions=int(len(frame)),
        clicks=int(frame["clicked"].sum()), value=value, variance=variance,
        fallback_rate=float(degraded.mean()) if len(requests) else 0.0,
        p99_latency_ms=float(np.percentile(latency, 99)) if len(latency) else float("nan"),
        distinct_items=int(frame["item_id"].nunique()))


def guardrail_breaches(exp: Experiment, control: ArmStats, treatment: ArmStats) -> list[str]:
    """Each guardrail the treatment breaks, with its numbers."""
    g = exp.guardrails
    out = []
    extra = treatment.fallback_rate - control.fallback_rate
    pc, pt = control.fallback_rate, treatment.fallback_rate
    se = math.sqrt(pc * (1 - pc) / max(control.requests, 1)
                   + pt * (1 - pt) / max(treatment.requests, 1))
    # a breach is a real increase: above the limit AND significant (one-sided, at the
    # experiment's confidence), so that noise on a few hundred requests rolls nothing back
    significant = extra > 0 and (se == 0 or extra / se > _NORMAL.inv_cdf(exp.confidence))
    if extra > g.max_fallback_increase and significant:
        out.append(f"fallback rate {treatment.fallback_rate:.2%} vs control "
                   f"{control.fallback_rate:.2%} (+{extra:.2%} > {g.max_fallback_increase:.2%})")
    limit = control.p99_latency_ms * g.max_p99_ratio + g.p99_slack_ms
    if math.isfinite(limit) and treatment.p99_latency_ms > limit:
        out.append(f"p99 latency {treatment.p99_latency_ms:.1f} ms > {limit:.1f} ms "
                   f"(control {control.p99_latency_ms:.1f} ms x {g.max_p99_ratio:g} + "
                   f"{g.p99_slack_ms:g} ms)")
    if control.distinct_items and \
            treatment.distinct_items < control.distinct_items * g.min_coverage_ratio:
        out.append(f"catalog coverage {treatment.distinct_items} distinct items < "
                   f"{g.min_coverage_ratio:.0%} of control's {control.distinct_items}")
    return out


def analyse(exp: Experiment, rows: pd.DataFrame) -> Report:
    """Per-arm stats, the comparison, SRM and guardrails from rows of :data:`COLUMNS`."""
    control = arm_stats(rows[rows["arm"] == CONTROL], exp.primary_metric)
    treatment = arm_stats(rows[rows["arm"] == TREATMENT], exp.primary_metric)
    report = Report(exp.id, exp.primary_metric, control, treatment, None, None)
    if exp.mode == "split":
        report.srm = srm_check(control.users if control else 0,
                               treatment.users if treatment else 0, exp.share, exp.srm_alpha)
        if control is not None and treatment is not None:
            report.comparison = compare(control, treatment, exp.confidence)
            report.guardrail_breaches = guardrail_breaches(exp, control, treatment)
    return report


def decide(exp: Experiment, report: Report, now: datetime) -> Decision:
    """The decision rule.

    Split mode, once both arms hold ``min_samples`` impressions: a sample-ratio mismatch or a
    guardrail breach rolls back; a confidence interval of the difference entirely above 0
    promotes, entirely below 0 rolls back. Otherwise it keeps running until
    ``max_duration_h``, then expires (ends; the champion keeps all traffic). Shadow mode
    never promotes (users never saw the treatment): it reports and expires.
    """
    expired = exp.expired(now)
    c, t = report.control, report.treatment
    if exp.mode == "shadow":
        if expired:
            return Decision(EXPIRE, [f"shadow run reached max_duration_h {exp.max_duration_h:g}"
                                     "; a shadow never promotes: start a split next"])
        return Decision(CONTINUE, ["shadow mode: collecting offline-on-live metrics"])
    n_c, n_t = (c.impressions if c else 0), (t.impressions if t else 0)
    enough = n_c >= exp.min_samples and n_t >= exp.min_samples
    if enough and report.srm is not None and report.srm.mismatch:
        return Decision(ROLLBACK, [f"sample ratio mismatch: {report.srm.control_users} control "
                                   f"vs {report.srm.treatment_users} treatment users, expected "
                                   f"share {exp.share:g}, p={report.srm.p_value:.2g} < "
                                   f"{exp.srm_alpha:g}"])
    if enough and report.guardrail_breaches:
        return Decision(ROLLBACK, ["guardrail: " + b for b in report.guardrail_breaches])
    cmp = report.comparison
    if enough and cmp is not None:
        level = f"{exp.confidence:.0%} CI [{cmp.ci_low:+.4f}, {cmp.ci_high:+.4f}]"
        what = (f"{exp.primary_metric} {t.value:.4f} vs {c.value:.4f} "  # type: ignore[union-attr]
                f"({cmp.relative_lift:+.1%}), {level}, p={cmp.p_value:.2g}")
        if cmp.ci_low > 0:
            return Decision(PROMOTE, [f"treatment better: {what}"])
        if cmp.ci_high < 0:
            return Decision(ROLLBACK, [f"treatment worse: {what}"])
    if expired:
        return Decision(EXPIRE, [f"no significant difference after max_duration_h "
                                 f"{exp.max_duration_h:g}"])
    if not enough:
        return Decision(CONTINUE, [f"too few samples: {n_c} control / {n_t} treatment "
                                   f"impressions, need {exp.min_samples} each"])
    return Decision(CONTINUE, ["no significant difference yet"])


def sample_size(baseline: float, relative_effect: float, confidence: float = 0.95,
                power: float = 0.8, design_effect: float = 1.0) -> int:
    """Impressions per arm to detect ``relative_effect`` on a rate ``baseline``.

    ``n = (z_{1-a/2} + z_{power})^2 * (p1 (1 - p1) + p2 (1 - p2)) / (p2 - p1)^2 * deff``
    with ``p2 = p1 (1 + relative_effect)`` and ``deff`` the design effect of clustering
    impressions by user (1 + (m - 1) * ICC for m impressions per user).
    """
    p1, p2 = baseline, baseline * (1 + relative_effect)
    z = _NORMAL.inv_cdf(0.5 + confidence / 2) + _NORMAL.inv_cdf(power)
    n = z**2 * (p1 * (1 - p1) + p2 * (1 - p2)) / (p2 - p1) ** 2 * design_effect
    return int(math.ceil(n))

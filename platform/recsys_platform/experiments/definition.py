"""What an online experiment is, and which arm a user is in.

An :class:`Experiment` names a control (whatever ``@champion`` serves) and a treatment (a
registered bundle version, pinned when the experiment starts), a mode, the treatment's share
of users, a salt, the primary metric, guardrails, a minimum sample size and a maximum
duration. It travels as JSON: in the registered model's ``experiment.active`` tag (what
serving replicas poll) and as the params of the experiment's MLflow run.

Assignment is a pure function of ``(salt, user id)`` (:func:`assign`): every replica, the
analysis and a re-run agree on each user's arm without storing it, and a user stays in one
arm for the whole experiment. A new salt reshuffles users for the next experiment.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from recsys_core.errors import RecsysError

Mode = Literal["shadow", "split"]
Arm = Literal["control", "treatment"]
MODES: tuple[str, ...] = ("shadow", "split")
CONTROL, TREATMENT = "control", "treatment"
PRIMARY_METRICS: tuple[str, ...] = ("ctr", "watch_time_per_request")
_BUCKETS = 10_000  # assignment resolution: shares in steps of 0.01%
# The registered model's tag serving replicas poll: the active experiment's JSON (absent: none).
ACTIVE_TAG = "experiment.active"


class ExperimentError(RecsysError):
    """An experiment definition or command is not valid; the message says what to change."""


@dataclass(frozen=True)
class Guardrails:
    """Limits on the treatment relative to the control; a breach rolls the treatment back.

    ``max_fallback_increase``: treatment fallback rate (responses with a degraded stage) minus
    the control's, absolute. ``max_p99_ratio``: treatment p99 latency / control p99 (plus
    ``p99_slack_ms`` so that a 2 ms control does not make 3 ms a breach).
    ``min_coverage_ratio``: distinct items the treatment served / the control's (equal arms
    serve a similar number of impressions, so the ratio compares like with like).
    """

    max_fallback_increase: float = 0.01
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 5.0
    min_coverage_ratio: float = 0.8


@dataclass(frozen=True)
class Experiment:
    """One online experiment between the champion (control) and ``treatment_version``.

    Example:
        >>> exp = Experiment.new("3", "split", share=0.5, control_version="2")
        >>> assign(exp.salt, "user-1", exp.share) in ("control", "treatment")
        True
    """

    id: str
    treatment_version: str
    mode: str = "split"
    share: float = 0.5  # split: share of users served by the treatment; shadow: share shadowed
    salt: str = ""
    control_version: str | None = None  # the champion when it started (informational)
    primary_metric: str = "ctr"
    confidence: float = 0.95  # two-sided; promote/roll back only outside this interval
    min_samples: int = 2_000  # impressions per arm before the primary metric decides
    max_duration_h: float = 168.0  # then it ends without a promotion
    srm_alpha: float = 0.001  # sample-ratio mismatch when the chi-square p-value is below
    guardrails: Guardrails = field(default_factory=Guardrails)
    shadow_queue: int = 16  # shadow jobs waiting at most per replica; more are dropped
    shadow_max_age_s: float = 0.5  # a shadow job that waited longer is dropped (stale)
    started_at: str = ""  # ISO-8601 UTC
    started_by: str = ""

    def __post_init__(self) -> None:
        problems = validate(self)
        if problems:
            raise ExperimentError("invalid experiment: " + "; ".join(problems))

    @classmethod
    def new(cls, treatment_version: str, mode: str, *, share: float | None = None,
            control_version: str | None = None, who: str = "", now: datetime | None = None,
            **options: Any) -> Experiment:
        """A fresh experiment: its id and salt from the versions and the start time."""
        now = now or datetime.now(UTC)
        stamp = now.strftime("%Y%m%dT%H%M%S")
        exp_id = f"exp-{treatment_version}-vs-{control_version or 'none'}-{stamp}"
        if share is None:
            share = 1.0 if mode == "shadow" else 0.5
        return cls(id=exp_id, treatment_version=str(treatment_version), mode=mode, share=share,
                   salt=options.pop("salt", None) or exp_id, control_version=control_version,
                   started_at=now.isoformat(), started_by=who, **options)

    @property
    def started(self) -> datetime:
        return datetime.fromisoformat(self.started_at) if self.started_at else datetime.now(UTC)

    def expired(self, now: datetime) -> bool:
        return now - self.started >= timedelta(hours=self.max_duration_h)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Experiment:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k in known}  # newer fields: ignored
        data["guardrails"] = Guardrails(**data.get("guardrails", {}))
        return cls(**data)

    def params(self) -> dict[str, str]:
        """Flat strings for MLflow run params."""
        flat = {k: v for k, v in asdict(self).items() if k != "guardrails"}
        flat.update({f"guardrail.{k}": v for k, v in asdict(self.guardrails).items()})
        return {k: str(v) for k, v in flat.items()}


def validate(exp: Experiment) -> list[str]:
    """Every problem with a definition, each naming the field and the allowed values."""
    problems = []
    if exp.mode not in MODES:
        problems.append(f"mode {exp.mode!r} is not one of {'|'.join(MODES)}")
    if not 0.0 < exp.share <= 1.0 or (exp.mode == "split" and exp.share >= 1.0):
        problems.append(f"share {exp.share} must be in (0, 1) for split, (0, 1] for shadow")
    if exp.primary_metric not in PRIMARY_METRICS:
        problems.append(f"primary_metric {exp.primary_metric!r} is not one of "
                        f"{'|'.join(PRIMARY_METRICS)}")
    if not 0.5 <= exp.confidence < 1.0:
        problems.append(f"confidence {exp.confidence} must be in [0.5, 1)")
    if exp.min_samples < 1:
        problems.append(f"min_samples {exp.min_samples} must be >= 1")
    if exp.shadow_queue < 1 or exp.shadow_max_age_s <= 0:
        problems.append(f"shadow_queue {exp.shadow_queue} must be >= 1 and shadow_max_age_s "
                        f"{exp.shadow_max_age_s} > 0")
    if exp.max_duration_h <= 0:
        problems.append(f"max_duration_h {exp.max_duration_h} must be > 0")
    if exp.control_version is not None and exp.control_version == exp.treatment_version:
        problems.append(f"treatment version {exp.treatment_version} is already the champion")
    return problems


def bucket(salt: str, user_id: str) -> int:
    """The user's bucket in ``[0, 10000)``: SHA-256 of ``salt:user_id``, stable everywhere."""
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


def assign(salt: str, user_id: str, share: float) -> str:
    """``treatment`` for the first ``share`` of buckets, else ``control``."""
    return TREATMENT if bucket(salt, user_id) < round(share * _BUCKETS) else CONTROL

"""The recommender deployment's Ray Serve options, from ``serving.*`` settings in one place.

The deployment decorator (``app.py``), ``recsys serve up`` (``serving/cluster.py``), the
committed ``serve_config.yaml`` (local profile) and the Helm chart's RayService (k8s profile)
all carry these values; tests keep the last two equal to :func:`deployment_options`.
"""

from __future__ import annotations

from typing import Any

from recsys_core.settings import ServingSettings

DEPLOYMENT_NAME = "recommender"
# Direct ingress health checks every few seconds; a replica without a bundle stays healthy.
HEALTH_CHECK_PERIOD_S = 10


def autoscaling_config(s: ServingSettings) -> dict[str, Any]:
    """Serve autoscaling on ongoing requests (per replica, averaged over a short window)."""
    return {"min_replicas": s.min_replicas, "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
            "upscale_delay_s": s.upscale_delay_s, "downscale_delay_s": s.downscale_delay_s,
            "metrics_interval_s": s.metrics_interval_s,
            "look_back_period_s": s.look_back_period_s}


def deployment_options(s: ServingSettings) -> dict[str, Any]:
    """Keyword arguments of ``serve.deployment`` / ``.options`` and keys of a Serve config's
    deployment entry (the same names)."""
    return {
        "ray_actor_options": {"num_cpus": s.replica_cpus},
        "max_ongoing_requests": s.max_ongoing_requests,
        "max_queued_requests": s.max_queued_requests,
        "autoscaling_config": autoscaling_config(s),
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        # No log line per request; at WARNING, Serve's per-request access record is not even
        # built (its logger.info ran for every request, filtered only by the handlers).
        "logging_config": {"enable_access_log": False, "log_level": "WARNING"},
    }

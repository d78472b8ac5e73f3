"""Process-wide runtime helpers shared by every stage."""

from __future__ import annotations

from recsys_core.settings import Settings


def ensure_ray(settings: Settings) -> None:
    """Connects to ``ray.address`` or starts a local cluster, unless already connected.

    With no address the cluster is always a new one (``"local"``): a bare ``ray.init()`` would
    join whatever cluster ``/tmp/ray/ray_current_cluster`` names, e.g. a running Serve head whose
    CPUs the replicas hold, and training would wait for CPUs forever.
    """
    import ray

    if ray.is_initialized():
        return
    ray.init(address=settings.ray.address or "local", num_cpus=settings.ray.num_cpus,
             include_dashboard=False, log_to_driver=False, configure_logging=False)

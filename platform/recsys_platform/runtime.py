"""Process-wide runtime helpers shared by every stage."""

from __future__ import annotations

from recsys_platform.settings import Settings


def ensure_ray(settings: Settings) -> None:
    """Connects to ``ray.address`` or starts a local cluster, unless already connected."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=settings.ray.address, num_cpus=settings.ray.num_cpus,
             include_dashboard=False, log_to_driver=False, configure_logging=False)

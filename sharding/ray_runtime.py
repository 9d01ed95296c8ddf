"""Starting (or joining) the Ray runtime the data pipelines run on.

A local instance is kept small (CPUs and object store from `RayConfig`, no dashboard) and
quiet. Confining Ray to a loopback-only network namespace is the CLI's job
(`core.netns.ensure_confined()` at entry); here we only warn when it was possible and not done.
"""

from __future__ import annotations

import logging
import os
import warnings

from core import netns
from core.config import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Start a local Ray instance, or connect to `cfg.address`; no-op when Ray is already up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not netns.is_confined() and netns.can_confine():
        log.warning(
            "Ray starts outside a loopback-only network namespace and will bind every address; "
            "run through `python -m core.netns -- ...` (the tokfleet CLI does this itself)"
        )
    if cfg.address:
        ray.init(address=cfg.address, logging_level=logging.WARNING, log_to_driver=True)
    else:
        ray.init(
            num_cpus=cfg.num_cpus or None,
            object_store_memory=cfg.object_store_mb * (1 << 20),
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    _quiet_ray_data()


def _quiet_ray_data() -> None:
    """Our own progress bar replaces Ray Data's per-operator bars and execution summaries."""
    from ray.data import DataContext

    with warnings.catch_warnings():  # building the context warns about Ray's own deprecated fields
        warnings.simplefilter("ignore", DeprecationWarning)
        context = DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.enable_auto_log_stats = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # it warns that the bars we just turned off are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)

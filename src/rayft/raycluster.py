"""Connecting to Ray: the cluster RAY_ADDRESS (or the config) names, else a fresh local instance."""

from __future__ import annotations

import os
from typing import Optional


def connect_ray(address: Optional[str]) -> None:
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing may phone home
    if not address:
        # A local instance is a one-machine cluster: keep its listeners on loopback (read by
        # ray at import, hence before it).
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local": always a fresh instance, never whatever cluster /tmp/ray last recorded.
        # The dashboard serves the state API that Ray Train's controller polls; loopback only.
        ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1",
                 log_to_driver=True)

#!/usr/bin/env python3
"""Container health check: GET /healthz on the node's metrics port; exit 0 when it answers 200.

The port is ``$SEGNODE_METRICS_PORT`` when set, else ``[metrics] port`` of ``$SEGNODE_CONFIG``,
else 9108 (the default of node/config.py).
"""

from __future__ import annotations

import os
import sys
import tomllib
import urllib.error
import urllib.request


def metrics_port() -> int:
    """The port /healthz listens on, from the environment or the config file."""
    if os.environ.get("SEGNODE_METRICS_PORT"):
        return int(os.environ["SEGNODE_METRICS_PORT"])
    path = os.environ.get("SEGNODE_CONFIG", "")
    if path and os.path.isfile(path):
        with open(path, "rb") as fh:
            return int(tomllib.load(fh).get("metrics", {}).get("port", 9108))
    return 9108


def main() -> int:
    """Exit status for Docker's HEALTHCHECK: 0 healthy, 1 not."""
    url = f"http://127.0.0.1:{metrics_port()}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"segnode-healthcheck: {url}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())

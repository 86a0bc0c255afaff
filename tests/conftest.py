"""Shared fixtures: small thread count and tiny synthetic data sets."""

import os
import tempfile

import torch

# Flows in tests use a temporary Prefect API; its 20 s default start-up can run out on busy cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

# Under pytest-xdist (`-n 2`, the README's command) each worker, and every process it starts,
# gets one thread: two 2-thread torch processes on 2 cores slow each other several-fold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # and a Prefect home of its own (profiles, local state), not one shared by both workers
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-")
else:
    torch.set_num_threads(2)


# The files that take longest (minutes: servers started once per file, a tiny GPU-profile cell)
# start first, so that under `--dist loadfile` no worker is left with one of them at the end.
LONGEST_FIRST = ("test_platform_servers.py", "test_reproduce.py", "test_scan.py",
                 "test_transformsearch.py", "test_flows.py", "test_transformdetector.py")


def pytest_collection_modifyitems(items: list) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order in a file

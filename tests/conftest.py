"""Shared fixtures: small thread count and tiny synthetic data sets."""

import os

import torch

# Flows in tests use a temporary Prefect API; its 20 s default start-up can run out on busy cores.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

torch.set_num_threads(2)

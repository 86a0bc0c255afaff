"""Shared fixtures: small thread count and tiny synthetic data sets."""

import torch

torch.set_num_threads(2)

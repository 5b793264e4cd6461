"""Shared test configuration."""
from __future__ import annotations

import os

import torch

# Two cores in CI: keep torch from oversubscribing them.
torch.set_num_threads(int(os.environ.get("PTQKIT_TEST_THREADS", "2")))

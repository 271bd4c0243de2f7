"""Tests marked ``@pytest.mark.gpu`` need a CUDA GPU: without one they are skipped (reason printed with
``-rs``). ``scripts/gpu_check.sh`` runs them on the GPU machine (``pytest -m gpu tests/test_gpu.py``)."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by scripts/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

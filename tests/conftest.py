"""Shared fixtures: fp32 on CPU, deterministic, the `gpu` marker skips without CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official_cheers_tiny"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def debug_cfg():
    from cheers.config import flavour

    return flavour("debug")


@pytest.fixture
def debug_model(debug_cfg):
    from cheers.model import CheersModel

    torch.manual_seed(0)
    model = CheersModel(debug_cfg)
    model.init_weights()
    return model

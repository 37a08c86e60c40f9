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


@pytest.fixture(scope="session")
def fill_zero_layers():
    """``fill(model)`` gives every all-zero parameter small random weights (seeded). At
    initialisation the adaLN modulations, the final layers and the gate are zero, so every
    velocity is 0 and a check of what the head reads could not fail."""

    def fill(model: torch.nn.Module, std: float = 0.05) -> None:
        torch.manual_seed(0)
        with torch.no_grad():
            for prm in model.parameters():
                if not prm.any():
                    prm.normal_(std=std)

    return fill


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

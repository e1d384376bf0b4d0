"""Shared fixtures: tiny configurations and the repository on sys.path."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pvae_utils as pvae  # noqa: E402


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it."""
    pvae.set_seed(0)


@pytest.fixture
def tiny_config():
    """A small but complete PVAE: 16x16 grey images, two encoder convs, three partitions."""
    return pvae.PVAEConfig(image_size=(16, 16), encoder=((3, 4), (3, 8)), partitions=(2, 3, 1),
                           head_hidden=(8,), decoder_linear=(16,), decoder_channels=4,
                           decoder_convs=((3, 4),), subres_factor=2, epochs=2, batch_size=8)


@pytest.fixture
def images():
    """A function giving n random images in [0, 1] for a config, seeded."""
    def make(config, n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, config.in_channels, *config.image_size, generator=g)
    return make

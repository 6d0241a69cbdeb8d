"""Shared small, pairwise-distinct sizes, so that a swapped axis cannot go unnoticed."""

import pytest

from minilm.config import DataConfig, ModelConfig, TrainConfig
from minilm.data import load_dataset


@pytest.fixture(scope="session")
def arithmetic_data():
    """A small char-level corpus (vocabulary 14)."""
    return load_dataset(DataConfig(corpus="arithmetic", corpus_size=600), seed=3)


@pytest.fixture(scope="session")
def small_cfgs(arithmetic_data):
    """V 14, T 11, D 12, L 2, H 3, K 4, F 24, B 5."""
    model_cfg = ModelConfig(vocab_size=arithmetic_data.tokenizer.size, context=11, width=12, layers=2, heads=3,
                            mlp_ratio=2)
    train_cfg = TrainConfig(steps=12, batch_size=5, lr=1e-2, min_lr=1e-3, warmup=0.25, eval_every=4,
                            eval_batches=2, checkpoint_every=4, seed=7)
    return model_cfg, train_cfg


def pytest_collection_modifyitems(items):
    """The experiments' end-to-end smoke runs are the heavy tier `experiments`, the report in Chromium the heavy
    tier `browser`, the 8-device and two-process runs the heavy tier `mesh` (make test runs every tier;
    `pytest -m "not experiments and not browser and not mesh"` is the core suite)."""
    for item in items:
        if item.module.__name__.startswith("test_experiments"):
            item.add_marker(pytest.mark.experiments)
        if item.module.__name__ == "test_browser":
            item.add_marker(pytest.mark.browser)
        if item.module.__name__ == "test_mesh":
            item.add_marker(pytest.mark.mesh)

"""Shared fixtures: the embedded tiny model (built once, cached) and one local Ray cluster per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/rlft/torch_extensions"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    from rlft.tiny import resolve

    return resolve("tiny://model")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster bound to loopback, shared by every test that starts actors."""
    import ray

    from rlft.config import RayConfig
    from rlft.distributed.cluster import init_ray

    # Logical CPUs: actors ask for whole CPUs; a 2-core machine still runs 2 learners beside other roles.
    init_ray(RayConfig(num_cpus=4), num_cpus_needed=4)
    yield
    ray.shutdown()

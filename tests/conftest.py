import os
from pathlib import Path

import numpy as np
import pytest

from nqe.model.data import DataError, find_cifar10

PROJECT = Path(__file__).resolve().parent.parent
SHIPPED_WEIGHTS = PROJECT / "weights" / "nqe-1mb"


@pytest.fixture(scope="session")
def cifar_test():
    """The real CIFAR-10 test set. Missing data is a failure in CI, a skip elsewhere."""
    from nqe.model.data import load_cifar10
    try:
        find_cifar10()
    except DataError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"CIFAR-10 not available: {error}")
    return load_cifar10(train=False)


@pytest.fixture(scope="session")
def shipped_net():
    from nqe.model.weights_io import load_weights
    return load_weights(SHIPPED_WEIGHTS)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
    """Synthetic CIFAR-shaped data: for unit tests only, never for a reported accuracy."""
    root = tmp_path_factory.mktemp("data") / "cifar10"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        y = rng.integers(0, 10, 40).astype(np.uint8)
        # class-dependent brightness so that there is something to learn
        x = (rng.integers(0, 64, (40, 32, 32, 3)) + y[:, None, None, None] * 19).astype(np.uint8)
        np.savez_compressed(root / f"train-{i}of5.npz", x=x, y=y)
    y = rng.integers(0, 10, 30).astype(np.uint8)
    x = (rng.integers(0, 64, (30, 32, 32, 3)) + y[:, None, None, None] * 19).astype(np.uint8)
    np.savez_compressed(root / "test.npz", x=x, y=y)
    return root

import os
from pathlib import Path

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

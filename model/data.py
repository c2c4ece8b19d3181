"""CIFAR-10 loading: the project's chunked npz layout and the official ``cifar-10-batches-py``.

Where the data is looked for, first match wins:
  1. the ``--data`` option (a ``cifar10`` folder, a ``cifar-10-batches-py`` folder, or a folder
     holding one of them),
  2. the ``NQE_DATA`` environment variable (same forms),
  3. ``../shared/data`` beside the project checkout, then beside the current directory.

Images come back as uint8 arrays [N, 32, 32, 3] (HWC, RGB) and labels as uint8 [N].
"""

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DataError", "Cifar10", "find_cifar10", "load_cifar10", "split_train_val",
           "ENV_VAR", "CLASSES"]

ENV_VAR = "NQE_DATA"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DataError(FileNotFoundError):
    """The dataset could not be found or read; the message names every place looked at."""


@dataclass(frozen=True)
class Cifar10:
    root: Path
    layout: str            # "npz-chunks" or "batches-py"
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


def _layout(folder):
    folder = Path(folder)
    if (folder / "test.npz").is_file() and any(folder.glob("train-*of*.npz")):
        return "npz-chunks"
    if (folder / "test_batch").is_file() and (folder / "data_batch_1").is_file():
        return "batches-py"
    return None


def _candidates(data):
    """(origin, folder) pairs, in the order they are tried."""
    roots = []
    if data is not None:
        roots.append(("--data", Path(data)))
    elif os.environ.get(ENV_VAR):
        roots.append((f"${ENV_VAR}", Path(os.environ[ENV_VAR])))
    else:
        roots.append(("default", _PROJECT_ROOT.parent / "shared" / "data"))
        roots.append(("default", Path.cwd().parent / "shared" / "data"))
    out = []
    for origin, root in roots:
        for folder in (root, root / "cifar10", root / "cifar-10-batches-py"):
            out.append((origin, folder))
    return out


def find_cifar10(data=None):
    """The folder holding CIFAR-10 and its layout; DataError naming each place looked at."""
    looked = []
    for origin, folder in _candidates(data):
        layout = _layout(folder)
        if layout:
            return folder, layout
        looked.append(f"{folder} ({origin})")
    raise DataError("CIFAR-10 not found. Looked in:\n  " + "\n  ".join(looked) +
                    f"\nPass --data PATH or set {ENV_VAR} to a folder holding either "
                    "test.npz + train-*of5.npz, or the official cifar-10-batches-py files.")


def _read_npz(path, expected_count=None):
    try:
        with np.load(path) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as error:
        raise DataError(f"{path}: cannot read arrays 'x' and 'y': {error}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(y) != len(x):
        raise DataError(f"{path}: expected 'x' uint8 [N, 32, 32, 3] and 'y' [N], got 'x' "
                        f"{x.dtype} {list(x.shape)} and 'y' {list(y.shape)}")
    return x, y.astype(np.uint8)


def _read_batch(path):
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.uint8)
    except (OSError, pickle.UnpicklingError, KeyError, EOFError) as error:
        raise DataError(f"{path}: not a CIFAR-10 python batch: {error}") from None
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: expected 'data' [N, 3072], got {list(data.shape)}")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def load_cifar10(data=None, train=True):
    """Load CIFAR-10 (train only when ``train``; test always)."""
    folder, layout = find_cifar10(data)
    if layout == "npz-chunks":
        chunks = sorted(folder.glob("train-*of*.npz"))
        count = int(chunks[0].stem.split("of")[-1])
        names = [folder / f"train-{i}of{count}.npz" for i in range(count)]
        missing = [str(p) for p in names if not p.is_file()]
        if train and missing:
            raise DataError(f"{folder}: missing training chunk(s): {', '.join(missing)}")
        test_x, test_y = _read_npz(folder / "test.npz")
        parts = [_read_npz(p) for p in names] if train else []
    else:
        test_x, test_y = _read_batch(folder / "test_batch")
        names = [folder / f"data_batch_{i}" for i in range(1, 6)]
        missing = [str(p) for p in names if not p.is_file()]
        if train and missing:
            raise DataError(f"{folder}: missing training batch(es): {', '.join(missing)}")
        parts = [_read_batch(p) for p in names] if train else []
    empty_x, empty_y = np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.uint8)
    train_x = np.concatenate([p[0] for p in parts]) if parts else empty_x
    train_y = np.concatenate([p[1] for p in parts]) if parts else empty_y
    return Cifar10(folder, layout, train_x, train_y, test_x, test_y)


def split_train_val(x, y, val_size, seed):
    """A seeded, class-stratified validation split of the training set."""
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = val_size // len(classes)
    val_idx = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per_class]
                              for c in classes])
    mask = np.zeros(len(y), dtype=bool)
    mask[val_idx] = True
    return (x[~mask], y[~mask]), (x[mask], y[mask])

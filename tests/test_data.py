"""CIFAR-10 loading from both layouts, and the error when it is missing (synthetic files only)."""

import pickle

import numpy as np
import pytest

from nqe.model.data import DataError, ENV_VAR, find_cifar10, load_cifar10, split_train_val


def _images(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8), \
        rng.integers(0, 10, size=n).astype(np.uint8)


def _write_chunks(folder):
    folder.mkdir(parents=True)
    parts = []
    for i in range(5):
        x, y = _images(20, i)
        np.savez_compressed(folder / f"train-{i}of5.npz", x=x, y=y)
        parts.append((x, y))
    x, y = _images(10, 99)
    np.savez_compressed(folder / "test.npz", x=x, y=y)
    return parts, (x, y)


def test_npz_chunks_via_parent_folder(tmp_path):
    parts, (tx, ty) = _write_chunks(tmp_path / "cifar10")
    data = load_cifar10(tmp_path)
    assert data.layout == "npz-chunks"
    assert (data.train_x == np.concatenate([p[0] for p in parts])).all()
    assert (data.train_y == np.concatenate([p[1] for p in parts])).all()
    assert (data.test_x == tx).all() and (data.test_y == ty).all()


def test_official_batches_py_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name, seed in [(f"data_batch_{i}", i) for i in range(1, 6)] + [("test_batch", 9)]:
        x, y = _images(4, seed)
        flat = x.transpose(0, 3, 1, 2).reshape(4, 3072)      # the official CHW row layout
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": flat, b"labels": list(map(int, y))}, f)
        expected.append((x, y))
    data = load_cifar10(tmp_path)
    assert data.layout == "batches-py"
    assert (data.train_x == np.concatenate([e[0] for e in expected[:5]])).all()
    assert (data.test_x == expected[5][0]).all()
    assert (data.test_y == expected[5][1]).all()


def test_environment_variable(tmp_path, monkeypatch):
    _write_chunks(tmp_path / "elsewhere" / "cifar10")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "elsewhere"))
    folder, layout = find_cifar10()
    assert folder == tmp_path / "elsewhere" / "cifar10" and layout == "npz-chunks"


def test_missing_data_names_where_it_looked(tmp_path):
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path / "nowhere")
    message = str(info.value)
    assert str(tmp_path / "nowhere") in message and "(--data)" in message
    assert str(tmp_path / "nowhere" / "cifar10") in message


def test_missing_training_chunk(tmp_path):
    _write_chunks(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "train-3of5.npz").unlink()
    with pytest.raises(DataError, match="missing training chunk.*train-3of5.npz"):
        load_cifar10(tmp_path)
    assert len(load_cifar10(tmp_path, train=False).test_x) == 10


def test_validation_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(10), 50).astype(np.uint8)
    x = np.arange(500)
    (tx, ty), (vx, vy) = split_train_val(x, y, 100, seed=3)
    assert len(vx) == 100 and len(tx) == 400
    assert np.bincount(vy, minlength=10).tolist() == [10] * 10
    assert not set(tx) & set(vx)
    (_, _), (vx2, _) = split_train_val(x, y, 100, seed=3)
    assert (vx == vx2).all()

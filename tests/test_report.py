"""`nqe curve`: the training-curve PNG from a run's history."""

import json

import pytest

pytest.importorskip("matplotlib")

from nqe.cli import main  # noqa: E402
from nqe.model.report import plot_history  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history(epochs=6, fold=4):
    return [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.1 * e, "val_acc": 0.09 * e,
             "val_acc_batchnorm": 0.1 * e if e <= fold else None,
             "phase": "batchnorm" if e <= fold else "bsn"} for e in range(1, epochs + 1)]


def test_plot_writes_a_png(tmp_path):
    out = plot_history(_history(), tmp_path / "curve.png", title="t")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_leaves_out_epochs_that_were_not_validated(tmp_path):
    """`nqe train --bn-val-every`: BatchNorm epochs without a validation have val_acc None."""
    history = _history(epochs=8, fold=6)
    for record in history[:5]:
        record["val_acc"] = record["val_acc_batchnorm"] = None if record["epoch"] % 3 else \
            record["val_acc"]
    out = plot_history(history, tmp_path / "curve.png")
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert plot_history(history[:2], tmp_path / "none.png").read_bytes().startswith(PNG_MAGIC)


def test_empty_history_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        plot_history([], tmp_path / "curve.png")


def test_cli_reads_the_manifest_history(tmp_path, capsys):
    weights = tmp_path / "w"
    weights.mkdir()
    (weights / "manifest.json").write_text(json.dumps({"meta": {"history": _history()}}))
    assert main(["curve", "--weights", str(weights)]) == 0
    assert (weights / "training_curve.png").read_bytes().startswith(PNG_MAGIC)
    (weights / "manifest.json").write_text(json.dumps({"meta": {}}))
    assert main(["curve", "--weights", str(weights), "-o", str(tmp_path / "x.png")]) == 2
    assert "no training history" in capsys.readouterr().err

"""Training: seeded, resumable (a resumed run equals an uninterrupted one), exportable."""

import json

import numpy as np
import pytest
import torch

from nqe.model.integer_reference import run_reference
from nqe.model.spec import BlockSpec, HeadSpec, NetworkSpec, Residual, StemSpec
from nqe.model.train import TrainConfig, TrainError, evaluate_model, load_checkpoint, train
from nqe.model.weights_io import export_model, load_weights

TINY = NetworkSpec(
    name="tiny", stem=StemSpec(out_channels=8, weight_bits=3, act_bits=2),
    blocks=(BlockSpec(name="b1", expand=16, out_channels=8, groups=4, stride=2,
                      residual=Residual.NONE, weight_bits=(2, 3, 2), act_bits=(2, 2, 2)),
            BlockSpec(name="b2", expand=16, out_channels=8, groups=4, stride=1,
                      residual=Residual.ADD, weight_bits=(1, 2, 2), act_bits=(2, 2, 2))),
    head=HeadSpec(num_classes=10, weight_bits=3))


def _config(tmp_path, data, epochs, bn_epochs=0, fold="at-once"):
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(TINY.to_json())
    return TrainConfig(spec=str(spec_path), epochs=epochs, batch_size=32, val_size=50,
                       freeze_epochs=1, data=str(data), threads=1, bn_epochs=bn_epochs,
                       fold=fold, fold_images=64)


@pytest.mark.parametrize("bn_epochs, fold", [(0, "at-once"), (2, "at-once"), (2, "sequential")],
                         ids=["bsn-only", "batchnorm-then-fold", "batchnorm-then-sequential-fold"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, synthetic_data, bn_epochs, fold):
    """Stopped after epoch 2 and resumed: with a BatchNorm phase the fold happens after the
    resume (epoch 3) and must still give the same model bit for bit."""
    straight, _ = train(_config(tmp_path, synthetic_data, 3, bn_epochs, fold),
                        tmp_path / "straight", progress=False, log=lambda *_: None)
    partial = tmp_path / "partial"
    _train_until(_config(tmp_path, synthetic_data, 3, bn_epochs, fold), partial, stop_after=2)
    assert json.loads((partial / "history.json").read_text())[-1]["epoch"] == 2
    resumed, history = train(_config(tmp_path, synthetic_data, 3, bn_epochs, fold), partial,
                             resume=True, progress=False, log=lambda *_: None)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["phase"] for r in history] == ["batchnorm"] * bn_epochs + ["bsn"] * (3 - bn_epochs)
    assert not resumed.has_unfolded_norm
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_validating_fewer_batchnorm_epochs_changes_no_weight(tmp_path, synthetic_data,
                                                             monkeypatch):
    """--bn-val-every N validates every N-th epoch of the BatchNorm phase, its last epoch and every
    BSN epoch, and trains the same model bit for bit; a resume may change N."""
    def config(every=None):
        c = _config(tmp_path, synthetic_data, 6, bn_epochs=5, fold="sequential")
        c.bn_val_every = every
        return c

    quiet = {"progress": False, "log": lambda *_: None}
    straight, every_epoch = train(config(), tmp_path / "straight", **quiet)
    assert all(r["val_acc"] is not None for r in every_epoch)
    # Every 2nd epoch, stopped after epoch 3 (as a killed process would be): epoch 2 validated.
    # Resumed every 3rd: epoch 4 is skipped, 5 ends the phase, 6 is BSN.
    import nqe.model.train as module

    class Stop(Exception):
        pass

    save_epoch = module.RunFolder.save_epoch

    def stop_after_epoch_3(self, payload, *args):
        save_epoch(self, payload, *args)
        if payload["epoch"] == 3:
            raise Stop

    with monkeypatch.context() as patch:
        patch.setattr(module.RunFolder, "save_epoch", stop_after_epoch_3)
        with pytest.raises(Stop):
            train(config(2), tmp_path / "sparse", **quiet)
    sparse, history = train(config(3), tmp_path / "sparse", resume=True, **quiet)
    assert [r["epoch"] for r in history if r["val_acc"] is not None] == [2, 5, 6]
    assert [r["epoch"] for r in history if r["val_acc_batchnorm"] is not None] == [2, 5]
    for record, full in zip(history, every_epoch):
        assert record["val_acc"] in (None, full["val_acc"]), record["epoch"]
    for (name, a), (_, b) in zip(straight.state_dict().items(), sparse.state_dict().items()):
        assert torch.equal(a, b), name
    best = torch.load(tmp_path / "sparse" / "best.pt", weights_only=False)
    assert best["val_acc"] == max(r["val_acc"] for r in history if r["val_acc"] is not None)
    with pytest.raises(TrainError, match="--bn-val-every must be at least 1"):
        train(config(0), tmp_path / "zero", **quiet)


def test_snapshot_resume_keeps_the_schedule_and_the_random_streams(tmp_path, synthetic_data):
    """snapshot.pt (no optimizer moments) copied to an empty folder continues the run at the
    same point of its schedule, with the same data order, augmentation and fold. With lr 0 the
    moments cannot matter, so the result must equal the uninterrupted run bit for bit."""
    def config():
        c = _config(tmp_path, synthetic_data, 3, bn_epochs=2, fold="sequential")
        c.lr = 0.0       # BatchNorm statistics still follow the batches: the streams are checked
        return c

    straight, straight_history = train(config(), tmp_path / "straight", progress=False,
                                       log=lambda *_: None)
    partial = tmp_path / "partial"
    _train_until(config(), partial, stop_after=2)
    snapshot = torch.load(partial / "snapshot.pt", weights_only=False)
    assert snapshot["optimizer"]["state"] == {}
    assert torch.load(partial / "last.pt", weights_only=False)["optimizer"]["state"]
    assert (partial / "snapshot.pt").stat().st_size < (partial / "last.pt").stat().st_size

    moved = tmp_path / "elsewhere" / "snapshot.pt"
    moved.parent.mkdir()
    (partial / "snapshot.pt").rename(moved)
    lines = []
    resumed, history = train(config(), tmp_path / "resumed", resume_from=moved, progress=False,
                             log=lines.append)
    assert any("the optimizer's moments start again from zero" in line for line in lines)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert [r["lr"] for r in history] == [r["lr"] for r in straight_history]
    assert [r["val_acc"] for r in history] == [r["val_acc"] for r in straight_history]
    assert not resumed.has_unfolded_norm
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_last_pt_copied_elsewhere_resumes_bit_for_bit(tmp_path, synthetic_data):
    """--resume-from a full last.pt (moments included) is the uninterrupted run."""
    straight, _ = train(_config(tmp_path, synthetic_data, 3), tmp_path / "straight",
                        progress=False, log=lambda *_: None)
    _train_until(_config(tmp_path, synthetic_data, 3), tmp_path / "partial", stop_after=2)
    resumed, history = train(_config(tmp_path, synthetic_data, 3), tmp_path / "moved",
                             resume_from=tmp_path / "partial" / "last.pt", progress=False,
                             log=lambda *_: None)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("best_is_last", [True, False], ids=["best-rebuilt", "best-not-carried"])
def test_snapshot_resume_rebuilds_best_only_from_its_own_epoch(tmp_path, synthetic_data,
                                                                best_is_last):
    """best.pt is not in a snapshot: rebuilt when the snapshot's epoch was the best, otherwise
    the selection starts again after it (and says so)."""
    train(_config(tmp_path, synthetic_data, 2), tmp_path / "run", progress=False,
          log=lambda *_: None)
    snapshot = torch.load(tmp_path / "run" / "snapshot.pt", weights_only=False)
    snapshot["best_epoch"] = 2 if best_is_last else 1
    torch.save(snapshot, tmp_path / "edited.pt")
    lines = []
    train(_config(tmp_path, synthetic_data, 2), tmp_path / "resumed",
          resume_from=tmp_path / "edited.pt", progress=False, log=lines.append)
    if best_is_last:
        rebuilt = torch.load(tmp_path / "resumed" / "best.pt", weights_only=False)
        assert rebuilt["epoch"] == 2
        for name, value in snapshot["model"].items():
            assert torch.equal(rebuilt["model"][name], value), name
    else:
        assert not (tmp_path / "resumed" / "best.pt").exists()
        assert any("is not in the snapshot: best.pt will hold the best of the epochs after "
                   "epoch 2" in line for line in lines)


def test_snapshot_resume_errors_name_the_file(tmp_path, synthetic_data):
    train(_config(tmp_path, synthetic_data, 1), tmp_path / "run", progress=False,
          log=lambda *_: None)
    snapshot = tmp_path / "run" / "snapshot.pt"
    with pytest.raises(TrainError, match=r"--resume-from .*snapshot.pt: .*run.last.pt already "
                                         r"exists; continue that run with --resume"):
        train(_config(tmp_path, synthetic_data, 1), tmp_path / "run", resume_from=snapshot,
              progress=False, log=lambda *_: None)
    with pytest.raises(TrainError, match=r"--resume-from .*nowhere.pt: no such snapshot file"):
        train(_config(tmp_path, synthetic_data, 1), tmp_path / "new", resume_from=tmp_path /
              "nowhere.pt", progress=False, log=lambda *_: None)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(TrainError, match=r"--resume-from .*other.pt: not a run snapshot or "
                                         r"last.pt \(no best_acc, config, epoch"):
        train(_config(tmp_path, synthetic_data, 1), tmp_path / "new", resume_from=tmp_path /
              "other.pt", progress=False, log=lambda *_: None)


def _train_until(config, out, stop_after):
    """Run ``train`` but stop (as a killed process would) after ``stop_after`` epochs."""
    import nqe.model.train as module

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = module.evaluate_model

    def counting(*args, **kwargs):
        calls["n"] += kwargs.get("desc") == "validation"    # once an epoch, whatever the phase
        result = original(*args, **kwargs)
        if calls["n"] > stop_after:
            raise Stop
        return result

    module.evaluate_model = counting
    try:
        train(config, out, progress=False, log=lambda *_: None)
    except Stop:
        pass
    finally:
        module.evaluate_model = original
    assert torch.load(out / "last.pt", weights_only=False)["epoch"] == stop_after


def test_bf16_is_kept_on_resume_unless_changed_and_each_epoch_records_it(tmp_path, synthetic_data,
                                                                          monkeypatch):
    """A run started with --bf16 resumes with it; --no-bf16 on the resume switches it off for
    the remaining epochs (for a CPU that emulates bf16), logged and recorded epoch by epoch.
    A new run without either flag trains in fp32. Where the CPU has no native bf16, --bf16
    warns."""
    import nqe.model.train as module

    def config(bf16):
        c = _config(tmp_path, synthetic_data, 3, bn_epochs=2, fold="sequential")
        c.bf16 = bf16
        return c

    monkeypatch.setattr(module, "native_cpu_bf16", lambda: False)
    lines = []
    _, plain = train(config(None), tmp_path / "plain", progress=False, log=lines.append)
    assert [r["bf16"] for r in plain] == [False] * 3
    assert not any("bf16" in line for line in lines if line.startswith("warning"))

    kept = tmp_path / "kept"
    _train_until(config(True), kept, stop_after=1)
    lines = []
    _, history = train(config(None), kept, resume=True, progress=False, log=lines.append)
    assert [r["bf16"] for r in history] == [True] * 3
    assert any(line.startswith("warning: --bf16 on a CPU without native bf16") for line in lines)
    assert torch.load(kept / "last.pt", weights_only=False)["config"]["bf16"] is True

    switched = tmp_path / "switched"
    _train_until(config(True), switched, stop_after=1)
    lines = []
    _, history = train(config(False), switched, resume=True, progress=False, log=lines.append)
    assert [r["bf16"] for r in history] == [True, False, False]
    assert "bf16 autocast off from epoch 2; the epochs before trained with it" in lines
    assert not any(line.startswith("warning") for line in lines)
    assert torch.load(switched / "last.pt", weights_only=False)["config"]["bf16"] is False


def test_export_of_trained_checkpoint_is_bit_exact(tmp_path, synthetic_data):
    config = _config(tmp_path, synthetic_data, 2)
    train(config, tmp_path / "run", progress=False, log=lambda *_: None)
    model, checkpoint = load_checkpoint(tmp_path / "run" / "best.pt")
    assert checkpoint["spec"] == json.loads(TINY.to_json())
    export_model(model, tmp_path / "w", {"name": "tiny"})
    net = load_weights(tmp_path / "w")
    x = np.load(synthetic_data / "test.npz")["x"]
    with torch.no_grad():
        fake = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    assert (run_reference(net, x) == fake).all()
    accuracy, _ = evaluate_model(model, x, np.load(synthetic_data / "test.npz")["y"],
                                 progress=False)
    assert 0.0 <= accuracy <= 1.0


def test_dampening_acts_in_the_bsn_phase_only_and_is_kept_with_the_run(tmp_path, synthetic_data,
                                                                       monkeypatch):
    """--dampen adds the oscillation penalty to the loss after the fold (the fold re-quantizes
    every weight, so before it the term would pull toward codes that are about to change)."""
    from nqe.cli import _train_command
    from nqe.model.network import NQENet

    phases = []
    penalty = NQENet.oscillation_penalty

    def recording(model):
        phases.append(model.has_unfolded_norm)
        return penalty(model)

    monkeypatch.setattr(NQENet, "oscillation_penalty", recording)
    config = _config(tmp_path, synthetic_data, 3, bn_epochs=1)
    config.dampen = 0.5
    train(config, tmp_path / "run", progress=False, log=lambda *_: None)
    steps_per_epoch = len(phases) // 2
    assert steps_per_epoch > 0 and phases == [False] * (2 * steps_per_epoch)
    saved = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert saved["config"]["dampen"] == 0.5 and "--dampen 0.5" in _train_command(saved["config"])
    # The penalty is recorded beside the task loss for the epochs it acted in.
    assert ["oscillation_penalty" in r for r in saved["history"]] == [False, True, True]
    assert all(r["oscillation_penalty"] > 0 for r in saved["history"][1:])


def test_fine_tuning_starts_from_the_checkpoint(tmp_path, synthetic_data):
    """--init-from: the run starts from the trained model (no re-calibration), with its own
    schedule; a checkpoint of another spec is refused with its path named."""
    first = tmp_path / "first"
    _, _ = train(_config(tmp_path, synthetic_data, 2, bn_epochs=1), first, progress=False,
                 log=lambda *_: None)
    source = torch.load(first / "best.pt", weights_only=False)
    config = _config(tmp_path, synthetic_data, 1)
    config.init_from = str(first / "best.pt")
    config.lr = 1e-12                            # (almost) no step: the model must stay the same
    tuned, history = train(config, tmp_path / "tuned", progress=False, log=lambda *_: None)
    assert tuned.shifts_frozen
    # Trained parameters move by ~1e-12; HEQ steps are recomputed from them at every step.
    # Everything else (frozen shifts, fold flags, BatchNorm statistics) is the checkpoint's.
    for name, value in source["model"].items():
        if not name.endswith((".weight", ".bias", ".select_gate", "log_temperature", ".step")):
            assert torch.equal(tuned.state_dict()[name].cpu(), value), name
        elif value.is_floating_point() and not name.endswith(".step"):
            assert torch.allclose(tuned.state_dict()[name].cpu(), value, atol=1e-6), name

    other = _config(tmp_path, synthetic_data, 1)
    other.spec, other.init_from = "nqe-1mb", str(first / "best.pt")
    with pytest.raises(TrainError, match="init-from .*best.pt"):
        train(other, tmp_path / "other", progress=False, log=lambda *_: None)


def test_unknown_fold_is_a_clear_error(tmp_path, synthetic_data):
    with pytest.raises(TrainError, match="--fold must be one of at-once, sequential, got 'gentle'"):
        train(_config(tmp_path, synthetic_data, 1, 1, fold="gentle"), tmp_path / "run",
              progress=False, log=lambda *_: None)


def test_unavailable_device_is_a_clear_error():
    from nqe.model.train import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(TrainError, match="--device 'cuda': CUDA is not available"):
            resolve_device("cuda")


def _wide_tiny(tmp_path):
    """TINY with 3-bit activations after the group-wise layers: the same weight shapes."""
    data = json.loads(TINY.to_json())
    data["name"] = "tiny-wide"
    for block in data["blocks"]:
        block["act_bits"] = [2, 3, 2]
    path = tmp_path / "tiny-wide.json"
    path.write_text(json.dumps(data))
    return path


def test_warm_start_begins_a_batchnorm_phase_from_a_folded_run(tmp_path, synthetic_data):
    """A folded run of TINY warm-starts a run of a wider-activation spec: weights copied, the
    BatchNorm phase, the fold and the BSN phase follow, and the result exports exactly; resuming
    the warm-started run gives the same model as running it straight."""
    train(_config(tmp_path, synthetic_data, 2, bn_epochs=1), tmp_path / "source",
          progress=False, log=lambda *_: None)

    def config():
        c = _config(tmp_path, synthetic_data, 3, bn_epochs=2, fold="sequential")
        c.spec, c.warm_start = str(_wide_tiny(tmp_path)), str(tmp_path / "source" / "last.pt")
        return c

    lines = []
    straight, history = train(config(), tmp_path / "wide", progress=False, log=lines.append)
    assert any(line.startswith("warm start from") for line in lines)
    assert [r["phase"] for r in history] == ["batchnorm", "batchnorm", "bsn"]
    assert straight.spec.name == "tiny-wide" and not straight.has_unfolded_norm
    saved = torch.load(tmp_path / "wide" / "last.pt", weights_only=False)["config"]
    assert saved["warm_start"] == str(tmp_path / "source" / "last.pt")

    _train_until(config(), tmp_path / "partial", stop_after=1)
    resumed, _ = train(config(), tmp_path / "partial", resume=True, progress=False,
                       log=lambda *_: None)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name

    export_model(straight, tmp_path / "weights")
    net = load_weights(tmp_path / "weights")
    images = np.load(synthetic_data / "test.npz")["x"]
    with torch.no_grad():
        fake = straight.eval()(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    assert (fake.numpy() == run_reference(net, images)).all()


def test_warm_start_copies_the_source_weights(tmp_path, synthetic_data):
    train(_config(tmp_path, synthetic_data, 2, bn_epochs=1), tmp_path / "source",
          progress=False, log=lambda *_: None)
    source, _ = load_checkpoint(tmp_path / "source" / "last.pt")
    c = _config(tmp_path, synthetic_data, 1, bn_epochs=1)
    c.spec, c.warm_start, c.lr = str(_wide_tiny(tmp_path)), str(tmp_path / "source" / "last.pt"), 0.0
    model, _ = train(c, tmp_path / "wide", progress=False, log=lambda *_: None)
    for name, conv in source.convs.items():
        assert torch.equal(conv.weight, model.convs[name].weight), name


@pytest.mark.parametrize("case, message", [
    ("no-bn-epochs", r"--warm-start .*: the warm start begins a BatchNorm phase; give "
                     r"--bn-epochs > 0 \(got 0\)"),
    ("with-init-from", "--warm-start and --init-from exclude each other"),
    ("missing", r"--warm-start .*nowhere.pt: no such checkpoint file"),
    ("unfolded", r"--warm-start .*last.pt: its network is not folded into BSN yet"),
    ("other-layers", r"--warm-start .*last.pt: its spec 'tiny' has layers \["),
])
def test_warm_start_errors_name_the_option_and_file(tmp_path, synthetic_data, case, message):
    train(_config(tmp_path, synthetic_data, 1, bn_epochs=1 if case == "unfolded" else 0),
          tmp_path / "source", progress=False, log=lambda *_: None)
    c = _config(tmp_path, synthetic_data, 1, bn_epochs=0 if case == "no-bn-epochs" else 1)
    c.spec, c.warm_start = str(_wide_tiny(tmp_path)), str(tmp_path / "source" / "last.pt")
    if case == "with-init-from":
        c.init_from = c.warm_start
    if case == "missing":
        c.warm_start = str(tmp_path / "nowhere.pt")
    if case == "other-layers":
        c.spec = "nqe-1mb"
    with pytest.raises(TrainError, match=message):
        train(c, tmp_path / "run", progress=False, log=lambda *_: None)


def test_export_as_an_equal_spec_under_its_name(tmp_path, synthetic_data):
    """`nqe export --as-spec` relabels a run trained from a spec file under another name, and
    refuses a spec that differs in anything but the name."""
    import subprocess
    import sys

    train(_config(tmp_path, synthetic_data, 1), tmp_path / "run", progress=False,
          log=lambda *_: None)
    renamed = json.loads(TINY.to_json()) | {"name": "tiny-product"}
    (tmp_path / "product.json").write_text(json.dumps(renamed))

    def export(spec_file, out):
        return subprocess.run([sys.executable, "-m", "nqe.cli", "export", "--checkpoint",
                               str(tmp_path / "run" / "best.pt"), "--as-spec", str(spec_file),
                               "--out", str(out), "--data", str(synthetic_data), "--check", "10",
                               "--no-progress"], capture_output=True, text=True)

    result = export(tmp_path / "product.json", tmp_path / "w")
    assert result.returncode == 0, result.stderr
    assert load_weights(tmp_path / "w", spec=str(tmp_path / "product.json")).spec.name == \
        "tiny-product"
    saved = torch.load(tmp_path / "w" / "float_checkpoint.pt", weights_only=False)
    assert saved["spec"]["name"] == "tiny-product"

    result = export(_wide_tiny(tmp_path), tmp_path / "w2")
    assert result.returncode == 2
    assert "--as-spec" in result.stderr and "differs from the checkpoint's spec 'tiny' in blocks" \
        in result.stderr
    assert not (tmp_path / "w2").exists()


def test_warm_start_with_other_weight_shapes_names_the_layer(tmp_path, synthetic_data):
    train(_config(tmp_path, synthetic_data, 2, bn_epochs=1), tmp_path / "source",
          progress=False, log=lambda *_: None)
    data = json.loads(TINY.to_json())
    data["name"], data["blocks"][1]["expand"] = "tiny-wider", 24
    (tmp_path / "wider.json").write_text(json.dumps(data))
    c = _config(tmp_path, synthetic_data, 1, bn_epochs=1)
    c.spec, c.warm_start = str(tmp_path / "wider.json"), str(tmp_path / "source" / "last.pt")
    with pytest.raises(TrainError, match=r"--warm-start .*last.pt: warm start: layer 'b2.pw1' "
                                         r"weight shape \(24, 8, 1, 1\) in spec 'tiny-wider'"):
        train(c, tmp_path / "run", progress=False, log=lambda *_: None)

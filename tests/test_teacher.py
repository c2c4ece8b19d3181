"""Float teacher and distillation: the loss is Hinton's, the teacher resumes exactly, and a
teacher is only accepted when it held out the student's validation images."""

import json

import pytest
import torch
import torch.nn.functional as F

import nqe.model.teacher as teacher_module
from nqe.model.teacher import (ResNetTeacher, TeacherConfig, distillation_loss, load_teacher,
                               train_teacher)
from nqe.model.train import TrainConfig, TrainError, train
from test_train import TINY


def _quiet(*_):
    pass


def _teacher_config(data, epochs=2, **overrides):
    return TeacherConfig(**{"depth": 8, "width": 4, "epochs": epochs, "batch_size": 32,
                            "lr": 0.05, "val_size": 50, "data": str(data), "threads": 1,
                            **overrides})


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory, synthetic_data):
    out = tmp_path_factory.mktemp("teacher")
    train_teacher(_teacher_config(synthetic_data), out, progress=False, log=_quiet)
    return out / "best.pt"


def test_distillation_loss_is_temperature_scaled_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    for temperature in (1.0, 4.0):
        p = F.softmax(teacher / temperature, dim=1)
        q = F.softmax(student / temperature, dim=1)
        by_hand = (p * (p.log() - q.log())).sum(dim=1).mean() * temperature ** 2
        assert torch.allclose(distillation_loss(student, teacher, temperature), by_hand,
                              rtol=1e-5, atol=1e-7)
    # A student that matches the teacher exactly has nothing left to learn from it.
    assert float(distillation_loss(teacher, teacher, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_teacher_shape_errors_name_the_field():
    assert ResNetTeacher(20)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)
    with pytest.raises(TrainError, match="depth must be 6n\\+2.*got 21"):
        ResNetTeacher(21)
    with pytest.raises(TrainError, match="width must be at least 1, got 0"):
        ResNetTeacher(20, width=0)


def test_resumed_teacher_equals_uninterrupted(tmp_path, synthetic_data):
    straight, _ = train_teacher(_teacher_config(synthetic_data, 3), tmp_path / "straight",
                                progress=False, log=_quiet)

    class Stop(Exception):
        pass

    original, calls = teacher_module.evaluate_model, []

    def stop_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise Stop
        return original(*args, **kwargs)

    teacher_module.evaluate_model = stop_after_two
    try:
        with pytest.raises(Stop):
            train_teacher(_teacher_config(synthetic_data, 3), tmp_path / "partial",
                          progress=False, log=_quiet)
    finally:
        teacher_module.evaluate_model = original
    resumed, history = train_teacher(_teacher_config(synthetic_data, 3), tmp_path / "partial",
                                     resume=True, progress=False, log=_quiet)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_load_teacher_checks_the_file(tmp_path, trained_teacher, synthetic_data):
    model, checkpoint = load_teacher(trained_teacher)
    assert checkpoint["kind"] == "teacher" and not model.training
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    again, _ = load_teacher(trained_teacher)
    assert torch.equal(model(x), again(x))

    with pytest.raises(TrainError, match="missing.pt: no such file"):
        load_teacher(tmp_path / "missing.pt")
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(TINY.to_json())
    student = TrainConfig(spec=str(spec_path), epochs=1, batch_size=32, val_size=50,
                          data=str(synthetic_data), threads=1)
    train(student, tmp_path / "student", progress=False, log=_quiet)
    with pytest.raises(TrainError, match="student.*best.pt: not a teacher checkpoint"):
        load_teacher(tmp_path / "student" / "best.pt")


def _student(tmp_path, data, **overrides):
    spec_path = tmp_path / "tiny.json"
    spec_path.write_text(TINY.to_json())
    return TrainConfig(**{"spec": str(spec_path), "epochs": 2, "batch_size": 32,
                          "val_size": 50, "freeze_epochs": 1, "data": str(data), "threads": 1,
                          "bn_epochs": 1, **overrides})


def test_distillation_weight_zero_is_plain_training(tmp_path, trained_teacher, synthetic_data):
    """With weight 0 the teacher runs but must not change a bit of the student (it draws no
    random numbers and touches no batch); with weight 1 it must change it."""
    plain, _ = train(_student(tmp_path, synthetic_data), tmp_path / "plain", progress=False,
                     log=_quiet)
    silent, _ = train(_student(tmp_path, synthetic_data, teacher=str(trained_teacher),
                               distill_weight=0.0), tmp_path / "silent", progress=False,
                      log=_quiet)
    taught, _ = train(_student(tmp_path, synthetic_data, teacher=str(trained_teacher),
                               distill_weight=1.0), tmp_path / "taught", progress=False,
                      log=_quiet)
    for name, value in plain.state_dict().items():
        assert torch.equal(value, silent.state_dict()[name]), name
    assert any(not torch.equal(value, taught.state_dict()[name])
               for name, value in plain.state_dict().items())
    saved = torch.load(tmp_path / "taught" / "last.pt", weights_only=False)["config"]
    assert saved["teacher"] == str(trained_teacher) and saved["distill_weight"] == 1.0


def test_teacher_with_another_validation_split_is_refused(tmp_path, trained_teacher,
                                                          synthetic_data):
    with pytest.raises(TrainError, match="validation split .*'seed': 0.*seed 1"):
        train(_student(tmp_path, synthetic_data, teacher=str(trained_teacher), seed=1),
              tmp_path / "s", progress=False, log=_quiet)
    with pytest.raises(TrainError, match="--distill-weight must be in \\[0, 1\\], got 1.5"):
        train(_student(tmp_path, synthetic_data, teacher=str(trained_teacher),
                       distill_weight=1.5), tmp_path / "w", progress=False, log=_quiet)


def test_teacher_history_is_written(trained_teacher):
    history = json.loads((trained_teacher.parent / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2]
    assert all(0.0 <= r["val_acc"] <= 1.0 for r in history)


def test_teacher_snapshot_resumes_a_teacher_run_only(tmp_path, trained_teacher, synthetic_data):
    """A teacher's snapshot.pt starts an empty folder at its epoch (the finished run: nothing
    left to train); the student's `train` refuses it, naming the file and the kind."""
    snapshot = trained_teacher.parent / "snapshot.pt"
    state = torch.load(snapshot, weights_only=False)
    assert state["kind"] == "teacher" and state["optimizer"]["state"] == {}
    model, history = train_teacher(_teacher_config(synthetic_data), tmp_path / "moved",
                                   resume_from=snapshot, progress=False, log=_quiet)
    assert [r["epoch"] for r in history] == [r["epoch"] for r in state["history"]]
    for name, value in state["model"].items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(TrainError, match=r"--resume-from .*snapshot.pt: a snapshot of a teacher "
                                         r"run, not of a train run"):
        train(TrainConfig(data=str(synthetic_data), val_size=50), tmp_path / "student",
              resume_from=snapshot, progress=False, log=_quiet)


def test_projection_shortcut_is_the_strided_1x1_convolution():
    """The stride-2 projection subsamples before a stride-1 1x1 convolution (oneDNN's AVX2
    strided 1x1 weight gradient corrupts the heap under 8 channels_last channels): the same
    function as the strided convolution, so teachers trained before the change load unchanged
    (the float teacher, outside the integer contract: the two kernels may round differently)."""
    torch.manual_seed(0)
    model = ResNetTeacher(8, width=4).eval()
    block = model.stages[1]
    assert block.stride == 2 and len(block.shortcut) == 2
    x = torch.randn(3, 4, 16, 16).contiguous(memory_format=torch.channels_last)
    conv, norm = block.shortcut
    expected = norm(F.conv2d(x, conv.weight, stride=2))
    torch.testing.assert_close(block.shortcut(x[:, :, ::2, ::2]), expected)
    assert expected.shape == (3, 8, 8, 8)

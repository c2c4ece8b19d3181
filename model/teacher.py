"""Float teacher for distillation: a CIFAR ResNet (He et al. 2016, 6n+2 layers) trained in-house.

The teacher is not part of the integer model or the hardware. Its one job is to give the
quantized student soft targets (``nqe train --teacher``): Hinton-style distillation, the KL
divergence between the temperature-softened class distributions, scaled by T**2 so that its
gradient does not shrink as T grows.

A teacher run folder holds ``last.pt`` (resumable: model, optimizer, schedule, RNG state,
history), ``best.pt`` (best validation accuracy, same train/validation split as the student) and
``history.json``. The test set is never touched.
"""

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .train import (RunFolder, TrainError, _to_nchw, augment, evaluate_model, resolve_device,
                    training_split)

__all__ = ["ResNetTeacher", "TeacherConfig", "train_teacher", "load_teacher",
           "distillation_loss"]

# CIFAR-10 training-set channel statistics (0..255 scale); normalization is inside the model so
# that it takes the same uint8-valued images as the student.
_MEAN = (125.3, 123.0, 113.9)
_STD = (63.0, 62.1, 66.7)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels, out_channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # The projection's stride is taken by subsampling before a stride-1 1x1 convolution:
        # the same function, but oneDNN's AVX2 weight gradient of a strided 1x1 convolution
        # corrupts the heap on channels_last inputs of fewer than 8 channels (torch 2.13).
        self.stride = stride
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, 1, bias=False),
                nn.BatchNorm2d(out_channels))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        subsampled = x[:, :, ::self.stride, ::self.stride]
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(subsampled))


class ResNetTeacher(nn.Module):
    """ResNet-(6n+2) for 32x32 images: three stages of n basic blocks, widths w, 2w, 4w."""

    def __init__(self, depth=20, width=16, num_classes=10):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise TrainError(f"teacher depth must be 6n+2 with n >= 1 (20, 32, 44, ...), "
                             f"got {depth}")
        if width < 1:
            raise TrainError(f"teacher width must be at least 1, got {width}")
        blocks = (depth - 2) // 6
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1))
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        layers, channels = [], width
        for stage in range(3):
            for i in range(blocks):
                out = width << stage
                layers.append(_BasicBlock(channels, out, 2 if stage and not i else 1))
                channels = out
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, images):
        x = (images.float() - self.mean) / self.std
        x = self.stages(self.stem(x))
        return self.fc(x.mean(dim=(2, 3)))


def distillation_loss(student_logits, teacher_logits, temperature):
    """Hinton's soft-target term: T**2 * KL(softmax(teacher / T) || softmax(student / T))."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True,
                    reduction="batchmean") * temperature ** 2


@dataclass
class TeacherConfig:
    depth: int = 20
    width: int = 16
    epochs: int = 30
    batch_size: int = 256
    lr: float = 0.2                 # SGD peak (one-cycle)
    weight_decay: float = 5e-4
    device: str = "auto"
    val_size: int = 5000
    seed: int = 0
    bf16: bool | None = None        # None: off, or on resume the run's saved setting
    threads: int = 0
    data: str | None = None
    limit_train: int = 0


def load_teacher(path):
    """A trained teacher from a teacher run's ``best.pt``/``last.pt``; returns (model, checkpoint).

    Raises :class:`TrainError` naming the file when it is missing or is not a teacher checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"teacher checkpoint {path}: no such file (train one with "
                         f"`nqe teacher --out DIR`, then pass DIR/best.pt)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != "teacher":
        raise TrainError(f"teacher checkpoint {path}: not a teacher checkpoint (field 'kind' "
                         f"is {checkpoint.get('kind') if isinstance(checkpoint, dict) else None!r}"
                         f", expected 'teacher'); an `nqe train` checkpoint cannot be a teacher")
    config = checkpoint["config"]
    model = ResNetTeacher(config["depth"], config["width"])
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, checkpoint


def train_teacher(config, out_dir, resume=False, progress=True, log=print, resume_from=None):
    """Train a float teacher on the student's training split; returns (model, history).
    ``resume_from``: a ``snapshot.pt`` (or ``last.pt``) to start the empty ``out_dir`` from."""
    run = RunFolder(out_dir, config, resume, log, resume_from=resume_from, kind="teacher")
    config = run.config
    data, (tx, ty), (vx, vy) = training_split(config)
    device = resolve_device(config.device)
    log(f"data: {data.root} ({data.layout}); train {len(tx)}, validation {len(vx)} "
        f"(seed {config.seed}); device: {device}")
    train_images = _to_nchw(tx).to(device)
    train_labels = torch.from_numpy(ty.astype(np.int64)).to(device)

    torch.manual_seed(config.seed)
    model = ResNetTeacher(config.depth, config.width).to(device=device,
                                                         memory_format=torch.channels_last)
    decay = [p for name, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for name, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": config.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=config.lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(tx) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=steps_per_epoch * config.epochs, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    history, start_epoch = [], 0
    if run.state is not None:
        history, start_epoch = run.restore(model, optimizer, scheduler, generator)
        if run.rebuild_best:
            run.write_resumed_best(model)

    for epoch in range(start_epoch, config.epochs):
        model.train()
        started = time.time()
        order = torch.randperm(len(tx), generator=generator)
        loss_sum, correct = 0.0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"teacher epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size].to(device)
            images = augment(train_images[idx], generator).float().contiguous(
                memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                logits = model(images)
            loss = F.cross_entropy(logits.float(), train_labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == train_labels[idx]).sum())
        val_acc, _ = evaluate_model(model, vx, vy, desc="validation", progress=progress)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / len(tx),
                  "train_acc": correct / len(tx), "val_acc": val_acc,
                  "lr": scheduler.get_last_lr()[0], "seconds": time.time() - started,
                  "device": str(device), "bf16": config.bf16}
        history.append(record)
        log(f"teacher epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f} train "
            f"{record['train_acc']:.4f} validation {val_acc:.4f} ({record['seconds']:.0f} s)")
        run.save_epoch({"kind": "teacher", "config": asdict(config), "epoch": epoch + 1,
                        "history": history, "val_acc": val_acc},
                       model, model, optimizer, scheduler, generator)
    return model, history

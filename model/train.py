"""Training loop: seeded, resumable, validation split from train, progress bars.

A run folder holds ``last.pt`` (everything needed to resume: model, optimizer, schedule, RNG
states, history) written after every epoch, ``snapshot.pt`` (the same without the optimizer's
moments: about a third of the size, small enough to commit, so a run survives a change of
machine), ``best.pt`` (the model with the best validation accuracy, measured with the exact
integer forward), and ``history.json``.
"""

import copy
import ctypes
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .data import load_cifar10, split_train_val
from .network import NQENet
from .spec import load_spec, spec_from_dict

__all__ = ["TrainError", "TrainConfig", "train", "load_checkpoint", "evaluate_model", "augment",
           "RunFolder", "training_split", "keep_freed_memory"]


FOLDS = ("at-once", "sequential")

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4        # glibc's mallopt parameters (malloc.h)


def keep_freed_memory():
    """Keep freed blocks in the process's heap instead of giving them back to the system.

    glibc serves a block of 32 MB or more (a batch's activations) with a fresh mapping and unmaps
    it when freed, so each training step faults in its activations' pages again: about 30 % of a
    CPU step's time on nqe-1mb (`nqe bench-train` measures it). The heap then stays at the step's
    peak. Returns whether the allocator took the setting (glibc on Linux only).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and \
            bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))    # -1: never trim
    except (OSError, AttributeError):
        return False


class TrainError(ValueError):
    """A training run cannot start as configured; the message names the option and the file."""


@dataclass
class TrainConfig:
    spec: str = "nqe-1mb"
    epochs: int = 16
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.0
    freeze_epochs: int = 2          # the last epochs train with BSN shifts frozen
    bn_epochs: int = 0              # the first epochs train with float BatchNorm, then folded
    fold: str = "at-once"           # "at-once" or "sequential" (NQENet.fold_batch_norm)
    fold_images: int = 2048         # training images the sequential fold measures statistics on
    init_from: str = ""             # start from this checkpoint's model (a fine-tuning run)
    warm_start: str = ""            # start the BatchNorm phase from a folded run of another spec
    quantizer: str = "heq"          # weight step: "heq" or "minmax" (ablation baseline)
    teacher: str = ""               # a float teacher's checkpoint (`nqe teacher`): distillation
    distill_weight: float = 0.9     # loss = (1 - w) * cross-entropy + w * soft-target term
    distill_temperature: float = 4.0
    dampen: float = 0.0             # oscillation dampening in the BSN phase: loss += dampen *
                                    # NQENet.oscillation_penalty() (0: off)
    device: str = "auto"            # "auto": CUDA when available, else CPU; not kept on resume
    val_size: int = 5000
    seed: int = 0
    bf16: bool | None = None        # bf16 autocast for the BatchNorm phase and the teacher;
                                    # folded (BSN) layers accumulate in fp32 (QuantConv.accumulate).
                                    # None: off, or on resume the run's saved setting
    threads: int = 0                # 0: torch default
    data: str | None = None
    limit_train: int = 0            # use only this many training images (0: all); for smoke runs
    bn_val_every: int | None = None # validate only every N-th epoch of the BatchNorm phase (and
                                    # its last); None: every epoch. Validation changes no weight
                                    # and draws no random number, so a resume may change it
    spec_json: dict = field(default_factory=dict)   # the resolved spec, kept with the run


def augment(images, generator):
    """Random 4-pixel-padded crop and horizontal flip on a uint8 NCHW batch.

    The random draws come from ``generator`` (a CPU generator) whatever device the images are
    on, so a run draws the same crops on a GPU as on the CPU.
    """
    n, device = images.shape[0], images.device
    padded = F.pad(images, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (n,), generator=generator).to(device)
    dy = torch.randint(0, 9, (n,), generator=generator).to(device)
    span = torch.arange(32, device=device)
    rows = (dy.view(n, 1) + span.view(1, 32))          # n x 32
    cols = (dx.view(n, 1) + span.view(1, 32))
    out = padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                 torch.arange(images.shape[1], device=device).view(1, -1, 1, 1),
                 rows.view(n, 1, 32, 1), cols.view(n, 1, 1, 32)]
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    return torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)


def native_cpu_bf16():
    """Whether this CPU computes bf16 natively (AVX512-BF16, AMX). Without it oneDNN emulates
    bf16 convolutions: a 2-core AVX2 AMD EPYC took 9.45 s per BatchNorm-phase training step
    under bf16 autocast against 1.15 s in fp32 (`nqe bench-train`, with and without --fp32).
    Unknown (an older torch without the query) counts as native: no warning."""
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return True if query is None else bool(query())
    except RuntimeError:
        return True


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"--device {name!r}: CUDA is not available on this machine "
                         f"(use --device cpu or auto)")
    return device


def _to_nchw(x):
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


@torch.no_grad()
def evaluate_model(model, x_nhwc, y, batch_size=500, desc="eval", progress=True):
    """Accuracy of the exact (eval-mode, fp32) forward; returns (accuracy, predictions)."""
    model.eval()
    device = next(model.parameters()).device
    preds = []
    for start in tqdm(range(0, len(x_nhwc), batch_size), desc=desc, leave=False,
                      disable=not progress):
        batch = _to_nchw(x_nhwc[start:start + batch_size]).to(device)
        preds.append(model(batch).argmax(dim=1).cpu().numpy())
    preds = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    return float((preds == np.asarray(y)).mean()) if len(preds) else float("nan"), preds


def _cpu_state(model):
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _has_norm(state_dict):
    """Whether a model state holds BatchNorm modules (trained with a BatchNorm phase)."""
    return any(".norm." in key for key in state_dict)


def load_checkpoint(path):
    """A model from ``best.pt`` or ``last.pt``; returns (model, checkpoint dict)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    spec = spec_from_dict(checkpoint["spec"], source=f"{path} (embedded spec)")
    model = NQENet(spec, batch_norm=_has_norm(checkpoint["model"]),
                   quantizer=checkpoint["config"].get("quantizer", "heq"))
    model.load_state_dict(checkpoint["model"])
    return model, checkpoint


# What last.pt/snapshot.pt add to an epoch's payload (best.pt holds the payload and a model).
RESUME_ONLY = ("model", "optimizer", "scheduler", "generator", "torch_rng", "best_acc",
               "best_epoch")


class RunFolder:
    """A run's folder: ``last.pt`` (everything needed to resume) and ``snapshot.pt`` (the same
    less the optimizer's moments) after every epoch, ``best.pt`` on the best validation accuracy,
    ``history.json``. Shared by ``nqe train`` and ``nqe teacher``.

    On ``resume`` with a ``last.pt`` present, :attr:`config` is the one the run was started with
    (its schedule depends on it); only the data location and the device may differ between
    machines. ``resume_from`` starts an empty folder from a snapshot instead: the run goes on
    at the same point of its schedule with the same random streams, but the optimizer's moment
    estimates start again from zero (Adam re-estimates them within a few hundred steps), so it
    is not bit-identical to an uninterrupted run.
    """

    def __init__(self, path, config, resume, log, resume_from=None, kind="train"):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.last = self.path / "last.pt"
        self.log = log
        self.state, self.best_acc, self.best_epoch = None, -1.0, 0
        self.rebuild_best = False
        if resume_from:
            source = Path(resume_from)
            if self.last.exists():
                raise TrainError(f"--resume-from {source}: {self.last} already exists; continue "
                                 f"that run with --resume, or give another --out")
            if not source.is_file():
                raise TrainError(f"--resume-from {source}: no such snapshot file")
            self.state = torch.load(source, map_location="cpu", weights_only=False)
            missing = {"config", "epoch", "history", "model", "optimizer", "scheduler",
                       "generator", "torch_rng", "best_acc"} - set(self.state)
            if missing:
                raise TrainError(f"--resume-from {source}: not a run snapshot or last.pt "
                                 f"(no {', '.join(sorted(missing))})")
            if self.state.get("kind", "train") != kind:
                raise TrainError(f"--resume-from {source}: a snapshot of a "
                                 f"{self.state.get('kind', 'train')} run, not of a {kind} run")
        elif resume and self.last.exists():
            self.state = torch.load(self.last, map_location="cpu", weights_only=False)
            source = self.last
        if self.state is not None:
            # What may differ from the saved configuration: where things are, and settings that
            # change neither the weights nor the random streams.
            given = {"data": config.data, "device": config.device}
            if getattr(config, "bn_val_every", None) is not None:
                given["bn_val_every"] = config.bn_val_every
            # bf16 changes only the rounding of the float steps: a run may leave it for a CPU
            # that emulates it (--no-bf16); each epoch's history record says which it used.
            saved_bf16 = bool(self.state["config"].get("bf16"))
            if config.bf16 is not None:
                given["bf16"] = config.bf16
            config = type(config)(**{**self.state["config"], **given})
            shown = {key: ("..." if key == "spec_json" else value)
                     for key, value in asdict(config).items()}
            log(f"resuming {source} with its saved configuration: {shown}")
            if bool(config.bf16) != saved_bf16:
                log(f"bf16 autocast {'on' if config.bf16 else 'off'} from epoch "
                    f"{self.state['epoch'] + 1}; the epochs before trained "
                    f"{'with' if saved_bf16 else 'without'} it")
        if config.bf16 is None:
            config = replace(config, bf16=False)
        if config.bf16 and resolve_device(config.device).type == "cpu" and not native_cpu_bf16():
            log(f"warning: --bf16 on a CPU without native bf16 (torch reports "
                f"{torch.backends.cpu.get_cpu_capability()}): oneDNN emulates it, several times "
                f"slower than fp32 (`nqe bench-train` against `--fp32` measures it); "
                f"--no-bf16 trains in fp32" + (", also on --resume" if self.state else ""))
        self.config = config

    def restore(self, model, optimizer, scheduler, generator):
        """Load the resumed state into the run's objects; returns (history, start epoch).

        A snapshot (or a ``last.pt`` from elsewhere) does not bring ``best.pt``: when its epoch
        was the best, :attr:`rebuild_best` asks the caller for :meth:`write_resumed_best` of
        that epoch's scored model; otherwise the selection starts again with the epochs after
        it (the history keeps the earlier ones)."""
        state = self.state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.best_acc = state["best_acc"]
        self.best_epoch = state.get("best_epoch") or next(   # last.pt of earlier versions
            (r["epoch"] for r in state["history"] if r["val_acc"] == self.best_acc), 0)
        if not state["optimizer"]["state"]:
            self.log(f"snapshot at epoch {state['epoch']}: the optimizer's moments start again "
                     f"from zero")
        if not (self.path / "best.pt").exists():     # a snapshot or last.pt from elsewhere
            if self.best_epoch == state["epoch"]:
                self.rebuild_best = True
            else:
                self.log(f"the best model so far (epoch {self.best_epoch}, validation "
                         f"{self.best_acc:.4f}) is not in the snapshot: best.pt will hold the "
                         f"best of the epochs after epoch {state['epoch']}")
                self.best_acc, self.best_epoch = -1.0, 0
        return state["history"], state["epoch"]

    def write_best(self, payload, best_model):
        torch.save({**payload, "model": _cpu_state(best_model)}, self.path / "best.pt")
        self.rebuild_best = False

    def write_resumed_best(self, best_model):
        """``best.pt`` of the resumed epoch (see :meth:`restore`): its payload as saved."""
        payload = {key: value for key, value in self.state.items() if key not in RESUME_ONLY}
        self.write_best(payload, best_model)

    def save_epoch(self, payload, best_model, model, optimizer, scheduler, generator):
        """After an epoch: ``best.pt`` (with ``best_model``'s state) if ``payload['val_acc']`` is
        the best yet, ``last.pt`` and ``snapshot.pt`` (each written atomically) and
        ``history.json``. An epoch that was not validated (``val_acc`` None) is never the best."""
        if payload["val_acc"] is not None and payload["val_acc"] > self.best_acc:
            self.best_acc, self.best_epoch = payload["val_acc"], payload["epoch"]
            self.write_best(payload, best_model)
        optimizer_state = optimizer.state_dict()
        state = {**payload, "model": _cpu_state(model), "optimizer": optimizer_state,
                 "scheduler": scheduler.state_dict(), "generator": generator.get_state(),
                 "torch_rng": torch.get_rng_state(), "best_acc": self.best_acc,
                 "best_epoch": self.best_epoch}
        self._save_atomically(state, self.last)
        self._save_atomically({**state, "optimizer": {**optimizer_state, "state": {}}},
                              self.path / "snapshot.pt")
        (self.path / "history.json").write_text(json.dumps(payload["history"], indent=2))

    @staticmethod
    def _save_atomically(state, path):
        partial = path.with_suffix(".tmp")
        torch.save(state, partial)
        partial.replace(path)


def _validates(config, epoch, in_norm_phase):
    """Whether ``epoch`` (1-based) is validated: every BSN epoch (the candidates for best.pt),
    the last epoch of the run and of the BatchNorm phase, and every ``bn_val_every``-th before.

    During the BatchNorm phase a validation folds a copy of the network and runs the exact
    forward twice (about 9 s of a 149 s epoch of nqe-1mb on a 2-core CPU), and none of those
    epochs can be the shipped model."""
    every = config.bn_val_every or 1
    return not in_norm_phase or epoch % every == 0 or epoch in (config.bn_epochs, config.epochs)


def training_split(config):
    """The run's data, training and validation images (seeded, stratified split of ``train``)."""
    data = load_cifar10(config.data)
    (tx, ty), (vx, vy) = split_train_val(data.train_x, data.train_y, config.val_size,
                                         config.seed)
    if config.limit_train:
        tx, ty = tx[:config.limit_train], ty[:config.limit_train]
    return data, (tx, ty), (vx, vy)


def _load_matching_teacher(config, device, log):
    """The run's teacher, checked to have held out the same validation images as the student
    (a teacher that trained on them would leak them into model selection)."""
    from .teacher import load_teacher

    if not 0.0 <= config.distill_weight <= 1.0:
        raise TrainError(f"--distill-weight must be in [0, 1], got {config.distill_weight}")
    if config.distill_temperature <= 0:
        raise TrainError(f"--distill-temperature must be positive, got "
                         f"{config.distill_temperature}")
    teacher, checkpoint = load_teacher(config.teacher)
    split = {key: checkpoint["config"][key] for key in ("seed", "val_size")}
    if split != {"seed": config.seed, "val_size": config.val_size}:
        raise TrainError(f"--teacher {config.teacher}: trained with validation split {split}, "
                         f"the student uses seed {config.seed}, val_size {config.val_size}; "
                         f"train the teacher with the same --seed and --val-size")
    log(f"teacher: {config.teacher} (ResNet-{checkpoint['config']['depth']}, width "
        f"{checkpoint['config']['width']}, validation {checkpoint['val_acc']:.4f}); distillation "
        f"weight {config.distill_weight}, temperature {config.distill_temperature}")
    return teacher.to(device=device, memory_format=torch.channels_last)


def _unnamed(spec_dict):
    return {key: value for key, value in spec_dict.items() if key != "name"}


def _load_warm_start_source(config, spec):
    """The folded network a ``--warm-start`` run begins from (same layers and weight shapes)."""
    if config.bn_epochs <= 0:
        raise TrainError(f"--warm-start {config.warm_start}: the warm start begins a BatchNorm "
                         f"phase; give --bn-epochs > 0 (got {config.bn_epochs})")
    path = Path(config.warm_start)
    if not path.is_file():
        raise TrainError(f"--warm-start {path}: no such checkpoint file")
    try:
        source, _ = load_checkpoint(path)
    except (KeyError, TypeError, RuntimeError) as error:
        raise TrainError(f"--warm-start {path}: not an `nqe train` checkpoint ({error})") \
            from error
    if source.has_unfolded_norm or not source.shifts_frozen:
        raise TrainError(f"--warm-start {path}: its network is not folded into BSN yet (epoch "
                         f"in its BatchNorm phase); start from a checkpoint of the BSN phase")
    layers = [layer.name for layer in spec.layers()]
    if layers != [layer.name for layer in source.spec.layers()]:
        raise TrainError(f"--warm-start {path}: its spec {source.spec.name!r} has layers "
                         f"{[layer.name for layer in source.spec.layers()]}, the run's spec "
                         f"{spec.name!r} has {layers}")
    return source       # weight shapes: NQENet.warm_start checks them, layer by layer


def train(config, out_dir, resume=False, progress=True, log=print, resume_from=None):
    """Train the fake-quant model into ``out_dir``; returns (model, history). ``resume``
    continues the run in ``out_dir`` from its ``last.pt``; ``resume_from`` starts the empty
    ``out_dir`` from a ``snapshot.pt`` (or a ``last.pt``) copied from elsewhere."""
    from .teacher import distillation_loss   # teacher.py builds on this module

    run = RunFolder(out_dir, config, resume, log, resume_from=resume_from)
    config, last = run.config, run.last
    spec = load_spec(config.spec) if not config.spec_json else \
        spec_from_dict(config.spec_json, source=f"{last} (embedded spec)")
    config.spec_json = spec.to_dict()

    data, (tx, ty), (vx, vy) = training_split(config)
    train_images = _to_nchw(tx)
    train_labels = torch.from_numpy(ty.astype(np.int64))
    log(f"data: {data.root} ({data.layout}); train {len(tx)}, validation {len(vx)} "
        f"(seed {config.seed})")

    device = resolve_device(config.device)
    log(f"device: {device}" + (f" ({torch.cuda.get_device_name(device)})"
                               if device.type == "cuda" else ""))
    if config.init_from and config.warm_start:
        raise TrainError("--warm-start and --init-from exclude each other: --init-from continues "
                         "a run of the same spec, --warm-start begins a BatchNorm phase from one")
    source = None
    if config.init_from:
        source = torch.load(config.init_from, map_location="cpu", weights_only=False)
        if _unnamed(source.get("spec") or {}) != _unnamed(config.spec_json):
            raise TrainError(f"--init-from {config.init_from}: its spec differs from the run's "
                             f"spec {spec.name!r}; fine-tuning needs the same network (only the "
                             f"name may differ)")
    warm_source = _load_warm_start_source(config, spec) if config.warm_start and \
        run.state is None else None
    teacher = _load_matching_teacher(config, device, log) if config.teacher else None
    if config.bn_val_every is not None and config.bn_val_every < 1:
        raise TrainError(f"--bn-val-every must be at least 1 (validate every N-th epoch of the "
                         f"BatchNorm phase), got {config.bn_val_every}")
    if config.fold not in FOLDS:
        raise TrainError(f"--fold must be one of {', '.join(FOLDS)}, got {config.fold!r}")

    def fold(net):
        net.fold_batch_norm(train_images[:config.fold_images] if config.fold == "sequential"
                            else None, batch_size=config.batch_size)

    def scored(net):
        """The network validation scores: during the BatchNorm phase, a copy folded as it would
        be now (validation is always the exact integer forward)."""
        if not net.has_unfolded_norm:
            return net
        folded = copy.deepcopy(net)
        fold(folded)
        return folded

    torch.manual_seed(config.seed)
    batch_norm = config.bn_epochs > 0 or (source is not None and _has_norm(source["model"]))
    model = NQENet(spec, batch_norm=batch_norm, quantizer=config.quantizer).to(
        device=device, memory_format=torch.channels_last)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    steps_per_epoch = math.ceil(len(tx) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if name.endswith(".weight") and ".norm." not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr,
                                                    total_steps=total_steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(config.seed)
    history, start_epoch = [], 0
    if run.state is not None:
        history, start_epoch = run.restore(model, optimizer, scheduler, generator)
        log(f"resumed at epoch {start_epoch}/{config.epochs} (best validation accuracy so far "
            f"{run.best_acc:.4f})")
        if run.rebuild_best:
            run.write_resumed_best(scored(model))
            log(f"best.pt rebuilt from the snapshot's epoch {start_epoch}")
    elif source is not None:
        model.load_state_dict(source["model"])
        log(f"initialized from {config.init_from} (epoch {source.get('epoch')}, validation "
            f"{source.get('val_acc')}); shifts {'frozen' if model.shifts_frozen else 'free'}")
    elif warm_source is not None:
        try:
            model.warm_start(warm_source.to(device), train_images[:config.fold_images],
                             batch_size=config.batch_size)
        except ValueError as error:
            raise TrainError(f"--warm-start {config.warm_start}: {error}") from error
        log(f"warm start from {config.warm_start} (spec {warm_source.spec.name!r}): weights "
            f"copied, BatchNorm set to reproduce its BSN layers on {config.fold_images} "
            f"training images")
        del warm_source
    else:
        model.calibrate(augment(train_images[:512], generator))

    for epoch in range(start_epoch, config.epochs):
        if epoch >= config.bn_epochs and model.has_unfolded_norm:
            fold(model)
            log(f"epoch {epoch + 1}: BatchNorm folded into BSN; shifts frozen "
                f"{ {k: g.shift for k, g in model.shift_groups.items()} }")
        if epoch >= config.epochs - config.freeze_epochs and not model.shifts_frozen \
                and not model.has_unfolded_norm:
            model.freeze_shifts()
            log(f"epoch {epoch + 1}: BSN shifts frozen "
                f"{ {k: g.shift for k, g in model.shift_groups.items()} }")
        model.train()
        started = time.time()
        order = torch.randperm(len(tx), generator=generator)
        loss_sum, penalty_sum, correct, seen = 0.0, 0.0, 0, 0
        # (in the BatchNorm phase the fold re-quantizes every weight: nothing to dampen)
        dampening = bool(config.dampen) and not model.has_unfolded_norm
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}",
                   disable=not progress, leave=False)
        for step in bar:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            images = augment(train_images[idx.to(device)], generator).float().contiguous(
                memory_format=torch.channels_last)
            labels = train_labels[idx.to(device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.bf16):
                logits = model(images)
            scaled = model.scaled_logits(logits.float())
            loss = F.cross_entropy(scaled, labels)
            if teacher is not None:
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=config.bf16):
                    soft_targets = teacher(images).float()
                loss = (1.0 - config.distill_weight) * loss + config.distill_weight * \
                    distillation_loss(scaled, soft_targets, config.distill_temperature)
            objective = loss
            if dampening:
                penalty = model.oscillation_penalty()
                objective = loss + config.dampen * penalty
                penalty_sum += penalty.item() * len(idx)
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                for conv in model.convs.values():
                    conv.weight.clamp_(-1.0, 1.0)
            loss_sum += loss.item() * len(idx)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        # The float-BatchNorm model's own accuracy is kept too (an ablation: BSN vs BN).
        val_acc = val_acc_bn = None
        scored_model = model
        if _validates(config, epoch + 1, model.has_unfolded_norm):
            if model.has_unfolded_norm:
                val_acc_bn, _ = evaluate_model(model, vx, vy, desc="validation (BN)",
                                               progress=progress)
            scored_model = scored(model)
            val_acc, _ = evaluate_model(scored_model, vx, vy, desc="validation",
                                        progress=progress)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_acc": correct / seen,
                  "val_acc": val_acc, "val_acc_batchnorm": val_acc_bn,
                  "lr": scheduler.get_last_lr()[0],
                  "seconds": time.time() - started, "shifts_frozen": model.shifts_frozen,
                  "phase": "batchnorm" if model.has_unfolded_norm else "bsn",
                  "device": str(device), "bf16": config.bf16}
        if dampening:
            # train_loss stays the task loss; the penalty (before its factor) is kept beside it
            record["oscillation_penalty"] = penalty_sum / seen
        history.append(record)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {record['train_loss']:.4f} "
            + (f"(oscillation penalty {record['oscillation_penalty']:.4f}) "
               if "oscillation_penalty" in record else "") + "train "
            f"{record['train_acc']:.4f} validation "
            + (f"{val_acc:.4f}" if val_acc is not None else
               f"skipped (the BatchNorm phase validates every {config.bn_val_every} epochs)")
            + (f" (float BatchNorm {val_acc_bn:.4f})" if val_acc_bn is not None else "")
            + f" ({record['seconds']:.0f} s)")
        run.save_epoch({"spec": config.spec_json, "config": asdict(config), "epoch": epoch + 1,
                        "history": history, "val_acc": val_acc},
                       scored_model, model, optimizer, scheduler, generator)
    return model, history

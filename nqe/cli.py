"""The ``nqe`` command line: train, teacher, export, eval, budget, bench, bench-train, verilog,
cosim.

Exit codes: 0 success; 1 a check failed (budget exceeded, mismatches found); 2 bad input (spec,
weights, data), with one message naming the file, layer and field.
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _print_json(data):
    print(json.dumps(data, indent=2))


def _machine():
    """The CPU's model name where the system tells it (Linux), else the architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.processor() or platform.machine()


def _at_least(low):
    """An argparse type: an integer no smaller than ``low``."""
    def parse(text):
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "integer"        # argparse names the type in its error message
    return parse


def _non_negative(text):
    """An argparse type: a float no smaller than 0."""
    value = float(text)
    if not value >= 0:                  # (NaN too)
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


_non_negative.__name__ = "number"


def _load_test_set(args):
    from nqe.model.data import load_cifar10

    data = load_cifar10(args.data, train=False)
    images, labels = data.test_x, data.test_y
    if args.images:
        images, labels = images[:args.images], labels[:args.images]
    return data, images, labels


# -- budget ------------------------------------------------------------------------------------


def cmd_budget(args):
    from nqe.model.budget import compute_budget
    from nqe.model.spec import load_spec

    spec = load_spec(args.spec)
    budget = compute_budget(spec)
    if args.json:
        _print_json(budget.to_dict())
    else:
        print(f"spec {spec.name}: {len(spec.layers())} layers, {spec.macs:,} MACs per image")
        print(f"{'item':<18}{'kind':<13}{'bits':>10}  detail")
        for row in budget.rows:
            print(f"{row.item:<18}{row.kind:<13}{row.bits:>10,}  {row.detail}")
        print("-" * 60)
        for kind, bits in budget.by_kind().items():
            print(f"{'':<18}{kind:<13}{bits:>10,}")
        verdict = "fits" if budget.fits else "EXCEEDS the budget"
        print(f"{'total':<31}{budget.total_bits:>10,}  of {budget.limit_bits:,} bits: {verdict}")
    if not budget.fits:
        print(f"nqe budget: spec {spec.name!r} needs {budget.total_bits:,} bits, over its budget "
              f"of {budget.limit_bits:,} bits by {budget.total_bits - budget.limit_bits:,}",
              file=sys.stderr)
        return 1
    return 0


# -- train / export ----------------------------------------------------------------------------


def _config_from_args(config_type, args, **overrides):
    """A run configuration from the command line: every dataclass field that has an option."""
    import dataclasses

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)
             if hasattr(args, f.name)}
    return config_type(**(given | overrides))


def _run_training(command, run, config, out, args, what):
    """Run ``run(config, out, ...)``; print the best epoch, or the error (exit 2)."""
    from nqe.model.train import TrainError, keep_freed_memory

    if keep_freed_memory():
        print("allocator: freed memory stays in the heap (a CPU training step faults in its "
              "activations' pages again otherwise)")
    started = time.time()
    try:
        run(config, out, resume=args.resume, resume_from=args.resume_from,
            progress=not args.no_progress)
    except TrainError as error:
        print(f"nqe {command}: error: {error}", file=sys.stderr)
        return 2
    if (out / "best.pt").exists():    # after a snapshot resume, not always the history's best
        import torch

        best = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
        print(f"best {what}validation accuracy {best['val_acc']:.4f} at epoch {best['epoch']}; "
              f"checkpoint {out / 'best.pt'} ({time.time() - started:.0f} s this call)")
    return 0


def cmd_train(args):
    from nqe.model.train import TrainConfig, train

    config = _config_from_args(TrainConfig, args, init_from=args.init_from or "",
                               warm_start=args.warm_start or "", teacher=args.teacher or "")
    out = Path(args.out or f"runs/{Path(args.spec).stem}")
    return _run_training("train", train, config, out, args, "")


def cmd_teacher(args):
    from nqe.model.teacher import TeacherConfig, train_teacher

    return _run_training("teacher", train_teacher, _config_from_args(TeacherConfig, args),
                         Path(args.out), args, "teacher ")


def _train_command(config):
    """The `nqe train` call that reproduces a run from its saved configuration."""
    if not config:
        return ""
    flags = {"spec": "--spec", "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr",
             "freeze_epochs": "--freeze-epochs", "bn_epochs": "--bn-epochs",
             "quantizer": "--quantizer", "init_from": "--init-from",
             "warm_start": "--warm-start",
             "val_size": "--val-size", "seed": "--seed"}
    if config.get("fold", "at-once") != "at-once" or config.get("warm_start"):
        flags |= {"fold": "--fold", "fold_images": "--fold-images"}
    if config.get("teacher"):
        flags |= {"teacher": "--teacher", "distill_weight": "--distill-weight",
                  "distill_temperature": "--distill-temperature"}
    parts = ["nqe", "train"] + [f"{flag} {config[key]}" for key, flag in flags.items()
                                if config.get(key) not in (None, "")]
    if config.get("dampen"):
        parts.append(f"--dampen {config['dampen']}")
    if config.get("bf16"):
        parts.append("--bf16")
    return " ".join(parts)


def _relabel_spec(model, checkpoint, spec_name):
    """Give a trained model the name of a spec equal to its own in everything else (a run
    trained from a spec file under another name); returns an error message, or None."""
    from nqe.model.spec import SpecError, load_spec

    try:
        target = load_spec(spec_name)
    except (SpecError, OSError) as error:
        return f"--as-spec {spec_name}: {error}"
    mine, theirs = model.spec.to_dict(), target.to_dict()
    differ = sorted(key for key in set(mine) | set(theirs)
                    if key != "name" and mine.get(key) != theirs.get(key))
    if differ:
        return (f"--as-spec {spec_name}: spec {target.name!r} differs from the checkpoint's spec "
                f"{model.spec.name!r} in {', '.join(differ)}")
    model.spec = target
    checkpoint["spec"] = target.to_dict()
    return None


def cmd_export(args):
    import torch

    from nqe.model.data import load_cifar10
    from nqe.model.evaluate import predict_model, predict_reference
    from nqe.model.train import load_checkpoint
    from nqe.model.weights_io import export_model, load_weights

    model, checkpoint = load_checkpoint(args.checkpoint)
    if args.as_spec:
        error = _relabel_spec(model, checkpoint, args.as_spec)
        if error:
            print(f"nqe export: error: {args.checkpoint}: {error}", file=sys.stderr)
            return 2
    history = checkpoint.get("history", [])
    name = args.name or model.spec.name
    meta = {
        "name": name, "checkpoint": str(args.checkpoint), "epoch": checkpoint.get("epoch"),
        "val_acc": checkpoint.get("val_acc"), "train_config": checkpoint.get("config"),
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "train_command": _train_command(checkpoint.get("config") or {}),
        "history": history,
        # Where the export ran; the training device of each epoch is in the history.
        "export_machine": {"platform": platform.platform(),
                           "processor": platform.processor(), "torch": torch.__version__},
        "train_devices": sorted({r.get("device", "cpu") for r in history}),
    }
    out = Path(args.out or f"weights/{name}")
    net = export_model(model, out, meta)
    # The trained float model beside its integer export (no optimizer state: ~1 MB): the
    # fake-quant model can be re-checked against the weights, or fine-tuned, from a fresh clone.
    torch.save({key: checkpoint[key] for key in ("spec", "model", "config", "epoch", "val_acc",
                                                 "history") if key in checkpoint},
               out / "float_checkpoint.pt")
    loaded = load_weights(out)          # read back through the validating loader
    data = load_cifar10(args.data, train=False)
    # test.npz is sorted by class: check a spread over every class, not the first N images.
    images = data.test_x[::max(1, len(data.test_x) // args.check)][:args.check]
    ref_logits, _ = predict_reference(loaded, images, progress=not args.no_progress)
    model_logits, _ = predict_model(model, images, progress=not args.no_progress)
    mismatches = int((ref_logits != model_logits).any(axis=1).sum())
    print(f"exported {out} (shifts {net.shifts}); integer reference vs trained model on "
          f"{len(images)} test images: {mismatches} logit mismatches")
    return 1 if mismatches else 0


# -- eval / bench ------------------------------------------------------------------------------


def cmd_curve(args):
    import json

    from nqe.model.weights_io import WeightsError
    from nqe.model.report import plot_history

    if args.weights:
        manifest_path = Path(args.weights) / "manifest.json"
        if not manifest_path.is_file():
            raise WeightsError(f"{manifest_path}: no manifest (expected an `nqe export` folder)")
        meta = json.loads(manifest_path.read_text()).get("meta", {})
        history, title = meta.get("history") or [], f"{Path(args.weights).name}"
    else:
        import torch
        checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        history, title = checkpoint.get("history") or [], str(args.checkpoint)
    if not history:
        source = args.weights or args.checkpoint
        print(f"nqe curve: error: {source} holds no training history", file=sys.stderr)
        return 2
    out = Path(args.out or (Path(args.weights) / "training_curve.png" if args.weights
                            else "training_curve.png"))
    plot_history(history, out, title=title)
    print(f"wrote {out} ({len(history)} epochs)")
    return 0


def cmd_eval(args):
    from nqe.model.evaluate import evaluate_reference
    from nqe.model.weights_io import load_weights

    net = load_weights(args.weights)
    _, images, labels = _load_test_set(args)
    report = evaluate_reference(net, images, labels, compare_model=args.compare_model,
                                progress=not args.no_progress)
    report["weights"] = str(args.weights)
    if args.json:
        _print_json(report)
    else:
        print(f"{args.weights}: integer reference accuracy {report['accuracy']:.4f} "
              f"({report['correct']}/{report['images']} test images, "
              f"{report['reference_seconds']:.1f} s)")
        if args.compare_model:
            print(f"pytorch model on the same weights: {report['model_prediction_mismatches']} "
                  f"prediction and {report['model_logit_mismatches']} logit mismatches")
    return 1 if report.get("model_logit_mismatches") else 0


def cmd_bench(args):
    from nqe.model.evaluate import benchmark
    from nqe.model.weights_io import load_weights

    net = load_weights(args.weights)
    _, images, _ = _load_test_set(args)
    report = benchmark(net, images, batch_size=args.batch_size, threads=args.threads,
                       progress=not args.no_progress)
    report["weights"] = str(args.weights)
    report["machine"] = _machine()
    if args.json:
        _print_json(report)
    else:
        print(f"{report['images']} images, batch {report['batch_size']}, "
              f"{report['torch_threads']} torch threads")
        print(f"  integer reference (numpy): {report['integer_reference_images_per_s']:8.1f} "
              f"images/s")
        print(f"  pytorch model (fp32):      {report['pytorch_images_per_s']:8.1f} images/s")
        print(f"  reference / pytorch:       {report['reference_over_pytorch']:8.2f}x")
        print(f"  prediction mismatches: {report['prediction_mismatches']}, "
              f"logit mismatches: {report['logit_mismatches']}")
    return 1 if report["logit_mismatches"] else 0


def cmd_bench_train(args):
    import torch

    from nqe.model.step_bench import BASELINE, benchmark_training_step
    from nqe.model.train import native_cpu_bf16

    report = benchmark_training_step(args.spec, batch_size=args.batch_size, steps=args.steps,
                                     warmup=args.warmup, rounds=args.rounds, phase=args.phase,
                                     bf16=not args.fp32, threads=args.threads,
                                     progress=not args.no_progress)
    report["machine"] = _machine()
    report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    report["native_bf16"] = native_cpu_bf16()
    if args.json:
        _print_json(report)
        return 0
    if report["bf16"] and not report["native_bf16"]:
        print(f"note: this CPU ({report['cpu_capability']}) has no native bf16: the steps "
              f"below are emulated bf16; --fp32 measures what training without --bf16 costs")
    print(f"spec {report['spec']}, {report['phase']} phase, batch {report['batch_size']}, "
          f"{'bf16 autocast' if report['bf16'] else 'fp32'}, {report['torch_threads']} torch "
          f"threads; median of {report['rounds']} x {report['steps_per_process']} steps per "
          f"variant, each in a fresh process")
    for name, seconds in report["seconds_per_step"].items():
        ratio = report["speedup_over_baseline"][name]
        print(f"  {name:<28}{seconds:8.3f} s/step  {ratio:5.2f}x" +
              ("  (baseline)" if name == BASELINE else ""))
    if not report["allocator_setting_taken"]:
        print("  (this allocator did not take the setting: not glibc on Linux)")
    return 0


# -- verilog -----------------------------------------------------------------------------------


def cmd_verilog(args):
    from nqe.rtl.generate import generate, lint

    log = (lambda *_: None) if args.json else print
    report = generate(args.weights, args.out, module=args.module,
                      memory_init=args.memory_init, log=log)
    status = 0
    if not args.no_lint:
        from nqe.cosim.toolchain import ToolchainError, find_verilator
        try:
            toolchain = find_verilator()
        except ToolchainError as error:
            print(f"nqe verilog: error: cannot lint: {error}", file=sys.stderr)
            return 2
        with toolchain.activated():
            ok, text = lint(Path(args.out) / report["top"], args.module)
        report["lint"] = {"ok": ok, "verilator": str(toolchain.version),
                          "waivers": sorted(report["lint_waivers"])}
        if not ok:
            print(text, file=sys.stderr)
            status = 1
        log(f"verilator {toolchain.version} --lint-only -Wall: {'clean' if ok else 'FAILED'} "
            f"(waived: {', '.join(sorted(report['lint_waivers']))})")
    if args.json:
        _print_json(report)
    else:
        print(f"map: {Path(args.out) / (args.module + '.json')}")
    return status


# -- cosim -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stdout_to_stderr(active):
    """Send everything written to file descriptor 1 (Verilator, make and cocotb subprocesses
    included) to stderr, so that stdout carries only the JSON report."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def cmd_cosim(args):
    import numpy as np

    from nqe.cosim.network import cosimulate

    _, images, labels = _load_test_set(argparse.Namespace(data=args.data, images=0))
    # test.npz is sorted by class: take every k-th image so that N images span all classes.
    index = np.linspace(0, len(images) - 1, args.images).round().astype(int)
    log = (lambda *_: None) if args.json else print
    with _stdout_to_stderr(args.json):
        report = cosimulate(args.weights, images[index], labels[index], stalls=args.stalls,
                            debug=args.debug, check_layers=args.check_layers, seed=args.seed,
                            log=log)
    report["test_image_indices"] = index.tolist()
    if args.json:
        _print_json(report)
    else:
        util = report["mac_utilization"]
        print(f"{report['images']} images, {report['mismatches']} mismatches, accuracy "
              f"{report['accuracy']:.4f}")
        print(f"cycles/image {report['cycles_per_image']:,.0f} (ideal "
              f"{report['ideal_cycles_per_image']:,.0f}), MAC utilization {util['overall']:.3f}")
        for name, value in util["layers"].items():
            print(f"  {name:<12} {value:.3f}")
        print(f"simulated {report['sim_cycles_per_s']:,.0f} cycles/s, "
              f"{report['wall_seconds_per_image']:.2f} s/image")
    return 1 if report["mismatches"] else 0


# -- parser ------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog="nqe", description="Mixed-precision quantized encoder: spec -> trained integer "
                                "model -> bit-exact reference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def data_option(p):
        p.add_argument("--data", metavar="PATH",
                       help="CIFAR-10 folder (default: $NQE_DATA, else ../shared/data)")

    def progress_option(p):
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    def run_options(p):
        """Options of every training command (``nqe train``, ``nqe teacher``)."""
        p.add_argument("--device", default="auto",
                       help="torch device for training: auto (CUDA when available), cpu, cuda")
        p.add_argument("--val-size", type=int, default=5000,
                       help="validation images held out of train (stratified, seeded; a teacher "
                            "must use the student's)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast for training steps (faster on CPUs with AMX-BF16 or "
                            "AVX512-BF16, several times slower where the CPU emulates it: a "
                            "warning says so); folded BSN layers and the classifier still "
                            "accumulate exactly. Default off; on --resume/--resume-from the "
                            "run's saved setting, which --bf16/--no-bf16 change")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
        p.add_argument("--limit-train", type=int, default=0, help="use only N training images")
        resume = p.add_mutually_exclusive_group()
        resume.add_argument("--resume", action="store_true",
                            help="continue the run in --out from last.pt with its saved "
                                 "configuration")
        resume.add_argument("--resume-from", metavar="SNAPSHOT",
                            help="start the empty --out from a run's snapshot.pt (model, "
                                 "schedule position, random streams, history; the optimizer's "
                                 "moments start again) or last.pt copied from another machine")
        data_option(p)
        progress_option(p)

    p = sub.add_parser("budget", help="on-chip memory breakdown of a spec; exit 1 over budget")
    p.add_argument("--spec", default="nqe-1mb", metavar="NAME|FILE")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("train", help="train the fake-quant model (resumable checkpoints)")
    p.add_argument("--spec", default="nqe-1mb", metavar="NAME|FILE")
    p.add_argument("--out", metavar="DIR", help="run folder (default runs/<spec>)")
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--freeze-epochs", type=int, default=2,
                   help="train the last N epochs with BSN shifts frozen")
    p.add_argument("--bn-epochs", type=int, default=0,
                   help="train the first N epochs with float BatchNorm, then fold it into BSN "
                        "(bias + frozen shift) for the remaining epochs")
    p.add_argument("--fold", choices=("at-once", "sequential"), default="at-once",
                   help="how the BatchNorm phase ends: every layer at once from its running "
                        "statistics, or layer by layer with statistics measured again through "
                        "the layers already folded")
    p.add_argument("--fold-images", type=int, default=2048,
                   help="training images the sequential fold measures statistics on")
    p.add_argument("--init-from", metavar="CHECKPOINT",
                   help="start from a trained run's best.pt/last.pt (same spec): fine-tuning")
    p.add_argument("--warm-start", metavar="CHECKPOINT",
                   help="begin the BatchNorm phase from a folded (BSN) checkpoint of a spec with "
                        "the same layers and weight shapes, e.g. wider activations: its weights, "
                        "and BatchNorm set to reproduce its layers (needs --bn-epochs)")
    p.add_argument("--bn-val-every", type=int, metavar="N",
                   help="validate only every N-th epoch of the BatchNorm phase and its last "
                        "(default: every epoch); BSN epochs always validate. It changes no "
                        "weight, so --resume takes a new value")
    p.add_argument("--quantizer", choices=("heq", "minmax"), default="heq",
                   help="weight step: HEQ (levels used equally) or plain min-max (ablation)")
    run_options(p)
    p.add_argument("--teacher", metavar="CHECKPOINT",
                   help="distill from this float teacher (best.pt of an `nqe teacher` run with "
                        "the same --seed and --val-size)")
    p.add_argument("--distill-weight", type=float, default=0.9,
                   help="loss = (1 - w) * cross-entropy + w * soft-target KL (with --teacher)")
    p.add_argument("--distill-temperature", type=float, default=4.0,
                   help="softmax temperature of the soft targets (with --teacher)")
    p.add_argument("--dampen", type=_non_negative, default=0.0, metavar="LAMBDA",
                   help="oscillation dampening in the BSN phase: add LAMBDA times the mean "
                        "squared distance (in steps) of each layer's weights from their codes "
                        "to the loss, pulling weights off the rounding thresholds (default 0: "
                        "off)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("teacher", help="train a float ResNet teacher for distillation "
                                       "(resumable checkpoints)")
    p.add_argument("--out", metavar="DIR", default="runs/teacher",
                   help="run folder (default runs/teacher)")
    p.add_argument("--depth", type=int, default=20, help="ResNet depth, 6n+2 (20, 32, 44, ...)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.2, help="SGD peak learning rate (one-cycle)")
    run_options(p)
    p.set_defaults(func=cmd_teacher)

    p = sub.add_parser("curve", help="plot a run's training curve (PNG; needs matplotlib)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", metavar="DIR", help="an exported weights folder")
    source.add_argument("--checkpoint", metavar="FILE", help="best.pt or last.pt of a run")
    p.add_argument("-o", "--out", metavar="PNG",
                   help="default: DIR/training_curve.png, else ./training_curve.png")
    p.set_defaults(func=cmd_curve)

    p = sub.add_parser("export", help="write weights/<name>/ from a checkpoint and verify it")
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="best.pt or last.pt")
    p.add_argument("--out", metavar="DIR", help="default weights/<name>")
    p.add_argument("--name", help="weights name (default: the spec's)")
    p.add_argument("--as-spec", metavar="NAME|FILE",
                   help="export under this spec's name (e.g. nqe-1mb for a run trained from an "
                        "equal spec file with another name); everything but the name must match")
    p.add_argument("--check", type=_at_least(1), default=1000,
                   help="test images on which reference and model logits must be identical "
                        "(at least 1: an export is always checked)")
    data_option(p)
    progress_option(p)
    p.set_defaults(func=cmd_export)

    for name, func, text in (("eval", cmd_eval, "integer-reference accuracy on the test set"),
                             ("bench", cmd_bench, "images/s: integer reference vs pytorch")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--weights", default="weights/nqe-1mb", metavar="DIR")
        p.add_argument("--images", type=int, default=0, help="first N test images (0: all)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        data_option(p)
        progress_option(p)
        p.set_defaults(func=func)
        if name == "eval":
            p.add_argument("--compare-model", action="store_true",
                           help="also run the pytorch model on the same weights and count "
                                "mismatches")
        else:
            p.add_argument("--batch-size", type=int, default=250)
            p.add_argument("--threads", type=int, default=0)
    p = sub.add_parser("bench-train", help="seconds per CPU training step: the fused activation "
                                           "and the kept heap against the plain step")
    p.add_argument("--spec", default="nqe-1mb", metavar="NAME|FILE")
    p.add_argument("--phase", choices=("batchnorm", "bsn"), default="batchnorm",
                   help="float-BatchNorm phase, or BSN (after the fold)")
    p.add_argument("--batch-size", type=_at_least(1), default=256)
    p.add_argument("--steps", type=_at_least(1), default=5, help="timed steps per process")
    p.add_argument("--warmup", type=_at_least(0), default=3,
                   help="untimed steps per process first (the heap grows in the first ones)")
    p.add_argument("--rounds", type=_at_least(1), default=2,
                   help="processes per variant, the variants taking turns")
    p.add_argument("--threads", type=_at_least(1), default=2, help="torch threads")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    progress_option(p)
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("verilog", help="generate the accelerator's Verilog for a weights folder")
    p.add_argument("--weights", default="weights/nqe-1mb", metavar="DIR")
    p.add_argument("-o", "--out", default="build/verilog", metavar="DIR")
    p.add_argument("--module", default="nqe_top", help="top module name")
    p.add_argument("--memory-init", action="store_true",
                   help="also write $readmemh images of the weight and bias SRAMs (ROM build)")
    p.add_argument("--no-lint", action="store_true", help="skip verilator --lint-only -Wall")
    p.add_argument("--json", action="store_true", help="print the JSON map")
    p.set_defaults(func=cmd_verilog)

    p = sub.add_parser("cosim", help="RTL on Verilator vs the integer reference, real test images")
    p.add_argument("--weights", default="weights/nqe-1mb", metavar="DIR")
    p.add_argument("--images", type=int, default=100,
                   help="test images, spread over all classes (default 100)")
    p.add_argument("--stalls", action="store_true", help="random valid/ready stalls on the host "
                                                         "streams")
    p.add_argument("--check-layers", action="store_true",
                   help="compare every layer's output bank, not only the result")
    p.add_argument("--debug", action="store_true",
                   help="waveforms, and name the first mismatching layer/channel/pixel")
    p.add_argument("--seed", type=int, default=0, help="seed of the stall draws")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    data_option(p)
    p.set_defaults(func=cmd_cosim)
    return parser


def main(argv=None):
    from nqe.cosim.toolchain import ToolchainError
    from nqe.model.contract import ContractError
    from nqe.model.data import DataError
    from nqe.model.spec import SpecError
    from nqe.model.weights_io import WeightsError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SpecError, WeightsError, ContractError, DataError, ToolchainError) as error:
        print(f"nqe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

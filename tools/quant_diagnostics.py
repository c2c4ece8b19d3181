#!/usr/bin/env python3
"""Weight-oscillation diagnostics of trained checkpoints (the model card's "What limits it").

  python tools/quant_diagnostics.py threshold CKPT...   share of the latent weights that sit
      within --band steps of a rounding threshold, per layer and in all (uniform spread: about
      2 * band); weights past the top code's half step, and sign (1-bit) weights, cannot change
      code there and are left out
  python tools/quant_diagnostics.py average CKPT...     exact integer validation accuracy of each
      checkpoint and of the average of their latent parameters (stochastic weight averaging)

Both take best.pt, last.pt, snapshot.pt or an exported float_checkpoint.pt of the same spec.
"""

import argparse
import json
import sys

import torch

from nqe.model.contract import legal_codes
from nqe.model.data import load_cifar10, split_train_val
from nqe.model.train import evaluate_model, load_checkpoint


def threshold_share(model, band):
    """{layer: (weights within ``band`` steps of a threshold, weights that can change code)}."""
    shares = {}
    for conv in model.convs.values():
        if conv.bits == 1:
            continue
        top = max(legal_codes(conv.bits))
        magnitude = (conv.weight / conv.step).detach().abs().flatten()
        can_flip = magnitude < top + 0.5                 # past it the code stays the top one
        # The thresholds are the half-integers k + 0.5 between codes k and k + 1, k < top.
        near = can_flip & ((magnitude - magnitude.floor() - 0.5).abs() < band) & \
            (magnitude < top + 0.5 - band)
        shares[conv.layer.name] = (int(near.sum()), int(can_flip.sum()))
    return shares


def cmd_threshold(args):
    report = {}
    for path in args.checkpoints:
        model, _ = load_checkpoint(path)
        shares = threshold_share(model, args.band)
        near, total = (sum(v[i] for v in shares.values()) for i in (0, 1))
        report[path] = {"layers": {k: {"near": n, "weights": t} for k, (n, t) in shares.items()},
                        "near": near, "weights": total, "share": near / total}
        if not args.json:
            for name, (n, t) in shares.items():
                print(f"  {name:12s} {n:7,d} / {t:7,d}  {n / t:6.1%}")
            print(f"{path}: {near:,} of {total:,} weights ({near / total:.1%}) within "
                  f"{args.band} steps of a rounding threshold (uniform: about {2 * args.band:.0%})")
    if args.json:
        print(json.dumps({"band": args.band, "checkpoints": report}, indent=2))


def cmd_average(args):
    models, states, checkpoints = [], [], []
    for path in args.checkpoints:
        model, checkpoint = load_checkpoint(path)
        models.append(model)
        states.append(model.state_dict())
        checkpoints.append(checkpoint)
    specs = {json.dumps(c["spec"], sort_keys=True) for c in checkpoints}
    if len(specs) != 1:
        sys.exit("quant_diagnostics average: error: the checkpoints are of different specs")
    config = checkpoints[0].get("config") or {}
    data = load_cifar10(args.data)
    _, (vx, vy) = split_train_val(data.train_x, data.train_y, config.get("val_size", 5000),
                                  config.get("seed", 0))
    report = {"checkpoints": {}}
    for path, model in zip(args.checkpoints, models):
        report["checkpoints"][path], _ = evaluate_model(model, vx, vy, progress=False)
    # Integer buffers (frozen shifts, flags) must agree; only float tensors are averaged.
    average = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            average[key] = torch.stack([s[key] for s in states]).mean(0)
        elif all(torch.equal(s[key], value) for s in states):
            average[key] = value
        else:
            sys.exit(f"quant_diagnostics average: error: {key} differs between the checkpoints")
    models[0].load_state_dict(average)
    report["average"], _ = evaluate_model(models[0], vx, vy, progress=False)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    for path, accuracy in report["checkpoints"].items():
        print(f"{path}: validation {accuracy:.2%}")
    print(f"average of the {len(args.checkpoints)}: validation {report['average']:.2%}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("threshold", help="share of weights near a rounding threshold")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--band", type=float, default=0.05, help="half-width in steps (default 0.05)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_threshold)
    p = sub.add_parser("average", help="validation of checkpoints and of their average")
    p.add_argument("checkpoints", nargs="+", metavar="CKPT")
    p.add_argument("--data", metavar="PATH", help="CIFAR-10 folder (default: $NQE_DATA, else "
                                                  "../shared/data)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_average)
    args = parser.parse_args(argv)
    if args.command == "threshold" and not 0 < args.band < 0.5:
        parser.error(f"--band: must be between 0 and 0.5 steps, got {args.band}")
    torch.set_num_threads(1)
    args.func(args)


if __name__ == "__main__":
    main()

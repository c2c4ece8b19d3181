"""Small random network specs and random integer weights, drawn from a seed.

Used by the tests (fake-quant vs integer reference) and by the RTL co-simulation regression.
Every draw is a pure function of the seed, so a failure is replayed from the seed alone.
"""

import numpy as np

from . import contract
from .contract import Residual
from .integer_reference import IntegerLayer, IntegerNetwork
from .spec import BlockSpec, BottleneckSpec, Hardware, HeadSpec, NetworkSpec, StemSpec

__all__ = ["random_spec", "random_integer_network"]


def random_spec(seed, max_blocks=3):
    rng = np.random.default_rng(seed)
    pick = lambda values: values[int(rng.integers(len(values)))]   # noqa: E731
    size = pick([8, 12, 16])
    act = pick([1, 2, 3])
    channels = pick([4, 8, 12])
    stem = StemSpec(out_channels=channels, kernel=pick([1, 3]), stride=1,
                    weight_bits=pick([1, 2, 3]), act_bits=act)
    blocks = []
    bits = act
    for i in range(int(rng.integers(1, max_blocks + 1))):
        groups = pick([1, 2, 4])
        expand = groups * pick([1, 2, 3, 4])
        stride = pick([1, 1, 2]) if size // 2 ** sum(b.stride == 2 for b in blocks) >= 4 else 1
        acts = (pick([1, 2, 3]), pick([1, 2, 3]), pick([1, 2, 3]))
        residual = Residual.NONE
        # Stride-1 blocks mostly keep their width and take a residual, so that every residual
        # mode is common among the seeds; the others change width.
        keep = stride == 1 and rng.random() < 0.7
        out = channels if keep else pick([4, 8])
        if keep:
            residual = pick([Residual.ADD, Residual.MUX, Residual.OR])
            if residual is Residual.ADD:
                acts = acts[:2] + (bits,)
            elif residual is Residual.MUX:
                acts = acts[:2] + (int(rng.integers(1, bits + 1)),)
            else:
                if bits != 1:
                    residual = Residual.NONE
                else:
                    acts = acts[:2] + (1,)
        blocks.append(BlockSpec(name=f"b{i + 1}", expand=expand, out_channels=out,
                                groups=groups, stride=stride, residual=residual,
                                weight_bits=(pick([1, 2, 3]), pick([1, 2, 3]), pick([1, 2, 3])),
                                act_bits=acts, pw_groups=(1, 1),
                                shift_sharing=pick(["block", "layer"])))
        channels, bits = out, acts[2]
    bottleneck = BottleneckSpec(out_channels=pick([4, 8]), weight_bits=pick([1, 2, 3])) \
        if rng.random() < 0.4 else None
    return NetworkSpec(name=f"random-{seed}", stem=stem, blocks=tuple(blocks),
                       input_height=size, input_width=size, bottleneck=bottleneck,
                       head=HeadSpec(num_classes=pick([2, 5, 10]), weight_bits=pick([1, 2, 3])),
                       hardware=_hardware(pick([16, 24, 32, 48])),
                       budget_bits=1 << 20)


def _hardware(word_bits):
    return Hardware(weight_word_bits=word_bits, lanes=word_bits // 3)


def random_integer_network(spec, seed):
    """Random legal codes, biases and shifts for ``spec`` (for contract-level tests)."""
    rng = np.random.default_rng(seed)
    shifts = {}
    for group, members in spec.shift_groups().items():
        limit = min(spec.layer(m).max_shift for m in members)
        shifts[group] = int(rng.integers(0, min(limit, 6) + 1))
    layers = {}
    for layer in spec.layers():
        if not layer.has_weights:
            continue
        codes = rng.choice(contract.legal_codes(layer.weight_bits), size=layer.weight_shape)
        shift = shifts[layer.shift_group] if layer.has_bsn else 0
        lo, hi = layer.bias_bounds(shift)
        # Mostly biases near the useful middle, some at the extremes of the contract range.
        centre = rng.integers(-(1 << shift) * 2, (1 << shift) * 2 + 1, size=layer.out_channels)
        bias = np.clip(centre, lo, hi)
        edges = rng.random(layer.out_channels) < 0.1
        bias[edges] = rng.choice([lo, hi], size=int(edges.sum()))
        select = rng.random(layer.out_channels) < 0.5 if layer.residual is Residual.MUX else None
        layers[layer.name] = IntegerLayer(layer.name, codes.astype(np.int8),
                                          bias.astype(np.int64), select)
    return IntegerNetwork(spec, layers, shifts, {"name": spec.name, "seed": seed})

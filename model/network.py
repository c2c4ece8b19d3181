"""The PyTorch model built from a spec: a stack of :class:`~nqe.model.quant.QuantConv` layers."""

import math

import torch
from torch import nn

from .contract import Residual
from .quant import QuantConv, ShiftGroup
from .spec import LayerKind, load_spec

__all__ = ["NQENet"]


def _key(name):
    return name.replace(".", "_")


class NQENet(nn.Module):
    """Fake-quant network of a spec. Input: images as uint8 or integer-valued float, NCHW, 0..255.

    ``forward`` returns the integer-valued logits (float tensor); in eval mode they equal the
    integer reference's logits exactly. With a bottleneck and no head it returns the code bits.
    """

    def __init__(self, spec, batch_norm=False, quantizer="heq"):
        super().__init__()
        self.spec = load_spec(spec)
        layers = self.spec.layers()
        self.shift_groups = nn.ModuleDict()
        for group, members in self.spec.shift_groups().items():
            max_shift = min(self.spec.layer(m).max_shift for m in members)
            self.shift_groups[_key(group)] = ShiftGroup(max_shift)
        self.convs = nn.ModuleDict()
        for layer in layers:
            if layer.kind is LayerKind.POOL:
                continue
            group = self.shift_groups[_key(layer.shift_group)] if layer.has_bsn else None
            self.convs[_key(layer.name)] = QuantConv(layer, group, batch_norm=batch_norm,
                                                     quantizer=quantizer)
        # Loss-only temperature for the integer logits; not part of the integer model.
        self.log_temperature = nn.Parameter(torch.tensor(0.0))

    def conv(self, name):
        return self.convs[_key(name)]

    def forward(self, images, return_activations=False, calibrate=False):
        # Integer images of any dtype become float; every value stays an exact integer.
        x = images if images.is_floating_point() else images.float()
        activations = {}
        block_input = {}
        for layer in self.spec.layers():
            if layer.kind is LayerKind.POOL:
                x = x.sum(dim=(2, 3))
            else:
                if layer.kind is LayerKind.POINTWISE and layer.name.endswith(".pw1"):
                    block_input[layer.name] = x
                skip = block_input[layer.residual_source] if layer.residual is not \
                    Residual.NONE else None
                x = self.conv(layer.name)(x, skip=skip, calibrate=calibrate)
            if return_activations:
                activations[layer.name] = x
        return (x, activations) if return_activations else x

    @torch.no_grad()
    def calibrate(self, images):
        """Data-dependent initialization of shifts and biases from one batch (before training)."""
        was_training = self.training
        self.train()
        logits = self(images, calibrate=True)
        self.log_temperature.fill_(float(-torch.log(logits.std().clamp_min(1e-3) / 2)))
        self.train(was_training)

    def scaled_logits(self, logits):
        return logits * self.log_temperature.exp()

    def freeze_shifts(self):
        for group in self.shift_groups.values():
            group.freeze()

    @property
    def has_unfolded_norm(self):
        return any(conv.in_norm_phase for conv in self.convs.values())

    @torch.no_grad()
    def fold_batch_norm(self):
        """End of the BatchNorm phase: per-channel BN factors into the weights, offsets into the
        biases, and one BSN shift per shift group (the rounded mean of its layers' -log2 gains),
        frozen. Afterwards the training forward is the BSN one."""
        gains, set_biases = {}, []
        for conv in self.convs.values():
            if conv.in_norm_phase:
                gain, set_bias = conv.fold_norm()
                gains.setdefault(conv.shift_group, []).append(gain)
                set_biases.append(set_bias)
        for group, values in gains.items():
            group.observe(-sum(math.log2(g) for g in values) / len(values), reset=True)
            group.freeze()
        for set_bias in set_biases:
            set_bias()

    @property
    def shifts_frozen(self):
        return all(group.frozen for group in self.shift_groups.values())

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

    def forward(self, images, return_activations=False, calibrate=False, until=None):
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
            if layer.name == until:
                break
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
    def fold_batch_norm(self, images=None, batch_size=256):
        """End of the BatchNorm phase: per-channel BN factors into the weights, offsets into the
        biases, and one BSN shift per shift group, frozen. Afterwards the training forward is the
        BSN one.

        Without ``images`` every layer folds at once from the statistics the BatchNorm phase
        gathered, and a group's shift is the rounded mean of its layers' -log2 gains. With
        ``images`` (training images, NCHW) the layers fold one after the other in network order:
        before a layer folds, its BatchNorm statistics are measured again on those images through
        the layers already folded, so its gain and bias account for what the fold upstream did
        (each rounded shift scales a layer's output by up to 2**0.5, and the ternary re-quantization
        moves it too). A group's shift is then fixed when its first layer folds, from the mean
        gain of all its layers at that point.
        """
        if images is None:
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
            return
        was_training = self.training
        for layer in self.spec.layers():
            conv = self.convs[_key(layer.name)] if _key(layer.name) in self.convs else None
            if conv is None or not conv.in_norm_phase:
                continue
            self._measure_norm(conv, layer.name, images, batch_size)
            group = conv.shift_group
            if not group.frozen:
                members = [c for c in self.convs.values()
                           if c.shift_group is group and c.in_norm_phase]
                gains = [c.fold_gain() for c in members]
                group.observe(-sum(math.log2(g) for g in gains) / len(gains), reset=True)
                group.freeze()
            _, set_bias = conv.fold_norm()
            set_bias()
        self.train(was_training)

    def _measure_norm(self, conv, name, images, batch_size):
        """Replace ``conv``'s BatchNorm running statistics by their average over ``images``
        (training-mode forward up to that layer; nothing learns)."""
        norm, momentum = conv.norm, conv.norm.momentum
        norm.reset_running_stats()
        norm.momentum = None                  # cumulative average over the batches
        self.train()
        for start in range(0, len(images), batch_size):
            self(images[start:start + batch_size].float(), until=name)
        norm.momentum = momentum

    @property
    def shifts_frozen(self):
        return all(group.frozen for group in self.shift_groups.values())

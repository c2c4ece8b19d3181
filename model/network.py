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
            x = self._layer_forward(layer, x, block_input, calibrate)
            if return_activations:
                activations[layer.name] = x
            if layer.name == until:
                break
        return (x, activations) if return_activations else x

    def _layer_forward(self, layer, x, block_input, calibrate=False):
        """One layer of :meth:`forward`; ``block_input`` keeps the skip paths' sources."""
        if layer.kind is LayerKind.POOL:
            return x.sum(dim=(2, 3))
        if layer.kind is LayerKind.POINTWISE and layer.name.endswith(".pw1"):
            block_input[layer.name] = x
        skip = block_input[layer.residual_source] if layer.residual is not Residual.NONE \
            else None
        return self.conv(layer.name)(x, skip=skip, calibrate=calibrate)

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

    def oscillation_penalty(self):
        """Sum over the layers of :meth:`QuantConv.oscillation_penalty` (``--dampen``)."""
        return sum(conv.oscillation_penalty() for conv in self.convs.values())

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
        # Each batch's activations are kept between layers, so every layer runs once to
        # measure and once folded: the same arithmetic on the same batches as a forward from the
        # images up to each layer in turn, without its quadratic cost (folded layers' shift
        # groups are frozen, so running them leaves no state behind). Layers after the last one
        # to fold do not run: a training-mode forward would refresh their HEQ steps.
        was_training = self.training
        batches = [images[start:start + batch_size].float()
                   for start in range(0, len(images), batch_size)]
        block_inputs = [{} for _ in batches]
        to_fold = [layer.name for layer in self.spec.layers()
                   if _key(layer.name) in self.convs and self.conv(layer.name).in_norm_phase]
        for layer in self.spec.layers() if to_fold else ():
            self.train()                # the training-mode forward of a BatchNorm phase step
            if layer.name == to_fold[0]:
                conv = self.conv(layer.name)
                self._measure_norm(layer, conv, batches, block_inputs)
                self._fold_measured(conv)
                to_fold.pop(0)
                if not to_fold:
                    break
            batches = [self._layer_forward(layer, x, block_input)
                       for x, block_input in zip(batches, block_inputs)]
        self.train(was_training)

    def _fold_measured(self, conv):
        """Fold one layer whose BatchNorm statistics were just measured; its shift group's shift
        is fixed by its first layer to fold."""
        group = conv.shift_group
        if not group.frozen:
            members = [c for c in self.convs.values()
                       if c.shift_group is group and c.in_norm_phase]
            gains = [c.fold_gain() for c in members]
            group.observe(-sum(math.log2(g) for g in gains) / len(gains), reset=True)
            group.freeze()
        _, set_bias = conv.fold_norm()
        set_bias()

    @torch.no_grad()
    def warm_start(self, source, images, batch_size=256):
        """Start this network's BatchNorm phase from a trained network ``source`` of another spec
        with the same layers and weight shapes (e.g. wider activations): the source's weights,
        and each BatchNorm set so that, on ``images``, the layer computes what the source's BSN
        layer computed, rescaled to this layer's output range.

        Source layer: ``(acc + b) / 2**k`` with accumulator statistics (mean m, std s) measured on
        ``images``; this layer's BatchNorm gets ``gamma = r * s / 2**k`` and
        ``beta = r * (m + b) / 2**k``, ``r = (2**n_new - 1) / (2**n_source - 1)``. Its input may
        itself be rescaled upstream; BatchNorm's own normalization absorbs that. Running
        statistics are then measured once through the whole network. The shifts stay free (the
        fold sets them).
        """
        if not all(conv.norm is not None for conv in self.convs.values()
                   if conv.layer.has_bsn):
            raise ValueError("warm_start needs a network built with batch_norm=True")
        mine, theirs = self.state_dict(), source.state_dict()
        for layer in self.spec.layers():
            key = _key(layer.name)
            if layer.kind is LayerKind.POOL:
                continue
            if key not in source.convs:
                raise ValueError(f"warm start: layer {layer.name!r} has no counterpart in the "
                                 f"source network {source.spec.name!r}")
            for field in ("weight", "bias"):
                want, have = mine[f"convs.{key}.{field}"].shape, theirs[f"convs.{key}.{field}"].shape
                if want != have:
                    raise ValueError(f"warm start: layer {layer.name!r} {field} shape "
                                     f"{tuple(want)} in spec {self.spec.name!r}, "
                                     f"{tuple(have)} in the source spec {source.spec.name!r}")
        if source.has_unfolded_norm:
            raise ValueError("warm start: the source network is still in its BatchNorm phase; "
                             "start from a folded (BSN) checkpoint")

        # The source's accumulator statistics per BSN layer, in its exact integer forward.
        sums, hooks = {}, []
        for key, conv in source.convs.items():
            if not conv.layer.has_bsn:
                continue

            def hook(module, args, key=key):
                acc = module.accumulate(args[0]).double()
                total = sums.setdefault(key, [0.0, 0.0, 0])
                total[0] = total[0] + acc.sum(dim=(0, 2, 3))
                total[1] = total[1] + (acc * acc).sum(dim=(0, 2, 3))
                total[2] += acc.numel() // acc.shape[1]
            hooks.append(conv.register_forward_pre_hook(hook))
        was_training = source.training
        source.eval()
        try:
            for start in range(0, len(images), batch_size):
                source(images[start:start + batch_size].float())
        finally:
            for handle in hooks:
                handle.remove()
            source.train(was_training)

        for key, conv in self.convs.items():
            theirs_conv = source.convs[key]
            conv.weight.copy_(theirs_conv.weight)
            conv.step.copy_(theirs_conv.step)
            if conv.select_gate is not None and theirs_conv.select_gate is not None:
                conv.select_gate.copy_(theirs_conv.select_gate)
            if not conv.layer.has_bsn:          # the classifier: integer bias kept as it was
                conv.bias.copy_(theirs_conv.bias)
                conv.bias_scale_log2.copy_(theirs_conv.bias_scale_log2)
                conv.calibrated.copy_(theirs_conv.calibrated)
                continue
            total, sq, count = sums[key]
            mean = total / count
            std = (sq / count - mean * mean).clamp_min(0).sqrt()
            ratio = ((1 << conv.layer.out_bits) - 1) / ((1 << theirs_conv.layer.out_bits) - 1)
            scale = ratio / 2.0 ** theirs_conv.shift
            conv.norm.weight.copy_((std * scale).float())
            conv.norm.bias.copy_(((mean + theirs_conv.bias_codes().double()) * scale).float())
            conv.calibrated.fill_(True)
        self.log_temperature.copy_(source.log_temperature)

        norms = [conv.norm for conv in self.convs.values() if conv.norm is not None]
        momenta = [norm.momentum for norm in norms]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None              # cumulative average over the batches
        was_training = self.training
        self.train()
        for start in range(0, len(images), batch_size):
            self(images[start:start + batch_size].float())
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        self.train(was_training)

    def _measure_norm(self, layer, conv, batches, block_inputs):
        """Replace ``conv``'s BatchNorm running statistics by their average over the batches of
        its input (a training-mode forward of that layer; its output is not kept)."""
        norm, momentum = conv.norm, conv.norm.momentum
        norm.reset_running_stats()
        norm.momentum = None                  # cumulative average over the batches
        for x, block_input in zip(batches, block_inputs):
            self._layer_forward(layer, x, block_input)
        norm.momentum = momentum

    @property
    def shifts_frozen(self):
        return all(group.frozen for group in self.shift_groups.values())

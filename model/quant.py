"""Training-time quantized modules whose eval-mode forward *is* the integer contract.

Values between layers are integer-valued float tensors: activations are the unsigned codes
0..2**n-1 (HWMSB), weights are the signed codes of the HEQ quantizer, accumulators are exact sums.
Every intermediate value is an integer below 2**24 in magnitude (the spec's accumulator bounds), so
fp32 convolution, addition, power-of-two division and floor are exact, and the eval-mode forward
computes exactly what :mod:`nqe.model.contract` says. Export reads the codes, biases and shifts
off these modules; nothing is re-quantized.

Training uses straight-through estimators around the same operations (DESIGN.md, "Quantization
training"):

* HEQ: one step size per layer, set (no gradient) so that every level is used equally often:
  thresholds at the quantiles of |w|, step fitted by least squares; weights are real proxies kept
  in [-1, 1].
* BSN: ``y = floor((acc + b) / 2**k)`` with a per-channel bias learned in output units and one
  shift ``k`` per shift group, chosen from a running estimate of the accumulator's spread and
  frozen before export.
* HWMSB: ``clamp(y, 0, 2**n - 1)`` with the clipped straight-through gradient.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .contract import Residual, legal_codes
from .spec import LayerKind

__all__ = ["heq_step", "minmax_step", "STEP_METHODS", "heq_codes", "ShiftGroup", "QuantConv",
           "EXACT_LIMIT"]

EXACT_LIMIT = 1 << 24   # fp32 represents every integer below this exactly


def heq_step(weight, bits):
    """HEQ step size: levels of a linear symmetric quantizer used equally often."""
    a = weight.detach().abs().flatten().float()
    if bits == 3:        # 5 levels: P(|w| < s/2) = 1/5, P(|w| < 3s/2) = 3/5
        q = torch.quantile(a, torch.tensor([0.2, 0.6], device=a.device))
        step = (0.5 * q[0] + 1.5 * q[1]) / (0.5 ** 2 + 1.5 ** 2)
    elif bits == 2:      # 3 levels: P(|w| < s/2) = 1/3
        step = 2.0 * torch.quantile(a, 1.0 / 3.0)
    elif bits == 1:      # sign: both levels equally used for a symmetric distribution
        step = a.mean()
    else:
        raise ValueError(f"unsupported weight width {bits}")
    return step.clamp_min(1e-8)


def minmax_step(weight, bits):
    """Plain min-max step (the ablation baseline of HEQ): the largest |w| on the top level."""
    a = weight.detach().abs()
    if bits == 1:
        return a.mean().clamp_min(1e-8)
    return (a.max() / max(legal_codes(bits))).clamp_min(1e-8)


STEP_METHODS = {"heq": heq_step, "minmax": minmax_step}


def heq_codes(weight, step, bits):
    """Integer weight codes of the contract (legal_codes(bits)) for real weights and a step."""
    if bits == 1:
        return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)
    top = max(legal_codes(bits))
    return torch.clamp(torch.round(weight / step), -top, top)


def _ste(real, quantized, training):
    """Forward ``quantized``, backward identity to ``real`` (exact values outside training)."""
    if not training:
        return quantized.detach()
    return real + (quantized - real).detach()


class _FloorAddClamp(torch.autograd.Function):
    """``clamp(floor(real) + skip, 0, top)`` with the straight-through floor of training
    (``skip`` may be None).

    The same values and gradients, bit for bit, as ``torch.clamp(_ste(real, floor(real)) + skip,
    0, top)``, in four passes over the activations instead of nine: a training step on the CPU
    is bound by memory traffic over these, its largest tensors. Every ``y = floor(real) + skip``
    is an integer, so the clamp's inclusive range [0, top] is hardtanh's open (-0.5, top + 0.5),
    whose backward is one pass over the gradient and ``y`` (clamp's backward compares twice,
    combines and selects, each a pass, the boolean ones slow on the CPU).
    """

    @staticmethod
    def forward(ctx, real, skip, top):
        y = torch.floor(real)
        if skip is not None:
            y.add_(skip)
        ctx.save_for_backward(y)
        ctx.top = top
        ctx.has_skip = skip is not None
        return y.clamp(0.0, top)

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        grad_real = torch.ops.aten.hardtanh_backward(grad, y, -0.5, ctx.top + 0.5)
        return grad_real, (grad_real if ctx.has_skip else None), None


class ShiftGroup(nn.Module):
    """One BSN shift shared by several layers (layer-shared BSN).

    While training and not frozen, each member reports the shift it would like (log2 of its
    accumulator spread over its target spread); the group keeps a running mean and rounds it.
    ``freeze()`` fixes the shift; export requires it frozen.
    """

    def __init__(self, max_shift, momentum=0.05):
        super().__init__()
        self.max_shift = max_shift
        self.momentum = momentum
        self.register_buffer("desired", torch.tensor(float("nan")))
        self.register_buffer("frozen_shift", torch.tensor(-1, dtype=torch.long))

    @property
    def frozen(self):
        return int(self.frozen_shift) >= 0

    def observe(self, desired, reset=False):
        if self.frozen:
            return
        if reset or torch.isnan(self.desired):
            self.desired.fill_(desired)
        else:
            self.desired.mul_(1 - self.momentum).add_(self.momentum * desired)

    @property
    def shift(self):
        if self.frozen:
            return int(self.frozen_shift)
        if torch.isnan(self.desired):
            return 0
        return int(min(max(round(float(self.desired)), 0), self.max_shift))

    def freeze(self):
        self.frozen_shift.fill_(self.shift)


class QuantConv(nn.Module):
    """One layer of the spec (stem, pointwise, group-wise, bottleneck or classifier).

    forward(x, skip=None) takes integer-valued activations and returns the layer's integer-valued
    output: activations 0..2**out_bits-1, or the classifier's signed logits.
    """

    # Training computes the activation with _FloorAddClamp (same values and gradients as the
    # unfused operations, which `nqe bench-train` times it against).
    fuse_activation = True

    def __init__(self, layer, shift_group=None, batch_norm=False, quantizer="heq"):
        super().__init__()
        if quantizer not in STEP_METHODS:
            raise ValueError(f"layer {layer.name!r}: unknown weight quantizer {quantizer!r} "
                             f"(expected one of {sorted(STEP_METHODS)})")
        self.step_method = STEP_METHODS[quantizer]
        self.layer = layer
        self.bits = layer.weight_bits
        self.is_classifier = layer.kind is LayerKind.CLASSIFIER
        self.weight = nn.Parameter(torch.empty(layer.weight_shape))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        with torch.no_grad():
            self.weight.div_(self.weight.abs().max()).mul_(0.9)
        self.bias = nn.Parameter(torch.zeros(layer.out_channels))
        self.register_buffer("step", self.step_method(self.weight, self.bits))
        self.shift_group = shift_group
        # The classifier has no BSN; its bias is learned in units of 2**bias_scale_log2 (set at
        # calibration from the logits' spread) so that Adam's step sizes suit it.
        self.register_buffer("bias_scale_log2", torch.tensor(0, dtype=torch.long))
        self.register_buffer("calibrated", torch.tensor(False))
        # Float BatchNorm for the first phase of training only (``fold_batch_norm`` turns it
        # into BSN's bias and shift); never part of the integer model.
        self.norm = None
        if batch_norm and layer.has_bsn:
            self.norm = nn.BatchNorm2d(layer.out_channels)
            nn.init.constant_(self.norm.weight, ((1 << layer.out_bits) - 1) / 2)
            nn.init.constant_(self.norm.bias, ((1 << layer.out_bits) - 1) / 3)
        self.register_buffer("norm_folded", torch.tensor(False))
        if layer.residual is Residual.MUX:
            self.select_gate = nn.Parameter(torch.full((layer.out_channels,), -1.0))
        else:
            self.select_gate = None
        if layer.acc_bound + max(abs(b) for b in layer.bias_bounds(layer.max_shift)) >= \
                EXACT_LIMIT:
            raise ValueError(f"layer {layer.name!r}: accumulator bound {layer.acc_bound} is too "
                             f"large for exact fp32 evaluation")

    # -- quantized parameters (what export reads) ---------------------------------------------

    def codes(self):
        """Integer weight codes, as a float tensor; straight-through to the weights in training."""
        if self.training:
            with torch.no_grad():
                self.step.copy_(self.step_method(self.weight, self.bits))
        u = self.weight / self.step
        codes = heq_codes(self.weight, self.step, self.bits)
        if not self.training:
            return codes.detach()
        reach = max(legal_codes(self.bits)) + 0.5
        return codes.detach() + (u - u.detach()) * (u.detach().abs() <= reach)

    def oscillation_penalty(self):
        """Mean squared distance of the latent weights from their codes, in steps (0 on a code).

        Weights that sit on a rounding threshold flip code back and forth between steps (weight
        oscillation, Nagel et al. 2022); this term pulls them to the middle of their bin
        (oscillation dampening). Sign (1-bit) weights have no bin middle and add nothing."""
        if self.bits == 1:
            return self.weight.new_zeros(())
        u = self.weight / self.step
        codes = heq_codes(self.weight.detach(), self.step, self.bits)
        inside = u.detach().abs() <= max(legal_codes(self.bits)) + 0.5   # past it: no threshold
        return ((u - codes) ** 2 * inside).mean()

    @property
    def shift(self):
        return self.shift_group.shift if self.shift_group is not None else 0

    def bias_codes(self):
        """Integer biases of the contract (clamped into its exact-equivalence range)."""
        scale = 2.0 ** (self.shift if not self.is_classifier else int(self.bias_scale_log2))
        real = self.bias * scale
        lo, hi = self.layer.bias_bounds(self.shift)
        return torch.clamp(_ste(real, torch.floor(real), self.training), lo, hi)

    def select(self):
        """MUX residual: 1 where the channel passes the skip path."""
        hard = (self.select_gate > 0).float()
        return _ste(torch.sigmoid(self.select_gate), hard, self.training)

    # -- forward ----------------------------------------------------------------------------

    def accumulate(self, x):
        layer = self.layer
        weight = self.codes()
        # Under bf16 autocast a convolution's result keeps 8 significant bits, so an accumulator
        # past 256 is rounded and the floor after the shift moves. Only the BatchNorm phase may
        # round (its float BatchNorm is not the deployed arithmetic); a folded layer and the
        # classifier accumulate in fp32, exact for these small integers, as the contract does.
        exact = self.is_classifier or not self.in_norm_phase
        with torch.autocast(x.device.type, enabled=not exact and
                            torch.is_autocast_enabled(x.device.type)):
            if exact:
                x = x.float()
            if self.is_classifier:
                return F.linear(x, weight.reshape(layer.out_channels, -1).to(x.dtype)).float()
            return F.conv2d(x, weight.to(x.dtype), stride=layer.stride, padding=layer.padding,
                            groups=layer.groups).float()

    def forward(self, x, skip=None, calibrate=False):
        layer = self.layer
        acc = self.accumulate(x)
        if calibrate:
            self._calibrate(acc)
        if self.is_classifier:
            return acc + self.bias_codes()
        in_norm_phase = self.in_norm_phase
        if self.training and self.shift_group is not None and not in_norm_phase:
            top = (1 << layer.out_bits) - 1
            spread = acc.detach().float().std().clamp_min(1e-3)
            self.shift_group.observe(float(torch.log2(spread / (top / 2))))
        if in_norm_phase:
            real = self.norm(acc)
        else:
            bias = self.bias_codes().view(1, -1, 1, 1)
            real = (acc + bias) / 2.0 ** self.shift
        top = float((1 << layer.out_bits) - 1)
        if self.training and self.fuse_activation and \
                layer.residual in (Residual.NONE, Residual.ADD):
            return _FloorAddClamp.apply(real, skip, top)
        y = _ste(real, torch.floor(real), self.training)
        if layer.residual is Residual.ADD:
            return torch.clamp(y + skip, 0.0, top)
        if layer.residual is Residual.MUX:
            rescaled = torch.floor(skip / 2.0 ** (layer.skip_bits - layer.out_bits))
            sel = self.select().view(1, -1, 1, 1)
            return sel * rescaled + (1 - sel) * torch.clamp(y, 0.0, top)
        if layer.residual is Residual.OR:
            return torch.maximum(torch.clamp(y, 0.0, 1.0), skip)
        return torch.clamp(y, 0.0, top)

    @property
    def in_norm_phase(self):
        """Whether the forward still uses the float BatchNorm (not yet folded into BSN)."""
        return self.norm is not None and not bool(self.norm_folded)

    def _norm_factor(self):
        norm = self.norm
        a = norm.weight / torch.sqrt(norm.running_var + norm.eps)
        return a, a.abs().max().clamp_min(1e-12)

    @torch.no_grad()
    def fold_gain(self):
        """The gain ``fold_norm`` would leave with the current statistics, without folding."""
        a, scale = self._norm_factor()
        scaled = self.weight * (a / scale).view(-1, *([1] * (self.weight.dim() - 1)))
        return float(scale * self.step_method(scaled, self.bits) /
                     self.step_method(self.weight, self.bits))

    @torch.no_grad()
    def fold_norm(self):
        """Fold the BatchNorm's per-channel factor into the real weights; returns the layer's
        gain and a function that sets the BSN bias once the shift is known.

        BatchNorm computes ``a_c * acc + d_c`` per channel. The per-channel factor ``a_c`` moves
        into the real weights (scaled by max |a_c| to stay in [-1, 1]) before HEQ quantizes them
        again; what is left is one gain per layer, ``G = A * s' / s`` (output units per unit of
        the new accumulator), which BSN rounds to ``2**-shift``. The bias then gives each channel
        the BatchNorm's pre-activation mean.
        """
        norm = self.norm
        a, scale = self._norm_factor()
        step = self.step_method(self.weight, self.bits)
        self.weight.mul_((a / scale).view(-1, *([1] * (self.weight.dim() - 1))))
        self.step.copy_(self.step_method(self.weight, self.bits))
        # Mean of the new accumulator per channel, from the BN's running mean of the old one.
        new_mean = norm.running_mean * a * step / (scale * self.step)
        beta = norm.bias.detach().clone()

        def set_bias():
            self.bias.copy_(beta - new_mean / 2.0 ** self.shift)
            self.norm_folded.fill_(True)
        return float(scale * self.step / step), set_bias

    @torch.no_grad()
    def _calibrate(self, acc):
        """Data-dependent init (first batch): shift from the spread, bias centring each channel."""
        layer = self.layer
        if self.is_classifier:
            self.bias_scale_log2.fill_(max(0, round(math.log2(max(float(acc.std()), 1.0)))))
            self.bias.zero_()
            self.calibrated.fill_(True)
            return
        top = (1 << layer.out_bits) - 1
        spread = float(acc.std().clamp_min(1e-3))
        self.shift_group.observe(math.log2(spread / (top / 2)))
        mean = acc.mean(dim=(0, 2, 3))
        self.bias.copy_(top / 3 - mean / 2.0 ** self.shift)
        self.calibrated.fill_(True)

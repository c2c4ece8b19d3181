"""The bit-exact integer reference, in numpy, vectorized over a batch.

Given exported weights (:class:`IntegerNetwork`, as :func:`nqe.model.weights_io.load_weights`
returns it) it computes every layer with the operations of :mod:`nqe.model.contract` and returns
the logits (and, on request, every layer's output).

Convolutions are matrix products over im2col patches. They run through BLAS in floating point,
which is exact here: every operand and every partial sum is an integer whose magnitude is at most
the layer's accumulator bound, and the float type is chosen so that the bound is below its
integer-exact limit (2**24 for float32, 2**53 for float64). The result is converted back to int64
and checked against the bound, so an overflow cannot go unnoticed.
"""

from dataclasses import dataclass, field

import numpy as np

from . import contract
from .contract import Residual
from .spec import LayerKind

__all__ = ["IntegerLayer", "IntegerNetwork", "conv_int", "run_reference", "predict"]


@dataclass(frozen=True)
class IntegerLayer:
    name: str
    codes: np.ndarray            # int8, OIHW weight codes
    bias: np.ndarray             # int64 [out_channels]
    select: np.ndarray | None = None    # bool [out_channels] for a mux residual


@dataclass(frozen=True)
class IntegerNetwork:
    spec: object                 # NetworkSpec
    layers: dict                 # layer name -> IntegerLayer
    shifts: dict                 # shift group -> int
    meta: dict = field(default_factory=dict)

    def shift_of(self, layer):
        return self.shifts[layer.shift_group] if layer.has_bsn else 0


def _exact_float(bound):
    if bound < 1 << 24:
        return np.float32
    if bound < 1 << 53:
        return np.float64
    raise contract.ContractError(f"accumulator bound {bound} exceeds exact float64 arithmetic")


def conv_int(x, codes, stride, padding, groups, acc_bound):
    """Exact integer convolution: x int [N, C, H, W], codes int [O, C/groups, k, k] -> int64.

    The k*k shifted views of the input are stacked next to the channels, so each group's
    patches are one contiguous [C/groups * k * k, H*W] matrix per image, and one broadcast
    matrix product (weights [G, O/G, C/G*k*k] @ patches [N, G, C/G*k*k, H*W]) gives the output
    already in [N, O, H, W] order: no im2col transpose of the patches.
    """
    dtype = _exact_float(acc_bound)
    n, c, h, w = x.shape
    o, cg, k, _ = codes.shape
    weights = codes.astype(dtype).reshape(groups, o // groups, cg * k * k)
    xf = x.astype(dtype)
    if padding:
        xf = np.pad(xf, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    if k == 1:
        cols = np.ascontiguousarray(xf[:, :, ::stride, ::stride])
    else:
        cols = np.stack([xf[:, :, dy:dy + stride * (ho - 1) + 1:stride,
                            dx:dx + stride * (wo - 1) + 1:stride]
                         for dy in range(k) for dx in range(k)], axis=2)   # N, C, k*k, Ho, Wo
    out = np.matmul(weights, cols.reshape(n, groups, cg * k * k, ho * wo))  # N, G, O/G, HoWo
    acc = out.reshape(n, o, ho, wo).astype(np.int64)
    if acc.size and np.abs(acc).max() > acc_bound:
        raise contract.ContractError(f"accumulator {np.abs(acc).max()} exceeds its bound "
                                     f"{acc_bound}")
    return acc


def _as_nchw(images, spec):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise contract.ContractError(f"images must be uint8, got {images.dtype}")
    shape_nhwc = (spec.input_height, spec.input_width, spec.input_channels)
    if images.ndim == 4 and images.shape[1:] == shape_nhwc:
        return images.transpose(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1:] == (spec.input_channels,) + shape_nhwc[:2]:
        return images
    raise contract.ContractError(f"images must be [N, {spec.input_height}, {spec.input_width}, "
                                 f"{spec.input_channels}] (NHWC) or NCHW uint8, got "
                                 f"{list(images.shape)}")


def _forward(net, x, return_activations):
    activations = {}
    block_input = {}
    for layer in net.spec.layers():
        if layer.kind is LayerKind.POOL:
            x = contract.sum_pool(x)
        else:
            params = net.layers[layer.name]
            if layer.kind is LayerKind.POINTWISE and layer.name.endswith(".pw1"):
                block_input[layer.name] = x
            if layer.kind is LayerKind.CLASSIFIER:
                acc = conv_int(x[:, :, None, None], params.codes, 1, 0, 1, layer.acc_bound)
                x = acc[:, :, 0, 0] + params.bias
            else:
                acc = conv_int(x, params.codes, layer.stride, layer.padding, layer.groups,
                               layer.acc_bound)
                y = contract.bsn(acc, params.bias.reshape(1, -1, 1, 1), net.shift_of(layer))
                if layer.residual is Residual.ADD:
                    x = contract.residual_add(y, block_input[layer.residual_source],
                                              layer.out_bits)
                elif layer.residual is Residual.MUX:
                    x = contract.residual_mux(y, block_input[layer.residual_source],
                                              params.select, layer.out_bits, layer.skip_bits)
                elif layer.residual is Residual.OR:
                    x = contract.residual_or(y, block_input[layer.residual_source])
                else:
                    x = contract.hwmsb(y, layer.out_bits)
                x = x.astype(np.uint8)
        if return_activations:
            activations[layer.name] = x
    return x, activations


def run_reference(net, images, return_activations=False, batch_size=16):
    """Logits (int64 [N, classes]; the bottleneck's code bits when the spec has no head).

    With ``return_activations`` also returns {layer name: output array} over the whole batch.
    """
    x_all = _as_nchw(images, net.spec)
    outputs, per_layer = [], {}
    for start in range(0, max(len(x_all), 1), batch_size):
        out, acts = _forward(net, x_all[start:start + batch_size], return_activations)
        outputs.append(out)
        for name, value in acts.items():
            per_layer.setdefault(name, []).append(value)
    logits = np.concatenate(outputs)
    if return_activations:
        return logits, {name: np.concatenate(v) for name, v in per_layer.items()}
    return logits


def predict(net, images, batch_size=16):
    """Class indices (argmax, lowest index on a tie)."""
    return contract.argmax_lowest(run_reference(net, images, batch_size=batch_size))

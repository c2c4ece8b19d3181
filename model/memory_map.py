"""Spec -> on-chip memory map and scheduler descriptor table.

Each step is a small pass with one job (FINN style); the budget, the weights exporter and the RTL
generator all read the result, so an address or a bank size is computed in exactly one place.

Memories of the layer-sequential engine:

* weight SRAM: words of ``hardware.weight_word_bits``; each layer's codes packed contiguously
  (contract.pack_codes, C order of the OIHW weight array) from its own word-aligned base address.
* bias SRAM: one bias a word, words as wide as the widest layer's bias.
* shift table: one BSN shift per shift group (layer-shared BSN).
* mux-select SRAM: one bit per output channel of each ``mux`` residual layer.
* activation banks A and B (ping-pong): layer ``i`` reads bank ``i % 2`` and writes the other;
  the 8-bit image is loaded into bank A. Each bank is as large as the largest map placed in it.
* residual bank R: holds a residual block's input while the block runs.
* descriptor table: one descriptor per layer, fields as wide as their largest value in this spec.
"""

from dataclasses import dataclass

from . import contract
from .spec import LayerKind, Residual

__all__ = ["LayerPlacement", "MemoryMap", "DESCRIPTOR_FIELDS", "build_memory_map",
           "weight_stream", "weights_from_stream", "weight_stream_length"]

DESCRIPTOR_FIELDS = ("kind", "in_channels", "out_channels", "groups", "kernel", "stride",
                     "in_height", "in_width", "in_bits", "out_bits", "weight_bits",
                     "shift_index", "residual", "weight_base", "bias_base", "in_bank",
                     "out_bank")

def weight_stream_length(layer, hardware):
    """Number of codes (padding included) a layer's weight stream holds in SRAM."""
    return layer.weight_count


def weight_stream(codes, layer, hardware):
    """A layer's OIHW codes in the order the engine reads them from weight SRAM (1-D).

    This is the one definition of that order: the exporter packs this stream and the RTL walks
    it. Today it is the OIHW C order, unpadded.
    """
    import numpy as np
    return np.asarray(codes).reshape(-1)


def weights_from_stream(stream, layer, hardware):
    """Inverse of :func:`weight_stream`: OIHW codes from the SRAM-ordered stream."""
    import numpy as np
    return np.asarray(stream).reshape(layer.weight_shape)


_KIND_CODES = {kind: i for i, kind in enumerate(LayerKind)}
_RESIDUAL_CODES = {mode: i for i, mode in enumerate(Residual)}


@dataclass(frozen=True)
class LayerPlacement:
    name: str
    weight_base: int     # first weight word
    weight_words: int
    bias_base: int       # first bias word
    bias_words: int
    shift_index: int     # entry of the shift table, -1 without BSN
    select_base: int     # first mux-select bit, -1 without mux
    in_bank: int         # 0 = A, 1 = B
    out_bank: int


@dataclass(frozen=True)
class MemoryMap:
    weight_word_bits: int
    weight_words: int
    bias_word_bits: int
    bias_words: int
    shift_bits: int
    shift_entries: int
    select_bits: int
    bank_bits: tuple          # (A, B) capacity in bits
    residual_bits: int
    descriptor_widths: dict   # field -> bits
    placements: tuple         # LayerPlacement per layer, in spec order

    @property
    def descriptor_bits(self):
        return sum(self.descriptor_widths.values())

    @property
    def descriptor_table_bits(self):
        return self.descriptor_bits * len(self.placements)

    def placement(self, name):
        for p in self.placements:
            if p.name == name:
                return p
        raise KeyError(name)

    def descriptors(self, spec):
        """The descriptor table as a list of dicts, field -> value (the scheduler's program)."""
        rows = []
        for layer, p in zip(spec.layers(), self.placements):
            rows.append(_descriptor(layer, p))
        return rows


def _descriptor(layer, p):
    return {
        "kind": _KIND_CODES[layer.kind], "in_channels": layer.in_channels,
        "out_channels": layer.out_channels, "groups": layer.groups, "kernel": layer.kernel,
        "stride": layer.stride, "in_height": layer.in_height, "in_width": layer.in_width,
        "in_bits": layer.in_bits, "out_bits": layer.out_bits, "weight_bits": layer.weight_bits,
        "shift_index": max(p.shift_index, 0), "residual": _RESIDUAL_CODES[layer.residual],
        "weight_base": p.weight_base, "bias_base": p.bias_base, "in_bank": p.in_bank,
        "out_bank": p.out_bank,
    }


def build_memory_map(spec):
    cached = spec.__dict__.get("_memory_map")
    if cached is not None:
        return cached
    layers = spec.layers()
    word_bits = spec.hardware.weight_word_bits
    groups = list(spec.shift_groups())
    placements = []
    weight_base = bias_base = select_base = 0
    bank_bits = [0, 0]
    residual_bits = 0
    bank_bits[0] = layers[0].in_fmap_bits
    for layer in layers:
        words = (contract.packed_words(weight_stream_length(layer, spec.hardware),
                                       layer.weight_bits, word_bits)
                 if layer.has_weights else 0)
        biases = layer.out_channels if layer.has_weights else 0
        is_mux = layer.residual is Residual.MUX
        in_bank, out_bank = layer.index % 2, (layer.index + 1) % 2
        placements.append(LayerPlacement(
            layer.name, weight_base, words, bias_base, biases,
            groups.index(layer.shift_group) if layer.has_bsn else -1,
            select_base if is_mux else -1, in_bank, out_bank))
        weight_base += words
        bias_base += biases
        select_base += layer.out_channels if is_mux else 0
        bank_bits[in_bank] = max(bank_bits[in_bank], layer.in_fmap_bits)
        bank_bits[out_bank] = max(bank_bits[out_bank], layer.out_fmap_bits)
        if layer.residual is not Residual.NONE:
            skip_bits = layer.out_channels * layer.out_height * layer.out_width * layer.skip_bits
            residual_bits = max(residual_bits, skip_bits)
    with_bias = [layer for layer in layers if layer.has_weights]
    bias_word_bits = max((layer.bias_bits for layer in with_bias), default=0)
    shift_bits = max((contract.unsigned_bits(layer.max_shift) for layer in layers
                      if layer.has_bsn), default=0)
    provisional = [_descriptor(layer, p) for layer, p in zip(layers, placements)]
    widths = {field: contract.unsigned_bits(max(row[field] for row in provisional))
              for field in DESCRIPTOR_FIELDS}
    memory_map = MemoryMap(word_bits, weight_base, bias_word_bits, bias_base, shift_bits,
                           len(groups), select_base, tuple(bank_bits), residual_bits, widths,
                           tuple(placements))
    object.__setattr__(spec, "_memory_map", memory_map)
    return memory_map

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

Activation bank word layout (what the RTL engine reads and writes): words of ``act_word_bits``
(a power of two); an activation of ``b`` bits sits in a slot of ``act_slot_bits(b)`` bits (the next
power of two: 1, 2, 4, 8, 16, ...), ``act_word_bits // slot`` slots a word, the first element in the
least significant slot. Elements are in HWC order (channels fastest): element ``(c, y, x)`` of a
``C x H x W`` map is number ``e = (y * W + x) * C + c``, at word ``e >> elems_log2`` and slot
``e & (2**elems_log2 - 1)``. Every map starts at word 0 of its bank. HWC is the order the engine
writes outputs in (pixel by pixel, all channels of a pixel), so output writes are sequential.
Slots cost nothing for 1-, 2- and 8-bit maps; a 3-bit map takes 4-bit slots.
"""

from dataclasses import dataclass

from . import contract
from .spec import LayerKind, Residual

__all__ = ["LayerPlacement", "MemoryMap", "DESCRIPTOR_FIELDS", "build_memory_map",
           "act_slot_bits", "stored_bits", "LANE_ACT_BITS",
           "weight_stream", "weights_from_stream", "weight_stream_length"]

DESCRIPTOR_FIELDS = ("kind", "in_channels", "out_channels", "groups", "kernel", "stride",
                     "in_height", "in_width", "in_bits", "out_bits", "weight_bits",
                     "shift_index", "residual", "weight_base", "bias_base", "in_bank",
                     "out_bank",
                     # scheduler fields (loop nest of the RTL engine, see rtl/scheduler.py)
                     "kernel_h", "kernel_w", "padding", "out_height", "out_width",
                     "in_group_channels", "out_group_channels", "fan_in", "mac_weight_bits",
                     "codes_per_word", "fan_in_words", "fan_in_rem", "digits",
                     "in_elems_log2", "out_elems_log2", "in_slot_log2", "out_slot_log2",
                     "save_residual", "skip_bits", "skip_elems_log2", "skip_slot_log2",
                     "select_base", "is_last", "outputs")

LANE_ACT_BITS = 3   # activation bits a MAC lane takes a cycle (wider ones are digit-serial)

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
    act_word_bits: int = 0    # activation bank word (see the module docstring)
    bank_words: tuple = (0, 0)   # (A, B) depth in act words, slot-packed
    residual_words: int = 0   # residual bank R depth in act words

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
        layers = spec.layers()
        for layer, p in zip(layers, self.placements):
            rows.append(_descriptor(layer, p, layers, self.weight_word_bits, self.act_word_bits))
        return rows


def act_slot_bits(bits):
    """Slot width of a ``bits``-wide activation in an activation bank word: the next power of 2."""
    return 1 << max(0, int(bits) - 1).bit_length()


def stored_bits(layer):
    """Bits of one element of ``layer``'s output map (a logit for the classifier)."""
    return layer.out_bits if layer.out_bits else layer.sum_bits


def _log2(value):
    return int(value).bit_length() - 1


def _descriptor(layer, p, layers=None, word_bits=None, act_word_bits=None):
    sched = {}
    if layers is not None:
        is_pool = layer.kind is LayerKind.POOL
        kh = layer.in_height if is_pool else layer.kernel
        kw = layer.in_width if is_pool else layer.kernel
        cg = layer.in_channels // layer.groups
        og = layer.out_channels // layer.groups
        mac_bits = 1 if is_pool else layer.weight_bits
        per = contract.codes_per_word(mac_bits, word_bits)
        fan_in = cg * kh * kw
        nxt = layers[layer.index + 1] if layer.index + 1 < len(layers) else None
        save = int(nxt is not None and any(l.residual_source == nxt.name for l in layers))
        in_slot = act_slot_bits(layer.in_bits)
        out_slot = act_slot_bits(stored_bits(layer))
        skip_slot = act_slot_bits(max(layer.skip_bits, 1))
        sched = {
            "kernel_h": kh, "kernel_w": kw, "padding": layer.padding,
            "out_height": layer.out_height, "out_width": layer.out_width,
            "in_group_channels": cg, "out_group_channels": og, "fan_in": fan_in,
            "mac_weight_bits": mac_bits, "codes_per_word": per,
            "fan_in_words": fan_in // per, "fan_in_rem": fan_in % per,
            "digits": -(-layer.in_bits // LANE_ACT_BITS),
            "in_elems_log2": _log2(act_word_bits // in_slot),
            "out_elems_log2": _log2(act_word_bits // out_slot),
            "in_slot_log2": _log2(in_slot), "out_slot_log2": _log2(out_slot),
            "save_residual": save, "skip_bits": layer.skip_bits,
            "skip_elems_log2": _log2(act_word_bits // skip_slot),
            "skip_slot_log2": _log2(skip_slot),
            "select_base": max(p.select_base, 0), "is_last": int(nxt is None),
            "outputs": layer.out_channels * layer.out_height * layer.out_width,
        }
    return sched | {
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
    act_word_bits = 1 << _log2(word_bits)
    for layer in layers:
        act_word_bits = max(act_word_bits, act_slot_bits(stored_bits(layer)),
                            act_slot_bits(layer.in_bits))

    def act_words(elements, bits):
        return -(-elements * act_slot_bits(bits) // act_word_bits)

    bank_words = [0, 0]
    residual_words = 0
    for layer, p in zip(layers, placements):
        bank_words[p.in_bank] = max(bank_words[p.in_bank], act_words(
            layer.in_channels * layer.in_height * layer.in_width, layer.in_bits))
        bank_words[p.out_bank] = max(bank_words[p.out_bank], act_words(
            layer.out_channels * layer.out_height * layer.out_width, stored_bits(layer)))
        if layer.residual is not Residual.NONE:
            residual_words = max(residual_words, act_words(
                layer.out_channels * layer.out_height * layer.out_width, layer.skip_bits))
    provisional = [_descriptor(layer, p, layers, word_bits, act_word_bits)
                   for layer, p in zip(layers, placements)]
    widths = {field: contract.unsigned_bits(max(row[field] for row in provisional))
              for field in DESCRIPTOR_FIELDS}
    memory_map = MemoryMap(word_bits, weight_base, bias_word_bits, bias_base, shift_bits,
                           len(groups), select_base, tuple(bank_bits), residual_bits, widths,
                           tuple(placements), act_word_bits, tuple(bank_words), residual_words)
    object.__setattr__(spec, "_memory_map", memory_map)
    return memory_map

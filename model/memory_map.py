"""Spec -> on-chip memory map and scheduler descriptor table.

Each step is a small pass with one job (FINN style); the budget, the weights exporter and the RTL
generator all read the result, so an address or a bank size is computed in exactly one place.

Memories of the layer-sequential engine:

* weight SRAM: words of ``hardware.weight_word_bits``; each layer's codes from its own word-aligned
  base address, one word per (tile, fan-in term) in :func:`weight_stream` order: code ``l`` of a
  word is the weight of MAC lane ``l`` (see :func:`layer_tiling`).
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
           "act_slot_bits", "stored_bits", "Tiling", "layer_tiling", "pad_code",
           "weight_stream", "weights_from_stream", "weight_stream_length"]

DESCRIPTOR_FIELDS = ("kind", "in_channels", "out_channels", "groups", "kernel", "stride",
                     "in_height", "in_width", "in_bits", "out_bits", "weight_bits",
                     "shift_index", "residual", "weight_base", "bias_base", "in_bank",
                     "out_bank",
                     # scheduler fields (loop nest of the RTL engine, see rtl/scheduler.py)
                     "kernel_h", "kernel_w", "padding", "out_height", "out_width",
                     "in_group_channels", "out_group_channels", "fan_in", "mac_weight_bits",
                     "group_tiles", "channel_tiles", "tile_channel_step", "tile_lanes",
                     "channel_tile_last_lanes", "lane_group_log2",
                     "group_stride_log2", "in_elems_log2", "out_elems_log2", "in_slot_log2", "out_slot_log2",
                     "save_residual", "skip_bits", "skip_elems_log2", "skip_slot_log2",
                     "select_base", "is_last", "outputs")

@dataclass(frozen=True)
class Tiling:
    """How the engine's lanes cover one layer (see :func:`layer_tiling`).

    The MAC array computes ``lanes`` output channels of one output pixel at once, each lane with
    its own accumulator, one fan-in term a cycle (a weight word holds one code per lane). The
    lanes of a tile are ``tile_groups`` lane groups of ``group_lanes`` lanes: lane ``l`` computes
    output channel ``(gt * tile_groups + l // group_lanes) * og + ct * group_lanes +
    l % group_lanes`` of group tile ``gt`` and channel tile ``ct``, so a tile's outputs are
    consecutive channels. The lane groups of a tile read one activation each a cycle, all from
    the same activation bank word (``tile_groups * in_group_channels`` divides the word's element
    count and the input channel count), which is what makes several groups a cycle possible.
    """
    codes_per_word: int    # codes of the layer's weight width in one weight word
    tile_groups: int       # convolution groups a tile covers (> 1 only when og < codes_per_word)
    group_lanes: int       # lanes per group in a tile: min(og, codes_per_word)
    group_tiles: int       # groups / tile_groups (tile_groups divides groups)
    channel_tiles: int     # ceil(og / group_lanes)
    fan_in: int            # cycles a tile takes: in_group_channels * kernel_h * kernel_w

    @property
    def lanes(self):
        """Lanes of a full tile (the rest of the word's codes are padding)."""
        return self.tile_groups * self.group_lanes

    def tile_lanes(self, channel_tile, og):
        """Valid lanes of a tile: all of them but in a partial last channel tile (tile_groups
        always divides the groups, so group tiles are whole)."""
        return self.tile_groups * min(self.group_lanes, og - channel_tile * self.group_lanes)

    @property
    def words(self):
        return self.group_tiles * self.channel_tiles * self.fan_in


def pad_code(bits):
    """The code in a weight stream's padding positions: the all-zero field (0; -1 for 1 bit)."""
    return -1 if bits == 1 else 0


def _min_act_word_bits(hardware):
    # The activation word is the largest power of two <= the weight word, or wider (build_memory_map)
    # and always a power of two: a tile fitting this one fits the real one.
    return 1 << _log2(hardware.weight_word_bits)


def layer_tiling(layer, hardware):
    """The one definition of how a layer is tiled onto the lanes (weight stream order, scheduler
    loop nest, engine lane routing and the generated accumulator count all read it)."""
    is_pool = layer.kind is LayerKind.POOL
    kh = layer.in_height if is_pool else layer.kernel
    kw = layer.in_width if is_pool else layer.kernel
    cg = layer.in_channels // layer.groups
    og = layer.out_channels // layer.groups
    per = contract.codes_per_word(1 if is_pool else layer.weight_bits, hardware.weight_word_bits)
    elements = _min_act_word_bits(hardware) // act_slot_bits(layer.in_bits)
    tile_groups = 1
    # Several groups a tile only when one group leaves lanes idle, lane groups split on a power
    # of two (lane l's group is l >> log2(og): no divider), and their activations share a word.
    if og < per and og & (og - 1) == 0:
        for g in range(min(per // og, layer.groups), 1, -1):
            span = g * cg
            if elements % span == 0 and layer.in_channels % span == 0:
                tile_groups = g
                break
    group_lanes = min(og, per)
    assert layer.groups % tile_groups == 0    # g * cg divides in_channels = groups * cg
    return Tiling(per, tile_groups, group_lanes, layer.groups // tile_groups,
                  -(-og // group_lanes), cg * kh * kw)


def weight_stream_length(layer, hardware):
    """Number of codes (padding included) a layer's weight stream holds in SRAM."""
    tiling = layer_tiling(layer, hardware)
    return tiling.words * tiling.codes_per_word


def _stream_index(layer, hardware):
    """For every stream position, the flat OIHW index of its code, or -1 for padding."""
    import numpy as np
    t = layer_tiling(layer, hardware)
    og = layer.out_channels // layer.groups
    gt, ct, f, lane = np.meshgrid(np.arange(t.group_tiles), np.arange(t.channel_tiles),
                                  np.arange(t.fan_in), np.arange(t.codes_per_word),
                                  indexing="ij")
    group = gt * t.tile_groups + lane // t.group_lanes
    channel = ct * t.group_lanes + lane % t.group_lanes
    valid = (lane < t.lanes) & (group < layer.groups) & (channel < og)
    index = ((group * og + channel) * t.fan_in + f)
    return np.where(valid, index, -1).reshape(-1)


def weight_stream(codes, layer, hardware):
    """A layer's OIHW codes in the order the engine reads them from weight SRAM (1-D).

    This is the one definition of that order: the exporter packs this stream and the RTL walks
    it. One weight word per (group tile, channel tile, fan-in term), in that loop order, the
    fan-in term ``f = (ci * kernel_h + ky) * kernel_w + kx`` (OIHW); code ``l`` of a word is lane
    ``l``'s weight (see :class:`Tiling`). Lanes a tile leaves empty hold :func:`pad_code`.
    """
    import numpy as np
    flat = np.asarray(codes).reshape(-1)
    index = _stream_index(layer, hardware)
    return np.where(index >= 0, flat[np.maximum(index, 0)], pad_code(layer.weight_bits))


def weights_from_stream(stream, layer, hardware, where=""):
    """Inverse of :func:`weight_stream`: OIHW codes from the SRAM-ordered stream. Raises
    :class:`~nqe.model.contract.ContractError` when a padding position holds another code."""
    import numpy as np
    stream = np.asarray(stream).reshape(-1)
    index = _stream_index(layer, hardware)
    pad = index < 0
    bad = pad & (stream != pad_code(layer.weight_bits))
    if bad.any():
        position = int(np.flatnonzero(bad)[0])
        raise contract.ContractError(
            f"{where + ': ' if where else ''}weight stream position {position} is padding "
            f"(a lane no output channel uses) and must hold {pad_code(layer.weight_bits)}, "
            f"found {int(stream[position])}")
    out = np.empty(layer.weight_count, dtype=stream.dtype)
    out[index[~pad]] = stream[~pad]
    return out.reshape(layer.weight_shape)


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
            rows.append(_descriptor(layer, p, layers, spec.hardware, self.act_word_bits))
        return rows


def act_slot_bits(bits):
    """Slot width of a ``bits``-wide activation in an activation bank word: the next power of 2."""
    return 1 << max(0, int(bits) - 1).bit_length()


def stored_bits(layer):
    """Bits of one element of ``layer``'s output map (a logit for the classifier)."""
    return layer.out_bits if layer.out_bits else layer.sum_bits


def _log2(value):
    return int(value).bit_length() - 1


def _descriptor(layer, p, layers=None, hardware=None, act_word_bits=None):
    sched = {}
    if layers is not None:
        word_bits = hardware.weight_word_bits
        tiling = layer_tiling(layer, hardware)
        is_pool = layer.kind is LayerKind.POOL
        kh = layer.in_height if is_pool else layer.kernel
        kw = layer.in_width if is_pool else layer.kernel
        cg = layer.in_channels // layer.groups
        og = layer.out_channels // layer.groups
        mac_bits = 1 if is_pool else layer.weight_bits
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
            "mac_weight_bits": mac_bits,
            "group_tiles": tiling.group_tiles, "channel_tiles": tiling.channel_tiles,
            "tile_channel_step": tiling.tile_groups * cg,
            "tile_lanes": tiling.tile_lanes(0, og),
            "channel_tile_last_lanes": tiling.tile_lanes(tiling.channel_tiles - 1, og),
            # Lane l reads lane group l >> lane_group_log2 (all lanes group 0 for one group a
            # tile), whose activation sits group_stride_log2 bits above the previous group's.
            "lane_group_log2": (_log2(tiling.group_lanes) if tiling.tile_groups > 1
                                else _log2(word_bits) + 1),
            "group_stride_log2": (_log2(cg * in_slot) if tiling.tile_groups > 1 else 0),
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
        words = layer_tiling(layer, spec.hardware).words if layer.has_weights else 0
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
    provisional = [_descriptor(layer, p, layers, spec.hardware, act_word_bits)
                   for layer, p in zip(layers, placements)]
    widths = {field: contract.unsigned_bits(max(row[field] for row in provisional))
              for field in DESCRIPTOR_FIELDS}
    memory_map = MemoryMap(word_bits, weight_base, bias_word_bits, bias_base, shift_bits,
                           len(groups), select_base, tuple(bank_bits), residual_bits, widths,
                           tuple(placements), act_word_bits, tuple(bank_words), residual_words)
    object.__setattr__(spec, "_memory_map", memory_map)
    return memory_map

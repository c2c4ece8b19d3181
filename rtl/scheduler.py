"""The layer scheduler: walks one layer's loop nest from its descriptor and emits, a cycle at a time,
the address/control operation the engine's datapath executes (one weight word a cycle)."""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from nqe.model import contract
from nqe.model.memory_map import DESCRIPTOR_FIELDS, build_memory_map

__all__ = ["Scheduler", "descriptor_layout", "reference_ops", "layer_cycles"]


def descriptor_layout(memory_map):
    """The descriptor table row as an Amaranth struct: every field as wide as the memory map
    derived it for this spec (all fields unsigned)."""
    return data.StructLayout({name: unsigned(memory_map.descriptor_widths[name])
                               for name in DESCRIPTOR_FIELDS})


def reference_ops(desc):
    """The plain-Python loop nest of one layer: the list of ops :class:`Scheduler` emits, in order,
    as dicts. The test's golden model; also used to predict cycle counts (:func:`layer_cycles`).

    For every output pixel (``oy``, ``ox``), group tile ``gt`` and channel tile ``ct`` (see
    :class:`~nqe.model.memory_map.Tiling`), one op per fan-in term ``f = (ci * kernel_h + ky) *
    kernel_w + kx`` (the weight stream's order): read weight word ``weight_base + k`` (``k``
    counts the pixel's ops; the stream restarts every pixel) and input element ``e = (y * W + x)
    * C + gt * tile_channel_step + ci`` at ``y = oy * stride + ky - padding`` (likewise ``x``),
    ``zero`` in the padding. ``first``/``last`` open and close the tile's dot products; ``lanes``
    is how many of its lanes hold output channels.
    """
    ops = []
    cin, h, w = desc["in_channels"], desc["in_height"], desc["in_width"]
    kh, kw, s, p = desc["kernel_h"], desc["kernel_w"], desc["stride"], desc["padding"]
    cg = desc["in_group_channels"]
    elems_log2 = desc["in_elems_log2"]
    gtiles, ctiles = desc["group_tiles"], desc["channel_tiles"]
    for oy in range(desc["out_height"]):
        for ox in range(desc["out_width"]):
            word = 0
            for gt in range(gtiles):
                for ct in range(ctiles):
                    lanes = (desc["tile_lanes"] if ct < ctiles - 1
                             else desc["channel_tile_last_lanes"])
                    for ci in range(cg):
                        for ky in range(kh):
                            for kx in range(kw):
                                y, x = oy * s + ky - p, ox * s + kx - p
                                zero = not (0 <= y < h and 0 <= x < w)
                                e = (0 if zero else
                                     (y * w + x) * cin + gt * desc["tile_channel_step"] + ci)
                                ops.append({
                                    "act_addr": e >> elems_log2,
                                    "act_slot": e & ((1 << elems_log2) - 1),
                                    "zero": int(zero),
                                    "weight_addr": desc["weight_base"] + word,
                                    "first": int(ci == 0 and ky == 0 and kx == 0),
                                    "last": int(ci == cg - 1 and ky == kh - 1 and kx == kw - 1),
                                    "lanes": lanes,
                                })
                                word += 1
    return ops


def layer_cycles(desc, pipeline):
    """Cycles the engine spends on one layer's ops: one a cycle, except that a tile's ``last``
    op waits until the previous tile's results have left the drain register (``lanes`` cycles
    after the previous ``last``), plus the previous tile's drain, plus ``pipeline`` (the engine's
    fixed op-to-write latency). The exact figure the RTL's per-layer counter must report, less
    the engine's per-layer gap."""
    cycle = 0
    free_at = 0            # first cycle the next last op may issue
    last_issue = None
    last_lanes = 0
    for op in reference_ops(desc):
        if op["last"]:
            cycle = max(cycle, free_at)
            free_at = cycle + op["lanes"]
            last_issue, last_lanes = cycle, op["lanes"]
        cycle += 1
    return last_issue + last_lanes + pipeline


class Scheduler(wiring.Component):
    """Emits the operation sequence of one layer, from its descriptor: one op a cycle, each naming
    one weight word and one input activation word (the loop nest of :func:`reference_ops`).

    The loop nest is output pixel, group tile, channel tile, then the fan-in terms (input channel
    of the group, kernel row, kernel column), computed with counters. An input element's address
    ``(y * W + x) * C + c`` uses two multipliers (iCE40UP5K DSPs; strength-reducing them to
    counters would free the DSPs). All layer kinds are the same loop nest with different
    descriptor values: stem and group-wise convolutions (k x k, stride, zero padding), pointwise
    and bottleneck 1x1 (with groups), global sum pooling (a group per channel, kernel = the whole
    map, all-ones 1-bit weights supplied by the engine) and the classifier (1x1 on the pooled
    1x1 map). Every op carries a whole weight word of products, so the ops are the ideal cycles
    plus the lanes a partial tile leaves empty (see :class:`~nqe.model.memory_map.Tiling`).

    Latency: the first operation is offered the cycle after ``start``. Throughput: one operation
    a cycle while ``ops.ready`` is high; ``done`` rises the cycle after the last one is accepted
    and holds until the next ``start``.

    Parameters
    ----------
    memory_map : :class:`~nqe.model.memory_map.MemoryMap`
        Gives the descriptor layout (field widths) and the address widths.
    spec : :class:`~nqe.model.spec.NetworkSpec`
        The spec the memory map belongs to (largest maps and channel counts set counter widths).

    Members
    -------
    desc : In(descriptor_layout(memory_map))
        The running layer's descriptor; must hold still from ``start`` until ``done``.
    start : In(1)
        Pulse: begin the layer.
    done : Out(1)
        The layer's last operation has been accepted (and no layer is running).
    ops : Out(stream.Signature(op_layout))
        ``act_addr``, ``act_slot`` (input word and slot of lane group 0's element), ``zero``
        (padding: all activations 0), ``weight_addr``, ``first``/``last`` (the op opens/closes the
        tile's dot products), ``lanes`` (lanes of the tile that hold output channels).
    """

    def __init__(self, memory_map, spec):
        self._mm = memory_map
        layers = spec.layers()
        rows = memory_map.descriptors(spec)
        self._elements = max(max(r["in_channels"] * r["in_height"] * r["in_width"] for r in rows),
                             2)
        self._act_addr_bits = ceil_log2(max(max(memory_map.bank_words), 2))
        # Pooling walks the same counter over its (engine-supplied, all-ones) weight words.
        self._weight_addr_bits = ceil_log2(max(
            max(r["weight_base"] + r["group_tiles"] * r["channel_tiles"] * r["fan_in"] + 1
                for r in rows), 2))
        self._max_lanes = max(max(r["tile_lanes"], r["channel_tile_last_lanes"]) for r in rows)
        self._max_hw = max(max(r["in_height"], r["in_width"]) for r in rows)
        self._max_pad = max(r["padding"] for r in rows)
        self._channels = max(max(r["in_channels"], r["out_channels"]) for r in rows)
        self._act_word_bits = memory_map.act_word_bits
        assert len(layers) == len(rows)
        super().__init__({
            "desc": In(descriptor_layout(memory_map)),
            "start": In(1),
            "done": Out(1, init=1),
            "ops": Out(stream.Signature(self.op_layout)),
        })

    @classmethod
    def from_spec(cls, spec):
        return cls(build_memory_map(spec), spec)

    @property
    def max_lanes(self):
        """The most lanes any tile of the spec fills: the MAC array's accumulator count."""
        return self._max_lanes

    @property
    def op_layout(self):
        return data.StructLayout({
            "act_addr": unsigned(self._act_addr_bits),
            "act_slot": unsigned(ceil_log2(self._act_word_bits)),
            "zero": 1,
            "weight_addr": unsigned(self._weight_addr_bits),
            "first": 1,
            "last": 1,
            "lanes": range(self._max_lanes + 1),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.desc
        op = self.ops.payload

        coord = signed(contract.signed_bits(-self._max_pad - 1, 2 * self._max_hw + 2))
        oy = Signal(range(self._max_hw + 1))
        ox = Signal(range(self._max_hw + 1))
        iy0 = Signal(coord)      # oy * stride - padding
        ix0 = Signal(coord)
        gt = Signal(range(self._channels + 1))
        ct = Signal(range(self._channels + 1))
        cbase = Signal(range(self._channels + 1))   # gt * tile_channel_step
        ci = Signal(range(self._channels + 1))
        ky = Signal(range(self._max_hw + 1))
        kx = Signal(range(self._max_hw + 1))
        word = Signal(self._weight_addr_bits)

        # Input element address (HWC, see memory_map): the two multipliers of the scheduler.
        y = Signal(coord)
        x = Signal(coord)
        m.d.comb += [y.eq(iy0 + ky), x.eq(ix0 + kx)]
        zero = Signal()
        m.d.comb += zero.eq((y < 0) | (y >= d.in_height) | (x < 0) | (x >= d.in_width))
        element = Signal(range(self._elements + 1))
        with m.If(~zero):
            m.d.comb += element.eq((y.as_unsigned() * d.in_width + x.as_unsigned())
                                   * d.in_channels + cbase + ci)
        slot_mask = Signal(ceil_log2(self._act_word_bits) + 1)
        m.d.comb += slot_mask.eq((1 << d.in_elems_log2) - 1)

        last_kx = Signal()
        last_ky = Signal()
        last_ci = Signal()
        last_ct = Signal()
        last_gt = Signal()
        m.d.comb += [last_kx.eq(kx == d.kernel_w - 1), last_ky.eq(ky == d.kernel_h - 1),
                     last_ci.eq(ci == d.in_group_channels - 1),
                     last_ct.eq(ct == d.channel_tiles - 1), last_gt.eq(gt == d.group_tiles - 1)]
        lanes = Signal.like(op.lanes)
        m.d.comb += lanes.eq(Mux(last_ct, d.channel_tile_last_lanes, d.tile_lanes))

        m.d.comb += [
            op.act_addr.eq(element >> d.in_elems_log2),
            op.act_slot.eq(element & slot_mask),
            op.zero.eq(zero),
            op.weight_addr.eq(d.weight_base + word),
            op.first.eq((ci == 0) & (ky == 0) & (kx == 0)),
            op.last.eq(last_ci & last_ky & last_kx),
            op.lanes.eq(lanes),
        ]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        self.done.eq(0),
                        oy.eq(0), ox.eq(0), gt.eq(0), ct.eq(0), cbase.eq(0),
                        ci.eq(0), ky.eq(0), kx.eq(0), word.eq(0),
                        iy0.eq(-d.padding), ix0.eq(-d.padding),
                    ]
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += self.ops.valid.eq(1)
                with m.If(self.ops.ready):
                    m.d.sync += [word.eq(word + 1), kx.eq(kx + 1)]
                    with m.If(last_kx):
                        m.d.sync += [kx.eq(0), ky.eq(ky + 1)]
                        with m.If(last_ky):
                            m.d.sync += [ky.eq(0), ci.eq(ci + 1)]
                            with m.If(last_ci):       # tile done
                                m.d.sync += [ci.eq(0), ct.eq(ct + 1)]
                                with m.If(last_ct):
                                    m.d.sync += [ct.eq(0), gt.eq(gt + 1),
                                                 cbase.eq(cbase + d.tile_channel_step)]
                                    with m.If(last_gt):     # pixel done: the stream restarts
                                        m.d.sync += [gt.eq(0), cbase.eq(0), word.eq(0),
                                                     ox.eq(ox + 1), ix0.eq(ix0 + d.stride)]
                                        with m.If(ox == d.out_width - 1):
                                            m.d.sync += [ox.eq(0), ix0.eq(-d.padding),
                                                         oy.eq(oy + 1), iy0.eq(iy0 + d.stride)]
                                            with m.If(oy == d.out_height - 1):
                                                m.d.sync += self.done.eq(1)
                                                m.next = "IDLE"
        return m

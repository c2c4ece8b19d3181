"""The layer scheduler: walks one layer's loop nest from its descriptor and emits, a cycle at a time,
the address/control operations the engine's datapath executes."""

from amaranth import *
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from nqe.model import contract
from nqe.model.memory_map import DESCRIPTOR_FIELDS, build_memory_map

__all__ = ["OpKind", "Scheduler", "descriptor_layout", "reference_ops"]


class OpKind(enum.Enum, shape=1):
    LOAD = 0    # fetch one input activation into the window register
    MAC = 1     # present one weight word (one activation digit) to the MAC array


def descriptor_layout(memory_map):
    """The descriptor table row as an Amaranth struct: every field as wide as the memory map
    derived it for this spec (all fields unsigned)."""
    return data.StructLayout({name: unsigned(memory_map.descriptor_widths[name])
                               for name in DESCRIPTOR_FIELDS})


def reference_ops(desc):
    """The plain-Python loop nest of one layer: the list of ops :class:`Scheduler` emits, in order,
    as dicts (``kind`` plus the fields that kind uses). The test's golden model; also used to
    predict cycle counts.

    For every output pixel (``oy``, ``ox``) and every group ``g``:

    1. LOAD the group's receptive field into the window, in the weight stream's fan-in order
       (OIHW: input channel, then kernel row, then kernel column): window index
       ``f = (ci * kernel_h + ky) * kernel_w + kx``; positions in the zero padding load 0.
    2. For every output channel ``o`` of the group: its codes occupy weight stream positions
       ``[o * fan_in, (o + 1) * fan_in)`` (the stream restarts for every pixel). Present every word
       they touch, once per activation digit; lane ``i`` of a word starting at window offset
       ``offset`` takes window entry ``offset + i`` (lanes outside ``[0, fan_in)`` take 0).
    """
    ops = []
    cin, h, w = desc["in_channels"], desc["in_height"], desc["in_width"]
    kh, kw, s, p = desc["kernel_h"], desc["kernel_w"], desc["stride"], desc["padding"]
    cg, og, fan_in = desc["in_group_channels"], desc["out_group_channels"], desc["fan_in"]
    per, digits = desc["codes_per_word"], desc["digits"]
    elems_log2 = desc["in_elems_log2"]
    outputs = desc["outputs"]
    count = 0
    for oy in range(desc["out_height"]):
        for ox in range(desc["out_width"]):
            for g in range(desc["groups"]):
                for ci in range(cg):
                    for ky in range(kh):
                        for kx in range(kw):
                            y, x = oy * s + ky - p, ox * s + kx - p
                            zero = not (0 <= y < h and 0 <= x < w)
                            e = 0 if zero else (y * w + x) * cin + g * cg + ci
                            ops.append({"kind": OpKind.LOAD, "act_addr": e >> elems_log2,
                                        "act_slot": e & ((1 << elems_log2) - 1),
                                        "zero": int(zero), "win": (ci * kh + ky) * kw + kx})
                for oc in range(og):
                    o = g * og + oc
                    start = o * fan_in
                    word, offset = start // per, -(start % per)
                    first = True
                    count += 1
                    while True:
                        last = offset + per >= fan_in
                        for d in range(digits):
                            ops.append({"kind": OpKind.MAC,
                                        "weight_addr": desc["weight_base"] + word,
                                        "offset": offset, "digit": d,
                                        "first": int(first and d == 0),
                                        "last": int(last and d == digits - 1), "channel": o,
                                        "end": int(last and d == digits - 1
                                                   and count == outputs)})
                        if last:
                            break
                        word, offset, first = word + 1, offset + per, False
    return ops


class Scheduler(wiring.Component):
    """Emits the operation sequence of one layer, from its descriptor.

    The loop nest is the one of :func:`reference_ops` (output pixel, group, then a LOAD phase
    filling the window with the group's receptive field and a MAC phase streaming the weight words
    of the group's output channels), computed with counters: the weight stream position of a
    channel advances by ``fan_in = fan_in_words * codes_per_word + fan_in_rem`` per channel with
    one compare and subtract (no divider); an input element's address ``(y * W + x) * C + c`` uses
    two multipliers (iCE40UP5K DSPs; strength-reducing them to counters would free the DSPs).
    All layer kinds are the same loop nest with different descriptor values: stem and group-wise
    convolutions (k x k, stride, zero padding), pointwise and bottleneck 1x1 (with groups), global
    sum pooling (a group per channel, kernel = the whole map, all-ones 1-bit weights supplied by
    the engine) and the classifier (1x1 on the pooled 1x1 map, digit-serial wide inputs).

    Latency: the first operation is offered the cycle after ``start``. Throughput: one operation
    a cycle while ``ops.ready`` is high; ``done`` rises the cycle after the last one is accepted
    and holds until the next ``start``.

    Where MAC utilization is lost (cycles that carry no full weight word of products):

    * LOAD operations: ``fan_in`` cycles per pixel and group with no MAC work. Pointwise layers
      lose ``fan_in`` cycles per pixel against ``out_channels * fan_in / codes_per_word`` of MAC
      cycles; group-wise 3x3 layers lose more than they compute. Recovered by a double-buffered
      window filled from the bank's free read port while the MACs run, and by word-wide loads
      (a bank word holds ``act_word_bits / slot`` channels of a pixel in HWC order).
    * Words straddling two output channels are presented once per channel (see ``MACArray``).
      Recovered by padding each output channel's codes to whole words in ``weight_stream``
      (memory cost) or by a second accumulator.
    * Digit-serial wide inputs (the stem's 8-bit image, the classifier): ``digits`` cycles a word.

    Parameters
    ----------
    memory_map : :class:`~nqe.model.memory_map.MemoryMap`
        Gives the descriptor layout (field widths) and the address widths.
    spec : :class:`~nqe.model.spec.NetworkSpec`
        The spec the memory map belongs to (largest maps and fan-ins set the counter widths).

    Members
    -------
    desc : In(descriptor_layout(memory_map))
        The running layer's descriptor; must hold still from ``start`` until ``done``.
    start : In(1)
        Pulse: begin the layer.
    done : Out(1)
        The layer's last operation has been accepted (and no layer is running).
    ops : Out(stream.Signature(op_layout))
        ``kind`` (:class:`OpKind`); LOAD: ``act_addr``, ``act_slot``, ``zero``, ``win``; MAC:
        ``weight_addr``, ``offset`` (signed window offset of lane 0), ``digit``, ``first``,
        ``last`` (of the dot product), ``channel`` (output channel), ``end`` (last op of layer).
    """

    def __init__(self, memory_map, spec):
        self._mm = memory_map
        layers = spec.layers()
        rows = memory_map.descriptors(spec)
        self._elements = max(max(r["in_channels"] * r["in_height"] * r["in_width"] for r in rows),
                             2)
        self._act_addr_bits = ceil_log2(max(max(memory_map.bank_words), 2))
        self._weight_addr_bits = ceil_log2(max(
            max(r["weight_base"] + (r["out_channels"] * r["fan_in"]) // r["codes_per_word"] + 1
                for r in rows), 2))
        self._window = max(r["fan_in"] for r in rows)
        self._max_per = max(r["codes_per_word"] for r in rows)
        self._max_hw = max(max(r["in_height"], r["in_width"]) for r in rows)
        self._max_pad = max(r["padding"] for r in rows)
        self._channels = max(max(r["in_channels"], r["out_channels"]) for r in rows)
        self._digits = max(r["digits"] for r in rows)
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
    def window_size(self):
        """Window register entries: the largest fan-in (pooling: the largest map)."""
        return self._window

    @property
    def op_layout(self):
        return data.StructLayout({
            "kind": OpKind,
            "act_addr": unsigned(self._act_addr_bits),
            "act_slot": unsigned(ceil_log2(self._act_word_bits)),
            "zero": 1,
            "win": range(self._window),
            "weight_addr": unsigned(self._weight_addr_bits),
            "offset": signed(contract.signed_bits(-self._max_per, self._window + self._max_per)),
            "digit": range(max(self._digits, 2)),
            "first": 1,
            "last": 1,
            "channel": range(self._channels),
            "end": 1,
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
        g = Signal(range(self._channels + 1))
        cbase = Signal(range(self._channels + 1))   # g * in_group_channels
        ci = Signal(range(self._channels + 1))
        ky = Signal(range(self._max_hw + 1))
        kx = Signal(range(self._max_hw + 1))
        win = Signal(range(self._window + 1))
        oc = Signal(range(self._channels + 1))
        o = Signal(range(self._channels + 1))
        # Weight stream position of channel o's first code: word cw, code cr within it.
        cw = Signal(self._weight_addr_bits)
        cr = Signal(range(self._max_per + 1))
        word = Signal(self._weight_addr_bits)
        offset = Signal.like(op.offset)
        digit = Signal.like(op.digit)
        first = Signal()
        outputs_left = Signal(range(self._channels * self._max_hw * self._max_hw + 2))

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

        last_word = Signal()
        m.d.comb += last_word.eq(offset + d.codes_per_word >= d.fan_in)
        last_digit = Signal()
        m.d.comb += last_digit.eq(digit == d.digits - 1)

        # The next channel's stream position.
        next_r = Signal(range(2 * self._max_per + 1))
        next_cr = Signal.like(cr)
        next_cw = Signal.like(cw)
        m.d.comb += next_r.eq(cr + d.fan_in_rem)
        with m.If(next_r >= d.codes_per_word):
            m.d.comb += [next_cr.eq(next_r - d.codes_per_word),
                         next_cw.eq(cw + d.fan_in_words + 1)]
        with m.Else():
            m.d.comb += [next_cr.eq(next_r), next_cw.eq(cw + d.fan_in_words)]

        m.d.comb += [
            op.act_addr.eq(element >> d.in_elems_log2),
            op.act_slot.eq(element & slot_mask),
            op.zero.eq(zero),
            op.win.eq(win),
            op.weight_addr.eq(d.weight_base + word),
            op.offset.eq(offset),
            op.digit.eq(digit),
            op.first.eq(first & (digit == 0)),
            op.last.eq(last_word & last_digit),
            op.channel.eq(o),
            op.end.eq(last_word & last_digit & (outputs_left == 1)),
        ]

        def begin_pixel_group():
            m.d.sync += [ci.eq(0), ky.eq(0), kx.eq(0), win.eq(0)]

        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [
                        self.done.eq(0),
                        oy.eq(0), ox.eq(0), g.eq(0), cbase.eq(0),
                        iy0.eq(-d.padding), ix0.eq(-d.padding),
                        oc.eq(0), o.eq(0), cw.eq(0), cr.eq(0),
                        outputs_left.eq(d.outputs),
                    ]
                    begin_pixel_group()
                    m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += [self.ops.valid.eq(1), op.kind.eq(OpKind.LOAD)]
                with m.If(self.ops.ready):
                    m.d.sync += [win.eq(win + 1), kx.eq(kx + 1)]
                    with m.If(kx == d.kernel_w - 1):
                        m.d.sync += [kx.eq(0), ky.eq(ky + 1)]
                        with m.If(ky == d.kernel_h - 1):
                            m.d.sync += [ky.eq(0), ci.eq(ci + 1)]
                            with m.If(ci == d.in_group_channels - 1):
                                m.d.sync += [word.eq(cw), offset.eq(-cr), digit.eq(0),
                                             first.eq(1)]
                                m.next = "MAC"
            with m.State("MAC"):
                m.d.comb += [self.ops.valid.eq(1), op.kind.eq(OpKind.MAC)]
                with m.If(self.ops.ready):
                    m.d.sync += digit.eq(digit + 1)
                    with m.If(last_digit):
                        m.d.sync += [digit.eq(0), first.eq(0), word.eq(word + 1),
                                     offset.eq(offset + d.codes_per_word)]
                        with m.If(last_word):
                            # Channel done: step to the next channel of the group.
                            m.d.sync += [outputs_left.eq(outputs_left - 1), oc.eq(oc + 1),
                                         o.eq(o + 1), cw.eq(next_cw), cr.eq(next_cr),
                                         word.eq(next_cw), offset.eq(-next_cr), first.eq(1)]
                            with m.If(oc == d.out_group_channels - 1):
                                m.d.sync += [oc.eq(0), g.eq(g + 1),
                                             cbase.eq(cbase + d.in_group_channels)]
                                begin_pixel_group()
                                m.next = "LOAD"
                                with m.If(g == d.groups - 1):
                                    # Pixel done: the weight stream restarts.
                                    m.d.sync += [g.eq(0), cbase.eq(0), o.eq(0), cw.eq(0),
                                                 cr.eq(0), ox.eq(ox + 1),
                                                 ix0.eq(ix0 + d.stride)]
                                    with m.If(ox == d.out_width - 1):
                                        m.d.sync += [ox.eq(0), ix0.eq(-d.padding),
                                                     oy.eq(oy + 1), iy0.eq(iy0 + d.stride)]
                                        with m.If(oy == d.out_height - 1):
                                            m.d.sync += self.done.eq(1)
                                            m.next = "IDLE"
        return m

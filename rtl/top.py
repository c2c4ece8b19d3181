"""The accelerator top level: the :class:`~nqe.rtl.engine.Engine` behind a byte-stream host
protocol (``amaranth.lib.stream``, valid/ready), for a serial bridge or a cocotb bench.

Host protocol
=============

Both directions are streams of bytes (8-bit payloads). Multi-byte numbers are little-endian.

Command (host -> accelerator)::

    opcode (1 byte) | length (3 bytes: payload bytes that follow) | payload (length bytes)

Every command is answered with one status byte, followed, for a successful read command, by
its data. Status codes (:class:`Status`):

====  ==============  ==========================================================================
0x00  OK
0x01  UNKNOWN_OPCODE  the opcode is not one below; its ``length`` payload bytes are discarded
0x02  BAD_LENGTH      ``length`` is not the command's exact length; the payload is discarded and
                      the target memory keeps its contents (and its loaded/not-loaded state)
0x03  NOT_LOADED      RUN before weights, biases, shifts, selects (where the spec has any) and a
                      fresh image are loaded; nothing runs
====  ==============  ==========================================================================

A malformed command therefore never desynchronizes the stream (the length frames it) and never
starts or stalls the engine. The last non-zero status is also kept as a sticky error, read and
cleared by READ_STATUS. (A host that declares a length and then stops sending mid-payload leaves
the parser waiting for the rest; an idle timeout would turn that into an error too.)

=======  =============  ===================================  ===================================
opcode   name           payload (exact length)               response after the status byte
=======  =============  ===================================  ===================================
0x01     LOAD_WEIGHTS   weight SRAM image: ``weight_words``  -
                        words of ``ceil(weight_word_bits/8)``
                        bytes (the exporter's packed files,
                        placed at each layer's base)
0x02     LOAD_BIASES    ``bias_words`` biases, two's         -
                        complement, ``ceil(bias_word_bits/8)``
                        bytes each
0x03     LOAD_SHIFTS    ``shift_entries`` shifts,            -
                        ``ceil(shift_bits/8)`` bytes each
0x04     LOAD_SELECTS   ``select_bits`` bytes, 0 or 1        -
0x05     LOAD_IMAGE     ``H * W * C`` bytes, HWC order       -
0x06     RUN            none                                 - (the status comes when the run ends)
0x07     READ_RESULT    none                                 with a head: the class index (1 byte),
                                                             then the last layer's output map as
                                                             its bank words (see below)
0x08     READ_COUNTERS  none                                 total cycles, MAC-busy cycles, then
                                                             the cycles of each layer: 4 bytes each
0x09     READ_STATUS    none                                 the sticky error (1 byte), then cleared
=======  =============  ===================================  ===================================

The output map (logits, or the bottleneck's code bits when the spec has no head) is sent as the
activation bank words that hold it, ``act_word_bits / 8`` bytes each: elements in HWC order
(code bits: pixel by pixel, channels fastest), each in a slot of ``act_slot_bits`` bits (logits:
two's complement), as :mod:`nqe.model.memory_map` describes; :mod:`nqe.rtl.host` unpacks them.
The exact lengths and counts are properties of :class:`Accelerator` (from the memory map).

A RUN consumes the image (the ping-pong overwrites bank A): load a new image before the next RUN.
READ_RESULT reads the result bank as it is now: where the last layer writes bank A (the memory
map's last placement), a LOAD_IMAGE overwrites the result, and READ_RESULT returns the result of
the last RUN only until the next LOAD_IMAGE.
"""

from amaranth import *
from amaranth.lib import enum, stream, wiring
from amaranth.lib.wiring import In, Out

from nqe.model import contract
from nqe.model.memory_map import build_memory_map, stored_bits
from nqe.rtl.engine import COUNTER_BITS, Engine, Target

__all__ = ["Opcode", "Status", "Accelerator"]


class Opcode(enum.Enum, shape=8):
    LOAD_WEIGHTS = 0x01
    LOAD_BIASES = 0x02
    LOAD_SHIFTS = 0x03
    LOAD_SELECTS = 0x04
    LOAD_IMAGE = 0x05
    RUN = 0x06
    READ_RESULT = 0x07
    READ_COUNTERS = 0x08
    READ_STATUS = 0x09


class Status(enum.Enum, shape=8):
    OK = 0x00
    UNKNOWN_OPCODE = 0x01
    BAD_LENGTH = 0x02
    NOT_LOADED = 0x03


_LOADS = {Opcode.LOAD_WEIGHTS: Target.WEIGHTS, Opcode.LOAD_BIASES: Target.BIASES,
          Opcode.LOAD_SHIFTS: Target.SHIFTS, Opcode.LOAD_SELECTS: Target.SELECTS,
          Opcode.LOAD_IMAGE: Target.ACT_A}
LENGTH_BYTES = 3


class Accelerator(wiring.Component):
    """The whole accelerator for one spec: host protocol parser + :class:`Engine`.

    Latency: a command's status byte is offered 2 cycles after its last byte is accepted (RUN:
    after the run, ``engine.total_cycles`` later). Throughput: one command or response byte a
    cycle. While a RUN is in progress ``command.ready`` is low.

    Members
    -------
    command : In(stream.Signature(8))
        Host -> accelerator bytes.
    response : Out(stream.Signature(8))
        Accelerator -> host bytes.
    """

    def __init__(self, spec):
        self._spec = spec
        self._mm = mm = build_memory_map(spec)
        self._engine = Engine(spec)
        self._layers = spec.layers()
        self._item_bytes = {
            Opcode.LOAD_WEIGHTS: contract.word_bytes(mm.weight_word_bits),
            Opcode.LOAD_BIASES: contract.word_bytes(mm.bias_word_bits),
            Opcode.LOAD_SHIFTS: contract.word_bytes(max(mm.shift_bits, 1)),
            Opcode.LOAD_SELECTS: 1,
            Opcode.LOAD_IMAGE: mm.act_word_bits // 8,   # 8-bit slots: bytes pack into words
        }
        self._lengths = {
            Opcode.LOAD_WEIGHTS: mm.weight_words * self._item_bytes[Opcode.LOAD_WEIGHTS],
            Opcode.LOAD_BIASES: mm.bias_words * self._item_bytes[Opcode.LOAD_BIASES],
            Opcode.LOAD_SHIFTS: mm.shift_entries * self._item_bytes[Opcode.LOAD_SHIFTS],
            Opcode.LOAD_SELECTS: mm.select_bits,
            Opcode.LOAD_IMAGE: spec.input_height * spec.input_width * spec.input_channels,
        }
        for opcode in Opcode:
            self._lengths.setdefault(opcode, 0)
        for opcode, length in self._lengths.items():
            if length >= 1 << (8 * LENGTH_BYTES):
                raise ValueError(f"spec {spec.name!r}: {opcode.name} needs {length} bytes, more "
                                 f"than the {LENGTH_BYTES}-byte length field holds")
        super().__init__({
            "command": In(stream.Signature(8)),
            "response": Out(stream.Signature(8)),
        })

    @property
    def engine(self):
        return self._engine

    def length(self, opcode):
        """The exact payload length of ``opcode``."""
        return self._lengths[Opcode(opcode)]

    @property
    def result_words(self):
        """Bank words READ_RESULT sends."""
        last = self._layers[-1]
        count = last.out_channels * last.out_height * last.out_width
        per = self._mm.act_word_bits // (1 << (stored_bits(last) - 1).bit_length())
        return -(-count // per)

    @property
    def result_word_bytes(self):
        return self._mm.act_word_bits // 8

    @property
    def has_class_index(self):
        return self._spec.head is not None

    @property
    def needed_loads(self):
        """Load commands a RUN requires (memories the spec actually has)."""
        return [op for op in _LOADS if self._lengths[op] > 0]

    def elaborate(self, platform):
        m = Module()
        m.submodules.engine = engine = self._engine
        cmd, rsp = self.command, self.response

        opcode = Signal(8)
        length = Signal(8 * LENGTH_BYTES)
        header = Signal(range(LENGTH_BYTES))
        remaining = Signal(8 * LENGTH_BYTES)
        status = Signal(Status)
        sticky = Signal(Status)
        loaded = {op: Signal(name=f"loaded_{op.name.lower()}") for op in _LOADS}

        # Load payload assembly: bytes -> items (LE), written to the engine's host port.
        item = Signal(max(engine.width(t) for t in Target) + 8)
        byte_pos = Signal(range(max(self._item_bytes.values()) + 1))
        item_bytes = Signal.like(byte_pos)
        target = Signal(Target)
        addr = Signal(len(engine.host_write.addr))
        assembled = Signal.like(item)
        m.d.comb += assembled.eq(item | (cmd.payload << (byte_pos * 8)))

        # Response words: out_word sent LSB first, out_bytes of it.
        out_word = Signal(max(COUNTER_BITS, self._mm.act_word_bits))
        out_bytes = Signal(range(max(4, self.result_word_bytes) + 1))
        phase = Signal(2)
        mem_addr = Signal(len(engine.host_read.addr))
        mem_target = Signal(Target)
        m.d.comb += [engine.host_read.target.eq(mem_target), engine.host_read.addr.eq(mem_addr)]
        m.d.comb += [engine.first_layer.eq(0), engine.last_layer.eq(len(self._layers) - 1)]

        def finish(code):
            m.d.sync += status.eq(code)
            if code is not Status.OK:
                m.d.sync += sticky.eq(code)
            m.next = "STATUS"

        with m.FSM():
            with m.State("OPCODE"):
                m.d.comb += cmd.ready.eq(1)
                with m.If(cmd.valid):
                    m.d.sync += [opcode.eq(cmd.payload), length.eq(0), header.eq(0)]
                    m.next = "LENGTH"
            with m.State("LENGTH"):
                m.d.comb += cmd.ready.eq(1)
                with m.If(cmd.valid):
                    full = Signal.like(length)
                    m.d.comb += full.eq(length | (cmd.payload << (header * 8)))
                    m.d.sync += [length.eq(full), header.eq(header + 1)]
                    with m.If(header == LENGTH_BYTES - 1):
                        m.d.sync += [remaining.eq(full), byte_pos.eq(0), item.eq(0),
                                     addr.eq(0)]
                        m.next = "DECODE"
            with m.State("DECODE"):
                with m.Switch(opcode):
                    for op in Opcode:
                        with m.Case(op.value):
                            with m.If(length != self._lengths[op]):
                                m.d.sync += status.eq(Status.BAD_LENGTH)
                                m.next = "DISCARD"
                            with m.Else():
                                self._dispatch(m, op, target, item_bytes, loaded, finish)
                    with m.Default():
                        m.d.sync += status.eq(Status.UNKNOWN_OPCODE)
                        m.next = "DISCARD"
            with m.State("DISCARD"):
                with m.If(remaining == 0):
                    finish(status)
                with m.Else():
                    m.d.comb += cmd.ready.eq(1)
                    with m.If(cmd.valid):
                        m.d.sync += remaining.eq(remaining - 1)
            with m.State("PAYLOAD"):
                with m.If(remaining == 0):
                    with m.Switch(opcode):
                        for op in _LOADS:
                            with m.Case(op.value):
                                m.d.sync += loaded[op].eq(1)
                    finish(Status.OK)
                with m.Else():
                    m.d.comb += cmd.ready.eq(1)
                    with m.If(cmd.valid):
                        flush = (byte_pos == item_bytes - 1) | (remaining == 1)
                        m.d.sync += [remaining.eq(remaining - 1), byte_pos.eq(byte_pos + 1),
                                     item.eq(assembled)]
                        with m.If(flush):
                            m.d.comb += [engine.host_write.en.eq(1),
                                         engine.host_write.target.eq(target),
                                         engine.host_write.addr.eq(addr),
                                         engine.host_write.data.eq(assembled)]
                            m.d.sync += [byte_pos.eq(0), item.eq(0), addr.eq(addr + 1)]
            with m.State("RUN"):
                m.d.comb += engine.start.eq(1)
                m.next = "RUNNING"
            with m.State("RUNNING"):
                with m.If(~engine.busy):
                    m.d.sync += loaded[Opcode.LOAD_IMAGE].eq(0)
                    finish(Status.OK)
            with m.State("STATUS"):
                m.d.comb += [rsp.valid.eq(1), rsp.payload.eq(status)]
                with m.If(rsp.ready):
                    m.d.sync += [phase.eq(0), mem_addr.eq(0)]
                    with m.If(status != Status.OK):
                        m.next = "OPCODE"
                    with m.Elif(opcode == Opcode.READ_STATUS):
                        m.d.sync += [out_word.eq(sticky), out_bytes.eq(1),
                                     sticky.eq(Status.OK)]
                        m.next = "SEND"
                    with m.Elif((opcode == Opcode.READ_RESULT)
                                | (opcode == Opcode.READ_COUNTERS)):
                        m.next = "NEXT"
                    with m.Else():
                        m.next = "OPCODE"
            with m.State("NEXT"):
                # What READ_RESULT / READ_COUNTERS send next.
                with m.If(opcode == Opcode.READ_COUNTERS):
                    m.d.sync += mem_target.eq(Target.LAYER_CYCLES)
                    with m.If(phase == 0):
                        m.d.sync += [out_word.eq(engine.total_cycles), out_bytes.eq(4),
                                     phase.eq(1)]
                        m.next = "SEND"
                    with m.Elif(phase == 1):
                        m.d.sync += [out_word.eq(engine.mac_cycles), out_bytes.eq(4),
                                     phase.eq(2)]
                        m.next = "SEND"
                    with m.Elif(mem_addr < len(self._layers)):
                        m.next = "MEMREAD"
                    with m.Else():
                        m.next = "OPCODE"
                with m.Else():
                    m.d.sync += mem_target.eq(engine.result_bank)
                    with m.If((phase == 0) & int(self.has_class_index)):
                        m.d.sync += [out_word.eq(engine.class_index), out_bytes.eq(1),
                                     phase.eq(2)]
                        m.next = "SEND"
                    with m.Elif(mem_addr < self.result_words):
                        m.next = "MEMREAD"
                    with m.Else():
                        m.next = "OPCODE"
            with m.State("MEMREAD"):      # host_read address held: data next cycle
                m.next = "MEMLATCH"
            with m.State("MEMLATCH"):
                m.d.sync += [out_word.eq(engine.host_read_data), mem_addr.eq(mem_addr + 1),
                             out_bytes.eq(Mux(opcode == Opcode.READ_COUNTERS, 4,
                                              self.result_word_bytes))]
                m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [rsp.valid.eq(1), rsp.payload.eq(out_word[:8])]
                with m.If(rsp.ready):
                    m.d.sync += [out_word.eq(out_word >> 8), out_bytes.eq(out_bytes - 1)]
                    with m.If(out_bytes == 1):
                        with m.If(opcode == Opcode.READ_STATUS):
                            m.next = "OPCODE"
                        with m.Else():
                            m.next = "NEXT"
        return m

    def _dispatch(self, m, op, target, item_bytes, loaded, finish):
        """DECODE for a well-formed command ``op``."""
        if op in _LOADS:
            m.d.sync += [target.eq(_LOADS[op]), item_bytes.eq(self._item_bytes[op])]
            m.next = "PAYLOAD"
        elif op is Opcode.RUN:
            ready = Const(1)
            for load in self.needed_loads:
                ready = ready & loaded[load]
            with m.If(ready):
                m.next = "RUN"
            with m.Else():
                finish(Status.NOT_LOADED)
        else:
            finish(Status.OK)

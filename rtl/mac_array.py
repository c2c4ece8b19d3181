"""The reconfigurable MAC array: one packed weight word times its activations, per cycle."""

import operator

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from nqe.model import contract
from nqe.model.spec import ACT_BITS

__all__ = ["MACArray"]


def _field_bounds(bits, lane_act_bits):
    """Smallest and largest product of one ``bits``-wide weight field with one lane activation.

    Any bit pattern counts, not only the legal codes: the adder tree then cannot wrap even on a
    word the contract forbids, so its width never depends on the loader having been right.
    """
    top_act = (1 << lane_act_bits) - 1
    if bits == 1:
        return -top_act, top_act
    return -(1 << (bits - 1)) * top_act, ((1 << (bits - 1)) - 1) * top_act


class MACArray(wiring.Component):
    """Dot product of one weight word with its activations, accumulated over a stream of words.

    Computes ``acc = sum(code[i] * act[i])`` exactly, over the words of one dot product (one output
    value of a layer), where ``code[i]`` are the signed weight codes of the word decoded by the
    integer contract (3b/2b two's complement, 1b field 1 = +1 and 0 = -1, first code in the least
    significant bits) and ``act[i]`` are unsigned activations.

    Latency: the dot product's sum appears on ``result`` 2 cycles after its ``last`` word is
    accepted. Throughput: one weight word a cycle, dot products back to back without a bubble.

    Products per cycle (``P = weight_word_bits // 3``, the generator's lane count):

    ============  ==========================  =====================
    weight width  products a cycle            with 48-bit words
    ============  ==========================  =====================
    3 bits        ``weight_word_bits // 3``   16
    2 bits        ``weight_word_bits // 2``   24
    1 bit         ``weight_word_bits``        48
    ============  ==========================  =====================

    Dataflow: output-stationary, one dot product at a time. The word's products are reduced by one
    adder tree into one accumulator, along the layer's fan-in. This matches the weight stream
    (:func:`nqe.model.memory_map.weight_stream`, OIHW C order): consecutive codes of a word are
    consecutive fan-in terms of the same output channel, so the array reads weights exactly once,
    in SRAM order, with no reordering buffer. Utilization consequences:

    * A word holding the end of one output channel and the start of the next (fan-in not a multiple
      of the codes per word) is presented once per channel it touches, with zero activations on
      the lanes of the other channel (a zero activation contributes an exact 0). Utilization is
      then ``fan_in / (codes_per_word * words_touched)`` per output channel; for example 3x3
      group-wise layers with 4 channels per group (fan-in 36) at 3 bits use 36 of 48 lane-cycles.
    * Zero padding of a convolution is a zero activation; it costs lane-cycles, never correctness.

    Reconfiguration is bit-sliced: every bit ``k`` of the weight word has one term unit, whatever
    the width. Its activation comes from lane ``k // weight_bits``, and the bit's two's-complement
    weight is applied by a shift and a negation: ``+1, +2, -4`` for the three bits of a 3b field,
    ``+1, -2`` for a 2b field, and for a 1b field the term is ``+a`` or ``-a``. The same
    ``weight_word_bits``-input adder tree serves all widths, so narrower weights cost nothing
    extra beyond a 3-to-1 activation multiplexer per bit. There are no multipliers.

    Wide activations (the stem's 8-bit image, the classifier's pooled sums) are digit-serial: each
    lane takes ``lane_act_bits`` (3) bits, an ``act_bits_max``-bit activation is split into
    ``digits = ceil(act_bits_max / lane_act_bits)`` digits, and the caller presents each weight word
    once per digit ``d`` with digit ``d`` of every activation (``(a >> (d * lane_act_bits)) &
    (2**lane_act_bits - 1)``); the array shifts that word's sum left by ``d * lane_act_bits`` before
    accumulating. An 8-bit layer therefore takes 3 cycles a word (16 exact 3b x 8b products per
    3 cycles at 48-bit words), and the lanes and the adder tree stay as narrow as for the 1-3 bit
    layers. Every partial sum is a sum of ``code * (part of a)`` terms, so it stays within the
    layer's accumulator bound and ``acc_bits`` from the spec suffices at every step.

    Parameters
    ----------
    weight_word_bits : int
        Width of a weight SRAM word (``spec.hardware.weight_word_bits``). Sets the lane count.
    act_bits_max : int
        Widest activation of any layer (8 for the image); sets :attr:`digits`.
    acc_bits : int
        Accumulator width: the widest ``Layer.acc_bits`` of the spec.
    lane_act_bits : int
        Activation bits a lane takes per cycle; by default the widest hidden activation (3).

    Members
    -------
    weight_bits : In(2)
        Weight width of the running layer: 1, 2 or 3 (any other value gives zero products).
        Sampled with each accepted word.
    input : In(stream.Signature(...))
        Always ready. ``weights``: the packed word; ``activations``: ``weight_word_bits`` lanes of
        ``lane_act_bits`` bits, lane ``i`` paired with code ``i`` (lanes beyond the word's code
        count are ignored); ``digit``: which activation digit this is (0 for activations of at most
        ``lane_act_bits`` bits); ``first``: this word starts a dot product (the accumulator is
        reloaded, not added to); ``last``: this word ends it.
    result : Out(stream.Signature(signed(acc_bits)))
        Always ready. One transfer per dot product: the exact sum.
    """

    LATENCY = 2

    def __init__(self, weight_word_bits, act_bits_max, acc_bits, *, lane_act_bits=max(ACT_BITS)):
        weight_word_bits = operator.index(weight_word_bits)
        act_bits_max = operator.index(act_bits_max)
        acc_bits = operator.index(acc_bits)
        lane_act_bits = operator.index(lane_act_bits)
        if weight_word_bits < max(contract.WEIGHT_BITS):
            raise ValueError(f"weight_word_bits must be at least {max(contract.WEIGHT_BITS)} "
                             f"(one 3-bit code), got {weight_word_bits}")
        if lane_act_bits < 1:
            raise ValueError(f"lane_act_bits must be a positive integer, got {lane_act_bits}")
        if act_bits_max < 1:
            raise ValueError(f"act_bits_max must be a positive integer, got {act_bits_max}")
        if acc_bits < 2:
            raise ValueError(f"acc_bits must be at least 2 (a signed sum), got {acc_bits}")
        self._weight_word_bits = weight_word_bits
        self._act_bits_max = act_bits_max
        self._acc_bits = acc_bits
        self._lane_act_bits = lane_act_bits
        super().__init__({
            "weight_bits": In(2),
            "input": In(stream.Signature(self.input_layout, always_ready=True)),
            "result": Out(stream.Signature(signed(acc_bits), always_ready=True)),
        })

    @classmethod
    def from_spec(cls, spec):
        """The array a spec needs: word width from its hardware, widths from its layers."""
        layers = [layer for layer in spec.layers() if layer.has_weights]
        return cls(spec.hardware.weight_word_bits,
                   act_bits_max=max(layer.in_bits for layer in layers),
                   acc_bits=max(layer.acc_bits for layer in layers))

    @property
    def weight_word_bits(self):
        return self._weight_word_bits

    @property
    def act_bits_max(self):
        return self._act_bits_max

    @property
    def acc_bits(self):
        return self._acc_bits

    @property
    def lane_act_bits(self):
        return self._lane_act_bits

    @property
    def lanes(self):
        """``P``: products a cycle at 3-bit weights."""
        return self._weight_word_bits // 3

    @property
    def digits(self):
        """Cycles a word takes for an ``act_bits_max``-bit activation."""
        return -(-self._act_bits_max // self._lane_act_bits)

    def products_per_cycle(self, weight_bits):
        return contract.codes_per_word(weight_bits, self._weight_word_bits)

    def cycles_per_word(self, in_bits):
        """Cycles one weight word takes at ``in_bits``-bit activations (digit-serial beyond the
        lane width)."""
        return -(-operator.index(in_bits) // self._lane_act_bits)

    @property
    def input_layout(self):
        return data.StructLayout({
            "weights": unsigned(self._weight_word_bits),
            "activations": data.ArrayLayout(unsigned(self._lane_act_bits),
                                            self._weight_word_bits),
            "digit": range(self.digits),
            "first": 1,
            "last": 1,
        })

    @property
    def tree_bits(self):
        """Width of one word's sum: the worst case over the three weight widths."""
        lo = hi = 0
        for bits in contract.WEIGHT_BITS:
            field_lo, field_hi = _field_bounds(bits, self._lane_act_bits)
            count = self._weight_word_bits // bits
            lo, hi = min(lo, count * field_lo), max(hi, count * field_hi)
        return contract.signed_bits(lo, hi)

    def elaborate(self, platform):
        m = Module()
        word_bits, act_bits = self._weight_word_bits, self._lane_act_bits
        weights = self.input.payload.weights
        acts = self.input.payload.activations

        # One term per weight bit: the bit's share of its field's product with its lane's
        # activation. In a two's-complement field bit p weighs 2**p, the top bit negatively; a 1b
        # field is +1 or -1 whole. A term is bounded by its whole field's product.
        field_bounds = [_field_bounds(bits, act_bits) for bits in contract.WEIGHT_BITS]
        term_bits = contract.signed_bits(min(lo for lo, _ in field_bounds),
                                         max(hi for _, hi in field_bounds))
        terms = []
        for k in range(word_bits):
            term = Signal(signed(term_bits), name=f"term{k}")
            bit = weights[k]
            with m.Switch(self.weight_bits):
                for bits in contract.WEIGHT_BITS:
                    if k >= bits * (word_bits // bits):
                        continue            # padding past the word's last whole field
                    lane, position = divmod(k, bits)
                    a = acts[lane]
                    with m.Case(bits):
                        if bits == 1:
                            m.d.comb += term.eq(Mux(bit, a, -a))
                        else:
                            scaled = a << position
                            m.d.comb += term.eq(
                                Mux(bit, -scaled if position == bits - 1 else scaled, 0))
            terms.append(term)

        # Balanced adder tree; Amaranth widens each sum, the register keeps the proven width.
        level = terms
        while len(level) > 1:
            pairs = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)]
            level = pairs + ([level[-1]] if len(level) % 2 else [])
        word_sum = Signal(signed(self.tree_bits))
        digit = Signal.like(self.input.payload.digit)
        first = Signal()
        last = Signal()
        valid = Signal()
        m.d.sync += [
            word_sum.eq(level[0]),
            digit.eq(self.input.payload.digit),
            first.eq(self.input.payload.first),
            last.eq(self.input.payload.last),
            valid.eq(self.input.valid),
        ]

        # Digit-serial wide activations: digit d weighs 2**(d * lane_act_bits).
        shifted = Signal(signed(self.tree_bits + act_bits * (self.digits - 1)))
        with m.Switch(digit):
            for d in range(self.digits):
                with m.Case(d):
                    m.d.comb += shifted.eq(word_sum << (d * act_bits))

        acc = Signal(signed(self._acc_bits))
        with m.If(valid):
            m.d.sync += acc.eq(Mux(first, 0, acc) + shifted)
        m.d.sync += self.result.valid.eq(valid & last)
        m.d.comb += self.result.payload.eq(acc)
        return m

"""The reconfigurable MAC array: one packed weight word a cycle, one code per lane, each lane
accumulating its own dot product."""

import operator

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from nqe.model import contract
from nqe.model.memory_map import layer_tiling

__all__ = ["MACArray"]


def _field_bounds(bits, act_bits):
    """Smallest and largest product of one ``bits``-wide weight field with one activation.

    Any bit pattern counts, not only the legal codes: the accumulators then cannot wrap even on a
    word the contract forbids, so their width never depends on the loader having been right.
    """
    top_act = (1 << act_bits) - 1
    if bits == 1:
        return -top_act, top_act
    return -(1 << (bits - 1)) * top_act, ((1 << (bits - 1)) - 1) * top_act


class MACArray(wiring.Component):
    """``lanes`` dot products at once, one per output channel, each over a stream of words.

    Lane ``j`` computes ``acc[j] = sum(code_j * act_j)`` exactly, over the words of one tile (the
    ``first`` word to the ``last``), where ``code_j`` is code ``j`` of the word decoded by the
    integer contract (3b/2b two's complement, 1b field 1 = +1 and 0 = -1, first code in the least
    significant bits) and ``act_j`` is lane ``j``'s unsigned activation that cycle.

    Latency: the lanes' sums appear on ``result`` 2 cycles after the ``last`` word is accepted, for
    one cycle (the next tile's ``first`` word may follow the ``last`` directly: no bubble).
    Throughput: one weight word a cycle.

    Products per cycle (the word's codes, capped by ``lanes``; by default ``lanes`` is
    ``weight_word_bits``, so nothing caps them; ``from_spec`` gives nqe-1mb 24 lanes, enough
    for its widest tile, so its 1-bit pooling runs 16 groups a cycle, not 48):

    ============  ===================================  =====================
    weight width  products a cycle                     with 48-bit words
    ============  ===================================  =====================
    3 bits        ``min(lanes, weight_word_bits // 3)``  16
    2 bits        ``min(lanes, weight_word_bits // 2)``  24
    1 bit         ``min(lanes, weight_word_bits)``       48
    ============  ===================================  =====================

    Dataflow: output-stationary over a tile of output channels (:class:`~nqe.model.memory_map.
    Tiling`): each cycle brings one fan-in term of every lane's output channel, so the weight
    stream (:func:`~nqe.model.memory_map.weight_stream`) is read once, in SRAM order, and lane
    ``j`` always takes code ``j``: there is no crossbar between the weight word and the lanes,
    and a word never straddles two dot products. Each lane has its own accumulator.

    Reconfiguration: a lane's product is shift-and-add on its field's bits (``+1, +2, -4`` for
    the three bits of a 3b field, ``+1, -2`` for a 2b field, ``+a`` or ``-a`` for a 1b field),
    chosen by ``weight_bits``. There are no multipliers. Activations are taken whole (``act_bits``:
    8 for the image, the pooled sums' width for the classifier), so wide-input layers run at the
    same one word a cycle as the 1-3 bit layers.

    Parameters
    ----------
    weight_word_bits : int
        Width of a weight SRAM word (``spec.hardware.weight_word_bits``).
    act_bits : int
        Widest activation of any layer.
    acc_bits : int
        Accumulator width: the widest accumulator of the spec.
    lanes : int
        Accumulators (``weight_word_bits`` by default); :meth:`from_spec` sizes them to the most
        lanes any tile of the spec fills.

    Members
    -------
    weight_bits : In(2)
        Weight width of the running layer: 1, 2 or 3 (any other value gives zero products).
        Sampled with each accepted word.
    input : In(stream.Signature(...))
        Always ready. ``weights``: the packed word; ``activations``: ``lanes`` activations of
        ``act_bits`` bits, lane ``j`` paired with code ``j`` (lanes beyond the word's code count
        are ignored); ``first``: this word starts the lanes' dot products (the accumulators are
        reloaded, not added to); ``last``: this word ends them.
    result : Out(stream.Signature(data.ArrayLayout(signed(acc_bits), lanes)))
        Always ready. One transfer per tile: every lane's exact sum.
    """

    LATENCY = 2

    def __init__(self, weight_word_bits, act_bits, acc_bits, *, lanes=None):
        weight_word_bits = operator.index(weight_word_bits)
        act_bits = operator.index(act_bits)
        acc_bits = operator.index(acc_bits)
        lanes = weight_word_bits if lanes is None else operator.index(lanes)
        if weight_word_bits < max(contract.WEIGHT_BITS):
            raise ValueError(f"weight_word_bits must be at least {max(contract.WEIGHT_BITS)} "
                             f"(one 3-bit code), got {weight_word_bits}")
        if act_bits < 1:
            raise ValueError(f"act_bits must be a positive integer, got {act_bits}")
        if acc_bits < 2:
            raise ValueError(f"acc_bits must be at least 2 (a signed sum), got {acc_bits}")
        if not 1 <= lanes <= weight_word_bits:
            raise ValueError(f"lanes must be 1..weight_word_bits ({weight_word_bits}), got "
                             f"{lanes}")
        self._weight_word_bits = weight_word_bits
        self._act_bits = act_bits
        self._acc_bits = acc_bits
        self._lanes = lanes
        super().__init__({
            "weight_bits": In(2),
            "input": In(stream.Signature(self.input_layout, always_ready=True)),
            "result": Out(stream.Signature(data.ArrayLayout(signed(acc_bits), lanes),
                                           always_ready=True)),
        })

    @classmethod
    def from_spec(cls, spec):
        """The array a spec needs: word width from its hardware, activation and accumulator
        widths from its layers, one lane per output channel of the widest tile."""
        layers = spec.layers()
        lanes, acc = 1, 2
        for layer in layers:
            tiling = layer_tiling(layer, spec.hardware)
            lanes = max(lanes, tiling.lanes)
            # Pooling sums fan_in activations with all-ones weights.
            acc = max(acc, layer.acc_bits if layer.has_weights else
                      contract.signed_bits(0, tiling.fan_in * ((1 << layer.in_bits) - 1)))
        return cls(spec.hardware.weight_word_bits,
                   act_bits=max(layer.in_bits for layer in layers), acc_bits=acc, lanes=lanes)

    @property
    def weight_word_bits(self):
        return self._weight_word_bits

    @property
    def act_bits(self):
        return self._act_bits

    @property
    def acc_bits(self):
        return self._acc_bits

    @property
    def lanes(self):
        return self._lanes

    def products_per_cycle(self, weight_bits):
        return min(self._lanes, contract.codes_per_word(weight_bits, self._weight_word_bits))

    @property
    def input_layout(self):
        return data.StructLayout({
            "weights": unsigned(self._weight_word_bits),
            "activations": data.ArrayLayout(unsigned(self._act_bits), self._lanes),
            "first": 1,
            "last": 1,
        })

    @property
    def product_bits(self):
        """Width of one lane's product: the worst case over the three weight widths."""
        lo = min(_field_bounds(bits, self._act_bits)[0] for bits in contract.WEIGHT_BITS)
        hi = max(_field_bounds(bits, self._act_bits)[1] for bits in contract.WEIGHT_BITS)
        return contract.signed_bits(lo, hi)

    def elaborate(self, platform):
        m = Module()
        word_bits = self._weight_word_bits
        weights = self.input.payload.weights
        acts = self.input.payload.activations

        # Stage 1: each lane's product, shift-and-add on its field's bits (two's complement: bit
        # p weighs 2**p, the top bit negatively; a 1b field is +1 or -1 whole).
        products = []
        for lane in range(self._lanes):
            a = acts[lane]
            product = Signal(signed(self.product_bits), name=f"product{lane}")
            with m.Switch(self.weight_bits):
                for bits in contract.WEIGHT_BITS:
                    if (lane + 1) * bits > word_bits:
                        continue            # this lane has no field at this width
                    field = weights[lane * bits:(lane + 1) * bits]
                    with m.Case(bits):
                        if bits == 1:
                            m.d.sync += product.eq(Mux(field[0], a, -a))
                        else:
                            terms = [Mux(field[p], (-(a << p)) if p == bits - 1 else (a << p), 0)
                                     for p in range(bits)]
                            m.d.sync += product.eq(sum(terms[1:], terms[0]))
                with m.Default():
                    m.d.sync += product.eq(0)
            products.append(product)
        first = Signal()
        last = Signal()
        valid = Signal()
        m.d.sync += [first.eq(self.input.payload.first), last.eq(self.input.payload.last),
                     valid.eq(self.input.valid)]

        # Stage 2: accumulate.
        with m.If(valid):
            for lane, product in enumerate(products):
                acc = self.result.payload[lane]
                m.d.sync += acc.eq(Mux(first, 0, acc) + product)
        m.d.sync += self.result.valid.eq(valid & last)
        return m

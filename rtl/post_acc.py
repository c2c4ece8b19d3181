"""The post-accumulation unit: BSN, HWMSB and the residual joins, one pipelined unit for all
layers."""

import operator

from amaranth import *
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from nqe.model.spec import LayerKind, Residual

__all__ = ["PostAccMode", "PostAcc"]


class PostAccMode(enum.Enum, shape=3):
    """What the unit does after ``y = (acc + bias) >> shift`` (see :mod:`nqe.model.contract`)."""
    ACTIVATE = 0   # hwmsb(y, out_bits)
    ADD = 1        # residual_add(y, skip, out_bits)
    MUX = 2        # residual_mux(y, skip, select, out_bits, skip_bits)
    OR = 3         # residual_or(y, skip)
    LOGIT = 4      # classifier: acc + bias, no shift, no clamp

    @classmethod
    def for_layer(cls, layer):
        """The mode that computes ``layer``'s output (a :class:`~nqe.model.spec.Layer`)."""
        if layer.kind is LayerKind.CLASSIFIER:
            return cls.LOGIT
        if not layer.has_bsn:
            raise ValueError(f"layer {layer.name!r} ({layer.kind.value}) has no "
                             f"post-accumulation step")
        return {Residual.NONE: cls.ACTIVATE, Residual.ADD: cls.ADD, Residual.MUX: cls.MUX,
                Residual.OR: cls.OR}[layer.residual]


class PostAcc(wiring.Component):
    """Bias add, arithmetic shift right (BSN, floor), HWMSB clamp and residual join.

    For each accumulator value, according to ``mode``:

    * ``ACTIVATE``: ``clamp((acc + bias) >> shift, 0, 2**out_bits - 1)``
    * ``ADD``: ``clamp(((acc + bias) >> shift) + skip, 0, 2**out_bits - 1)`` (saturating)
    * ``MUX``: ``skip >> (skip_bits - out_bits)`` where ``select`` is 1, else as ``ACTIVATE``
    * ``OR``: ``clamp((acc + bias) >> shift, 0, 1) | skip`` (binary activations)
    * ``LOGIT``: ``acc + bias`` (the classifier's logits; ``shift`` and ``out_bits`` ignored)

    exactly as :mod:`nqe.model.contract` (``bsn``, ``hwmsb``, ``residual_add``, ``residual_mux``,
    ``residual_or``) defines them. There are no multipliers: an adder, a barrel shifter, a second
    adder and a comparator-based clamp.

    Latency: 3 cycles from an accepted input to its output (stage 1 adds the bias, stage 2 shifts,
    stage 3 joins the residual and clamps). Throughput: one value a cycle, no stalls.

    One unit serves all layers: widths are constructor parameters (the maxima over a spec's
    layers, see :meth:`from_spec`); the layer's ``mode``, ``shift``, ``out_bits`` and
    ``skip_bits`` are run-time inputs, sampled together with each accepted value, so a layer
    change may follow the previous layer's last value on the next cycle.

    The contract's ranges are the caller's to keep (the weights loader checks them): ``acc + bias``
    fits ``sum_bits``, ``shift`` is at most ``max_shift``, ``MUX`` needs ``skip_bits >= out_bits``
    and ``OR`` needs binary activations.

    Parameters
    ----------
    acc_bits, bias_bits, sum_bits : int
        Widths of the accumulator, of a bias and of ``acc + bias`` (the widest ``Layer.acc_bits``,
        ``Layer.bias_bits``, ``Layer.sum_bits`` of the spec).
    max_shift : int
        Largest BSN shift (the widest ``Layer.max_shift``).
    out_bits_max : int
        Widest output activation.
    skip_bits_max : int
        Widest skip activation (at least 1).

    Members
    -------
    mode : In(PostAccMode)
    shift : In(range(max_shift + 1))
    out_bits : In(range(out_bits_max + 1))
    skip_bits : In(range(skip_bits_max + 1))
        The running layer's configuration; sampled with each accepted value.
    input : In(stream.Signature(...))
        Always ready. ``acc``: the accumulator; ``bias``: its channel's bias; ``skip``: the skip
        activation (residual modes); ``select``: its channel's mux select bit (``MUX``).
    output : Out(stream.Signature(signed(value_bits)))
        Always ready. The activation (``0 .. 2**out_bits - 1``) or, in ``LOGIT`` mode, the logit.
    """

    LATENCY = 3

    def __init__(self, *, acc_bits, bias_bits, sum_bits, max_shift, out_bits_max, skip_bits_max):
        widths = {"acc_bits": acc_bits, "bias_bits": bias_bits, "sum_bits": sum_bits,
                  "max_shift": max_shift, "out_bits_max": out_bits_max,
                  "skip_bits_max": skip_bits_max}
        for name, value in widths.items():
            value = operator.index(value)
            smallest = 0 if name == "max_shift" else 1
            if value < smallest:
                raise ValueError(f"{name} must be an integer of at least {smallest}, got {value}")
            widths[name] = value
        if widths["sum_bits"] < 2:
            raise ValueError(f"sum_bits must be at least 2 (a signed sum), got {sum_bits}")
        self._widths = widths
        super().__init__({
            "mode": In(PostAccMode),
            "shift": In(range(widths["max_shift"] + 1)),
            "out_bits": In(range(widths["out_bits_max"] + 1)),
            "skip_bits": In(range(widths["skip_bits_max"] + 1)),
            "input": In(stream.Signature(self.input_layout, always_ready=True)),
            "output": Out(stream.Signature(signed(self.value_bits), always_ready=True)),
        })

    @staticmethod
    def widths_from_spec(spec):
        """The constructor's widths for ``spec``: each the maximum over its layers."""
        layers = [layer for layer in spec.layers() if layer.has_weights]
        bsn_layers = [layer for layer in layers if layer.has_bsn]
        return dict(acc_bits=max(layer.acc_bits for layer in layers),
                    bias_bits=max(layer.bias_bits for layer in layers),
                    sum_bits=max(layer.sum_bits for layer in layers),
                    max_shift=max((layer.max_shift for layer in bsn_layers), default=0),
                    out_bits_max=max((layer.out_bits for layer in bsn_layers), default=1),
                    skip_bits_max=max([layer.skip_bits for layer in layers] + [1]))

    @classmethod
    def from_spec(cls, spec):
        """The unit a spec needs."""
        return cls(**cls.widths_from_spec(spec))

    @property
    def acc_bits(self):
        return self._widths['acc_bits']

    @property
    def bias_bits(self):
        return self._widths['bias_bits']

    @property
    def sum_bits(self):
        return self._widths['sum_bits']

    @property
    def max_shift(self):
        return self._widths['max_shift']

    @property
    def out_bits_max(self):
        return self._widths['out_bits_max']

    @property
    def skip_bits_max(self):
        return self._widths['skip_bits_max']

    @property
    def value_bits(self):
        """Output width: a logit (``sum_bits``) or a non-negative activation."""
        return max(self._widths["sum_bits"], self._widths["out_bits_max"] + 1)

    @property
    def input_layout(self):
        w = self._widths
        return data.StructLayout({
            "acc": signed(w["acc_bits"]),
            "bias": signed(w["bias_bits"]),
            "skip": unsigned(w["skip_bits_max"]),
            "select": 1,
        })

    def elaborate(self, platform):
        m = Module()
        w = self._widths
        payload = self.input.payload

        # Stage 1: bias add; the layer's configuration travels with its value.
        s1_sum = Signal(signed(w["sum_bits"]))
        s1_mode = Signal(PostAccMode)
        s1_shift = Signal.like(self.shift)
        s1_out_bits = Signal.like(self.out_bits)
        s1_skip_bits = Signal.like(self.skip_bits)
        s1_skip = Signal.like(payload.skip)
        s1_select = Signal()
        s1_valid = Signal()
        m.d.sync += [
            s1_sum.eq(payload.acc + payload.bias),
            s1_mode.eq(self.mode),
            s1_shift.eq(self.shift),
            s1_out_bits.eq(self.out_bits),
            s1_skip_bits.eq(self.skip_bits),
            s1_skip.eq(payload.skip),
            s1_select.eq(payload.select),
            s1_valid.eq(self.input.valid),
        ]

        # Stage 2: BSN shift (>> of a signed value is arithmetic, i.e. floor), and the
        # run-time constants of stage 3: the clamp's top and the mux's rescaled skip.
        s2_y = Signal(signed(w["sum_bits"]))
        s2_top = Signal(w["out_bits_max"])
        s2_skip = Signal.like(s1_skip)
        s2_skip_rescaled = Signal.like(s1_skip)
        s2_mode = Signal(PostAccMode)
        s2_select = Signal()
        s2_valid = Signal()
        skip_drop = Signal(range(w["skip_bits_max"] + 1))
        m.d.comb += skip_drop.eq(s1_skip_bits - s1_out_bits)
        shift = Mux(s1_mode == PostAccMode.LOGIT, 0, s1_shift)
        top = Mux(s1_mode == PostAccMode.OR, 1, (Const(1, 1) << s1_out_bits) - 1)
        m.d.sync += [
            s2_y.eq(s1_sum >> shift),
            s2_top.eq(top),
            s2_skip.eq(s1_skip),
            s2_skip_rescaled.eq(s1_skip >> skip_drop),
            s2_mode.eq(s1_mode),
            s2_select.eq(s1_select),
            s2_valid.eq(s1_valid),
        ]

        # Stage 3: residual add before the one clamp, then the join.
        joined = Signal(signed(w["sum_bits"] + 1))
        m.d.comb += joined.eq(s2_y + Mux(s2_mode == PostAccMode.ADD, s2_skip, 0))
        clamped = Signal(w["out_bits_max"])
        with m.If(joined < 0):
            m.d.comb += clamped.eq(0)
        with m.Elif(joined > s2_top):
            m.d.comb += clamped.eq(s2_top)
        with m.Else():
            m.d.comb += clamped.eq(joined)
        value = Signal.like(self.output.payload)
        with m.Switch(s2_mode):
            with m.Case(PostAccMode.LOGIT):
                m.d.comb += value.eq(s2_y)
            with m.Case(PostAccMode.MUX):
                m.d.comb += value.eq(Mux(s2_select, s2_skip_rescaled, clamped))
            with m.Case(PostAccMode.OR):
                m.d.comb += value.eq(clamped | s2_skip)
            with m.Default():
                m.d.comb += value.eq(clamped)
        m.d.sync += [
            self.output.payload.eq(value),
            self.output.valid.eq(s2_valid),
        ]
        return m

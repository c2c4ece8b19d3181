"""The network spec: one validated, immutable description that every stage reads.

A spec is written as a small JSON document (see ``model/specs/nqe-1mb.json``) or built in Python.
:func:`load_spec` validates it once; errors name the file, the block or layer, and the field.
:meth:`NetworkSpec.layers` flattens it into :class:`Layer` records whose every shape, width and
bound is derived here from the integer contract, so no later stage re-derives one by hand.

Layer sequence of a spec::

    stem (k x k conv on the 8-bit image)
    blocks: pw1 (1x1, expand) -> gw (3x3 group-wise, stride) -> pw2 (1x1, project) [+ residual]
    bottleneck (optional; 1x1 conv to binary code bits)
    pool (global sum) -> classifier (integer logits)       (optional head)
"""

import dataclasses
import enum
import json
from dataclasses import dataclass
from pathlib import Path

from . import contract
from .contract import Residual

__all__ = ["SpecError", "LayerKind", "Residual", "Hardware", "StemSpec", "BlockSpec",
           "BottleneckSpec", "HeadSpec", "NetworkSpec", "Layer", "load_spec", "builtin_specs",
           "spec_from_dict"]

SPEC_DIR = Path(__file__).parent / "specs"
ACT_BITS = (1, 2, 3)
DEFAULT_BUDGET_BITS = 1 << 20


class SpecError(ValueError):
    """The spec is invalid; the message names the file, block/layer and field."""


class LayerKind(enum.Enum):
    STEM = "stem"
    POINTWISE = "pointwise"
    GROUPWISE = "groupwise"
    BOTTLENECK = "bottleneck"
    POOL = "pool"
    CLASSIFIER = "classifier"


@dataclass(frozen=True)
class Hardware:
    """Generator parameters shared by the memory map and the RTL (the one config, Gemmini-style)."""
    weight_word_bits: int = 48   # 16 x 3b, 24 x 2b or 48 x 1b codes per weight word
    lanes: int = 16              # = weight_word_bits // 3: 3b products a cycle (2b: x1.5, 1b: x3)


@dataclass(frozen=True)
class StemSpec:
    out_channels: int
    kernel: int = 3
    stride: int = 1
    weight_bits: int = 3
    act_bits: int = 2


@dataclass(frozen=True)
class BlockSpec:
    """pointwise (expand) -> group-wise 3x3 (stride) -> pointwise (project), optional residual."""
    name: str
    expand: int
    out_channels: int
    groups: int
    stride: int = 1
    residual: Residual = Residual.NONE
    weight_bits: tuple = (2, 2, 2)      # pw1, gw, pw2
    act_bits: tuple = (2, 2, 2)         # outputs of pw1, gw, pw2
    pw_groups: tuple = (1, 1)           # group counts of pw1, pw2
    shift_sharing: str = "block"        # "block": one BSN shift for the three layers; "layer"


@dataclass(frozen=True)
class BottleneckSpec:
    """1x1 conv to binary activations: the code bits of the compression task."""
    out_channels: int
    weight_bits: int = 2


@dataclass(frozen=True)
class HeadSpec:
    num_classes: int = 10
    weight_bits: int = 3


@dataclass(frozen=True)
class Layer:
    """One layer as every stage sees it; all fields derived from the spec and the contract."""
    index: int
    name: str
    kind: LayerKind
    in_channels: int
    out_channels: int
    groups: int
    kernel: int
    stride: int
    padding: int
    in_height: int
    in_width: int
    out_height: int
    out_width: int
    in_bits: int              # activation bits read (8 for the image, pool bits for the head)
    out_bits: int             # activation bits written (0 for the classifier: signed logits)
    weight_bits: int          # 0 for pooling
    shift_group: str          # "" where no BSN applies (pool, classifier)
    residual: Residual
    residual_source: str      # name of the layer whose *input* is the skip path, or ""
    skip_bits: int            # bits of the skip activation (0 without residual)

    @property
    def fan_in(self):
        return (self.in_channels // self.groups) * self.kernel * self.kernel

    @property
    def weight_shape(self):
        return (self.out_channels, self.in_channels // self.groups, self.kernel, self.kernel)

    @property
    def weight_count(self):
        return self.out_channels * self.fan_in if self.weight_bits else 0

    @property
    def has_weights(self):
        return self.kind is not LayerKind.POOL

    @property
    def has_bsn(self):
        return bool(self.shift_group)

    @property
    def macs(self):
        return self.weight_count * self.out_height * self.out_width

    @property
    def acc_bound(self):
        """Largest |accumulator| (contract.accumulator_bound)."""
        if not self.has_weights:
            return 0
        return contract.accumulator_bound(self.fan_in, self.weight_bits, self.in_bits)

    @property
    def acc_bits(self):
        return contract.signed_bits(-self.acc_bound, self.acc_bound)

    @property
    def max_shift(self):
        return contract.max_shift(self.acc_bound) if self.has_bsn else 0

    @property
    def residual_reach(self):
        return (1 << self.out_bits) - 1 if self.residual is Residual.ADD else 0

    def bias_bounds(self, shift):
        if self.kind is LayerKind.CLASSIFIER:
            return contract.classifier_bias_bounds(self.acc_bound)
        return contract.bias_bounds(self.acc_bound, shift, self.out_bits, self.residual_reach)

    @property
    def bias_bits(self):
        """Storage width of a bias: covers the bias range at the largest legal shift."""
        lo, hi = self.bias_bounds(self.max_shift)
        return contract.signed_bits(lo, hi)

    @property
    def sum_bits(self):
        """Width of acc + bias: the post-accumulation adder."""
        lo, hi = self.bias_bounds(self.max_shift)
        return contract.signed_bits(lo - self.acc_bound, hi + self.acc_bound)

    @property
    def out_fmap_bits(self):
        """Bits of the output feature map as an activation buffer holds it."""
        bits = self.out_bits if self.out_bits else self.sum_bits
        return self.out_channels * self.out_height * self.out_width * bits

    @property
    def in_fmap_bits(self):
        return self.in_channels * self.in_height * self.in_width * self.in_bits


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    stem: StemSpec
    blocks: tuple
    input_channels: int = 3
    input_height: int = 32
    input_width: int = 32
    bottleneck: BottleneckSpec | None = None
    head: HeadSpec | None = HeadSpec()
    hardware: Hardware = Hardware()
    budget_bits: int = DEFAULT_BUDGET_BITS
    source: str = dataclasses.field(default="", compare=False)   # for error messages only

    def __post_init__(self):
        _validate(self)

    def layers(self):
        """The flattened layer list (cached: the spec is immutable)."""
        cached = self.__dict__.get("_layers")
        if cached is None:
            cached = tuple(_flatten(self))
            object.__setattr__(self, "_layers", cached)
        return cached

    def layer(self, name):
        for layer in self.layers():
            if layer.name == name:
                return layer
        raise KeyError(f"spec {self.name!r} has no layer {name!r}")

    def shift_groups(self):
        """Ordered mapping: shift group name -> names of the layers sharing that BSN shift."""
        groups = {}
        for layer in self.layers():
            if layer.has_bsn:
                groups.setdefault(layer.shift_group, []).append(layer.name)
        return {k: tuple(v) for k, v in groups.items()}

    @property
    def num_classes(self):
        return self.head.num_classes if self.head else 0

    @property
    def macs(self):
        return sum(layer.macs for layer in self.layers())

    def to_dict(self):
        return _to_jsonable(self)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


# --------------------------------------------------------------------------------------------
# flattening


def _flatten(spec):
    h, w = spec.input_height, spec.input_width
    stem = spec.stem
    index = 0

    def conv(name, kind, cin, cout, groups, kernel, stride, in_bits, out_bits, wbits, shift_group,
             residual=Residual.NONE, residual_source="", skip_bits=0):
        nonlocal h, w, index
        pad = kernel // 2
        oh = (h + 2 * pad - kernel) // stride + 1
        ow = (w + 2 * pad - kernel) // stride + 1
        layer = Layer(index, name, kind, cin, cout, groups, kernel, stride, pad, h, w, oh, ow,
                      in_bits, out_bits, wbits, shift_group, residual, residual_source, skip_bits)
        h, w, index = oh, ow, index + 1
        return layer

    yield conv("stem", LayerKind.STEM, spec.input_channels, stem.out_channels, 1, stem.kernel,
               stem.stride, contract.IMAGE_BITS, stem.act_bits, stem.weight_bits, "stem")
    channels, bits = stem.out_channels, stem.act_bits
    for block in spec.blocks:
        def group(part):
            return block.name if block.shift_sharing == "block" else f"{block.name}.{part}"
        yield conv(f"{block.name}.pw1", LayerKind.POINTWISE, channels, block.expand,
                   block.pw_groups[0], 1, 1, bits, block.act_bits[0], block.weight_bits[0],
                   group("pw1"))
        yield conv(f"{block.name}.gw", LayerKind.GROUPWISE, block.expand, block.expand,
                   block.groups, 3, block.stride, block.act_bits[0], block.act_bits[1],
                   block.weight_bits[1], group("gw"))
        has_skip = block.residual is not Residual.NONE
        yield conv(f"{block.name}.pw2", LayerKind.POINTWISE, block.expand, block.out_channels,
                   block.pw_groups[1], 1, 1, block.act_bits[1], block.act_bits[2],
                   block.weight_bits[2], group("pw2"), block.residual,
                   f"{block.name}.pw1" if has_skip else "", bits if has_skip else 0)
        channels, bits = block.out_channels, block.act_bits[2]
    if spec.bottleneck:
        yield conv("bottleneck", LayerKind.BOTTLENECK, channels, spec.bottleneck.out_channels, 1,
                   1, 1, bits, 1, spec.bottleneck.weight_bits, "bottleneck")
        channels, bits = spec.bottleneck.out_channels, 1
    if spec.head:
        pool_bits = contract.unsigned_bits(h * w * ((1 << bits) - 1))
        pool = Layer(index, "pool", LayerKind.POOL, channels, channels, channels, 0, 1, 0, h, w,
                     1, 1, bits, pool_bits, 0, "", Residual.NONE, "", 0)
        yield pool
        h = w = 1
        index += 1
        yield conv("classifier", LayerKind.CLASSIFIER, channels, spec.head.num_classes, 1, 1, 1,
                   pool_bits, 0, spec.head.weight_bits, "")


# --------------------------------------------------------------------------------------------
# validation


def _fail(spec, where, message):
    origin = f"{spec.source}: " if spec.source else ""
    raise SpecError(f"{origin}spec {spec.name!r}, {where}: {message}")


def _check_positive(spec, where, field, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(spec, where, f"field '{field}' must be a positive integer, got {value!r}")


def _check_choice(spec, where, field, value, choices, what):
    if value not in choices:
        _fail(spec, where, f"field '{field}': {what} {value!r} is not supported "
                           f"(expected one of {', '.join(map(str, choices))})")


def _validate(spec):
    if not spec.name or not isinstance(spec.name, str):
        _fail(spec, "top level", "field 'name' must be a non-empty string")
    for field in ("input_channels", "input_height", "input_width", "budget_bits"):
        _check_positive(spec, "top level", field, getattr(spec, field))
    hw = spec.hardware
    _check_positive(spec, "hardware", "weight_word_bits", hw.weight_word_bits)
    _check_positive(spec, "hardware", "lanes", hw.lanes)
    if hw.weight_word_bits < 3:
        _fail(spec, "hardware", f"field 'weight_word_bits' must be at least 3, got "
                                f"{hw.weight_word_bits}")
    if hw.lanes != hw.weight_word_bits // 3:
        # The MAC array takes one weight word a cycle: its lane count is the word's 3b codes.
        _fail(spec, "hardware", f"field 'lanes' must be weight_word_bits // 3 = "
                                f"{hw.weight_word_bits // 3} (3-bit products a cycle), got "
                                f"{hw.lanes}")

    stem = spec.stem
    for field in ("out_channels", "kernel", "stride"):
        _check_positive(spec, "stem", field, getattr(stem, field))
    if stem.kernel % 2 == 0:
        _fail(spec, "stem", f"field 'kernel' must be odd (same padding), got {stem.kernel}")
    _check_choice(spec, "stem", "weight_bits", stem.weight_bits, contract.WEIGHT_BITS,
                  "weight width")
    _check_choice(spec, "stem", "act_bits", stem.act_bits, ACT_BITS, "activation width")

    if not spec.blocks and not spec.head and not spec.bottleneck:
        _fail(spec, "top level", "the network needs at least one of 'blocks', 'bottleneck', "
                                 "'head'")
    names = set()
    channels, bits = stem.out_channels, stem.act_bits
    h, w = spec.input_height // stem.stride, spec.input_width // stem.stride
    for number, block in enumerate(spec.blocks):
        where = f"block {number} ({block.name!r})"
        if not block.name or not isinstance(block.name, str) or "." in block.name:
            _fail(spec, where, "field 'name' must be a non-empty string without '.'")
        if block.name in names or block.name in ("stem", "bottleneck", "pool", "classifier"):
            _fail(spec, where, f"field 'name': {block.name!r} is used twice or reserved")
        names.add(block.name)
        for field in ("expand", "out_channels", "groups", "stride"):
            _check_positive(spec, where, field, getattr(block, field))
        if block.stride not in (1, 2):
            _fail(spec, where, f"field 'stride' must be 1 or 2, got {block.stride}")
        for field, count in (("weight_bits", 3), ("act_bits", 3), ("pw_groups", 2)):
            value = getattr(block, field)
            if not isinstance(value, tuple) or len(value) != count:
                _fail(spec, where, f"field '{field}' must list {count} values, got {value!r}")
        for part, wb in zip(("pw1", "gw", "pw2"), block.weight_bits):
            _check_choice(spec, f"layer '{block.name}.{part}'", "weight_bits", wb,
                          contract.WEIGHT_BITS, "weight width")
        for part, ab in zip(("pw1", "gw", "pw2"), block.act_bits):
            _check_choice(spec, f"layer '{block.name}.{part}'", "act_bits", ab, ACT_BITS,
                          "activation width")
        for part, g in zip(("pw1", "pw2"), block.pw_groups):
            _check_positive(spec, f"layer '{block.name}.{part}'", "groups", g)
        if block.expand % block.groups:
            _fail(spec, f"layer '{block.name}.gw'", f"field 'groups': {block.expand} channels "
                                                    f"are not divisible by {block.groups} groups")
        for part, g, cin, cout in (("pw1", block.pw_groups[0], channels, block.expand),
                                   ("pw2", block.pw_groups[1], block.expand, block.out_channels)):
            if cin % g or cout % g:
                _fail(spec, f"layer '{block.name}.{part}'",
                      f"field 'pw_groups': {cin} input and {cout} output channels are not both "
                      f"divisible by {g} groups")
        if block.shift_sharing not in ("block", "layer"):
            _fail(spec, where, f"field 'shift_sharing' must be 'block' or 'layer', got "
                               f"{block.shift_sharing!r}")
        if not isinstance(block.residual, Residual):
            _fail(spec, where, f"field 'residual' must be a Residual, got {block.residual!r}")
        if block.residual is not Residual.NONE:
            if block.stride != 1 or channels != block.out_channels:
                _fail(spec, where, f"field 'residual': {block.residual.value!r} needs stride 1 "
                                   f"and out_channels == in_channels ({channels}), got stride "
                                   f"{block.stride} and out_channels {block.out_channels}")
            out_bits = block.act_bits[2]
            if block.residual is Residual.ADD and bits != out_bits:
                _fail(spec, where, f"field 'residual': 'add' needs the skip ({bits} bits) and the "
                                   f"block output ({out_bits} bits) at the same width")
            if block.residual is Residual.MUX and bits < out_bits:
                _fail(spec, where, f"field 'residual': 'mux' needs a skip of at least {out_bits} "
                                   f"bits, got {bits}")
            if block.residual is Residual.OR and not (bits == out_bits == 1):
                _fail(spec, where, "field 'residual': 'or' needs binary (1-bit) skip and output")
        h, w = -(-h // block.stride), -(-w // block.stride)
        channels, bits = block.out_channels, block.act_bits[2]
    if spec.bottleneck:
        _check_positive(spec, "bottleneck", "out_channels", spec.bottleneck.out_channels)
        _check_choice(spec, "bottleneck", "weight_bits", spec.bottleneck.weight_bits,
                      contract.WEIGHT_BITS, "weight width")
    if spec.head:
        _check_positive(spec, "head", "num_classes", spec.head.num_classes)
        _check_choice(spec, "head", "weight_bits", spec.head.weight_bits, contract.WEIGHT_BITS,
                      "weight width")
    if h < 1 or w < 1:
        _fail(spec, "blocks", "the strides reduce the feature map below 1x1")


# --------------------------------------------------------------------------------------------
# (de)serialization


def _to_jsonable(value):
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        return {f.name: _to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "source"}
    if isinstance(value, (tuple, list)):
        return [_to_jsonable(v) for v in value]
    return value


_SECTIONS = {"stem": StemSpec, "bottleneck": BottleneckSpec, "head": HeadSpec,
             "hardware": Hardware}


def _build(cls, data, where, origin, name):
    if not isinstance(data, dict):
        raise SpecError(f"{origin}spec {name!r}, {where}: expected an object, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpecError(f"{origin}spec {name!r}, {where}: unknown field(s) {', '.join(unknown)} "
                        f"(expected: {', '.join(k for k in fields if k != 'source')})")
    kwargs = {}
    for key, value in data.items():
        if key == "residual":
            try:
                value = Residual(value)
            except ValueError:
                raise SpecError(f"{origin}spec {name!r}, {where}: field 'residual': {value!r} is "
                                f"not a residual mode (expected one of "
                                f"{', '.join(r.value for r in Residual)})") from None
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as error:
        raise SpecError(f"{origin}spec {name!r}, {where}: {error}") from None


def spec_from_dict(data, source=""):
    """Build and validate a :class:`NetworkSpec` from plain data (as read from JSON)."""
    origin = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise SpecError(f"{origin}a spec must be a JSON object")
    name = data.get("name", "")
    data = dict(data)
    kwargs = {"source": source}
    for key in list(data):
        value = data.pop(key)
        if key in _SECTIONS:
            kwargs[key] = None if value is None else _build(_SECTIONS[key], value, key, origin,
                                                            name)
        elif key == "blocks":
            if not isinstance(value, list):
                raise SpecError(f"{origin}spec {name!r}: field 'blocks' must be a list")
            kwargs[key] = tuple(_build(BlockSpec, b, f"block {i}", origin, name)
                                for i, b in enumerate(value))
        else:
            kwargs[key] = value
    if "stem" not in kwargs:
        raise SpecError(f"{origin}spec {name!r}: missing field 'stem'")
    fields = {f.name for f in dataclasses.fields(NetworkSpec)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise SpecError(f"{origin}spec {name!r}, top level: unknown field(s) "
                        f"{', '.join(unknown)}")
    return NetworkSpec(**kwargs)


def builtin_specs():
    return sorted(p.stem for p in SPEC_DIR.glob("*.json"))


def load_spec(name_or_path):
    """A builtin spec by name (``nqe-1mb``) or a JSON file by path."""
    if isinstance(name_or_path, NetworkSpec):
        return name_or_path
    path = Path(name_or_path)
    if not path.exists():
        builtin = SPEC_DIR / f"{name_or_path}.json"
        if not builtin.exists():
            raise SpecError(f"no spec named {str(name_or_path)!r}: not a file, and not a builtin "
                            f"spec (builtin: {', '.join(builtin_specs())})")
        path = builtin
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SpecError(f"{path}: not valid JSON: {error}") from None
    return spec_from_dict(data, source=str(path))

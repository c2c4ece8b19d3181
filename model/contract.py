"""The integer arithmetic contract: every operation the fake-quant model, the integer reference and
the RTL must agree on, bit for bit.

This module imports nothing of the project's own, so that each of those three can be tested
against it. Everything is plain integers (Python ``int`` or numpy integer arrays).

Summary (DESIGN.md, "Integer arithmetic contract"):

* Activations are unsigned ``n``-bit integers; the input image is 8-bit.
* Weight codes per width: 3b quinary {-2..2}, 2b ternary {-1, 0, 1}, 1b binary {-1, +1}.
  Storage fields: 3b and 2b are two's complement in ``bits`` bits (so 3b fields 0b011, 0b100,
  0b101 and the 2b field 0b10 are illegal); 1b field 1 means +1, field 0 means -1.
* Packing: a memory word of ``word_bits`` holds ``word_bits // bits`` codes, the first code in the
  least significant bits, unused high bits zero. A word is stored as ``ceil(word_bits / 8)`` bytes,
  little-endian; words follow each other. Codes are packed in the order given by the caller.
* Accumulator: exact sum of products; its range is bounded by ``fan_in * max|w| * max a``, from
  which the width is derived, so overflow is impossible by construction.
* BSN (bit-shift normalization): ``y = (acc + bias) >> shift`` (arithmetic shift, i.e. floor).
* HWMSB: ``a = clamp(y, 0, 2**n - 1)``.
* Residuals: ``add`` saturates ``y + skip`` into [0, 2**n - 1]; ``mux`` passes, per channel, the
  skip path (rescaled by a right shift when it has more bits) or the block output; ``or`` is the
  bitwise OR of binary activations.
* Head: global sum pooling, an integer classifier (``logits = acc + bias``, no shift, no clamp),
  argmax where the lowest index wins a tie.
"""

import enum

import numpy as np

__all__ = [
    "ContractError", "Residual", "WEIGHT_BITS", "IMAGE_BITS",
    "legal_codes", "max_abs_code", "encode_codes", "decode_fields", "codes_per_word",
    "word_bytes", "packed_words", "pack_codes", "unpack_codes",
    "signed_bits", "unsigned_bits", "accumulator_bound", "bias_bounds", "classifier_bias_bounds",
    "max_shift", "bsn", "hwmsb", "residual_add", "residual_mux", "residual_or", "sum_pool",
    "argmax_lowest",
]

WEIGHT_BITS = (1, 2, 3)
IMAGE_BITS = 8


class ContractError(ValueError):
    """A value breaks the integer contract (illegal code, out-of-range bias, bad packing)."""


class Residual(enum.Enum):
    """How a block's skip path joins its output."""
    NONE = "none"
    ADD = "add"   # saturating add of the skip activation
    MUX = "mux"   # per channel: skip (bit-shift rescaled) or block output
    OR = "or"     # bitwise OR, binary activations only


def _prefix(where):
    return f"{where}: " if where else ""


def _check_weight_bits(bits, where=""):
    if bits not in WEIGHT_BITS:
        raise ContractError(f"{_prefix(where)}weight width {bits!r} is not supported "
                            f"(expected one of {', '.join(map(str, WEIGHT_BITS))})")


def legal_codes(bits):
    """The legal signed weight codes of a ``bits``-wide weight, ascending."""
    _check_weight_bits(bits)
    return {3: (-2, -1, 0, 1, 2), 2: (-1, 0, 1), 1: (-1, 1)}[bits]


def max_abs_code(bits):
    return max(abs(c) for c in legal_codes(bits))


def _describe_legal(bits):
    return ", ".join(str(c) for c in legal_codes(bits))


def encode_codes(codes, bits, where=""):
    """Signed codes -> unsigned storage fields (``np.uint64``). Raises on an illegal code."""
    _check_weight_bits(bits, where)
    codes = np.asarray(codes)
    if codes.dtype.kind not in "iu":
        raise ContractError(f"{_prefix(where)}weight codes must be integers, got dtype {codes.dtype}")
    codes = codes.astype(np.int64)
    legal = np.array(legal_codes(bits))
    bad = ~np.isin(codes, legal)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ContractError(f"{_prefix(where)}weight code {int(codes[index])} at index {list(index)} "
                            f"is illegal for {bits}-bit weights (legal: {_describe_legal(bits)})")
    if bits == 1:
        return (codes > 0).astype(np.uint64)
    return (codes & ((1 << bits) - 1)).astype(np.uint64)


def decode_fields(fields, bits, where=""):
    """Unsigned storage fields -> signed codes (``np.int8``). Raises on an illegal field."""
    _check_weight_bits(bits, where)
    fields = np.asarray(fields).astype(np.int64)
    if bits == 1:
        codes = np.where(fields == 1, 1, -1)
        bad = (fields < 0) | (fields > 1)
    else:
        codes = np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
        bad = ~np.isin(codes, np.array(legal_codes(bits))) | (fields < 0) | (fields >= 1 << bits)
    if bad.any():
        index = int(np.argwhere(bad.reshape(-1))[0, 0])
        field = int(fields.reshape(-1)[index])
        raise ContractError(f"{_prefix(where)}weight field 0b{field:0{bits}b} at code {index} "
                            f"decodes to an illegal {bits}-bit weight "
                            f"(legal codes: {_describe_legal(bits)})")
    return codes.astype(np.int8)


def codes_per_word(bits, word_bits):
    _check_weight_bits(bits)
    if word_bits < bits:
        raise ContractError(f"word of {word_bits} bits cannot hold a {bits}-bit code")
    return word_bits // bits


def word_bytes(word_bits):
    return (word_bits + 7) // 8


def packed_words(count, bits, word_bits):
    """Words needed to hold ``count`` codes of ``bits`` bits."""
    return -(-count // codes_per_word(bits, word_bits))


def pack_codes(codes, bits, word_bits, where=""):
    """Pack signed codes (any shape, taken in C order) into bytes, as the weight SRAM holds them."""
    fields = encode_codes(np.asarray(codes).reshape(-1), bits, where)
    per_word = codes_per_word(bits, word_bits)
    words = packed_words(fields.size, bits, word_bits)
    padded = np.zeros(words * per_word, dtype=np.uint64)
    padded[:fields.size] = fields
    # A word can exceed 64 bits, so assemble each word's bytes rather than one machine integer.
    nbytes = word_bytes(word_bits)
    out = np.zeros((words, nbytes), dtype=np.uint8)
    bit_pos = np.arange(per_word) * bits
    grid = padded.reshape(words, per_word)
    for b in range(bits):
        bit = ((grid >> np.uint64(b)) & np.uint64(1)).astype(np.uint8)
        pos = bit_pos + b
        np.bitwise_or.at(out, (slice(None), pos // 8), bit << (pos % 8).astype(np.uint8))
    return out.tobytes()


def unpack_codes(data, bits, word_bits, count, where=""):
    """Inverse of :func:`pack_codes`: ``count`` signed codes (``np.int8``) from packed bytes.

    Raises when the byte length is not exactly what ``count`` codes need, when a padding bit is
    set, or when a field decodes to an illegal code.
    """
    per_word = codes_per_word(bits, word_bits)
    words = packed_words(count, bits, word_bits)
    nbytes = word_bytes(word_bits)
    expected = words * nbytes
    if len(data) != expected:
        raise ContractError(f"{_prefix(where)}packed weights hold {len(data)} bytes, expected "
                            f"{expected} ({count} codes of {bits} bits in {words} words of "
                            f"{word_bits} bits)")
    raw = np.frombuffer(data, dtype=np.uint8).reshape(words, nbytes)
    bit_index = np.arange(nbytes * 8)
    bits_matrix = (raw[:, bit_index // 8] >> (bit_index % 8).astype(np.uint8)) & 1
    used = per_word * bits
    if bits_matrix[:, used:].any():
        word = int(np.argwhere(bits_matrix[:, used:].any(axis=1))[0, 0])
        raise ContractError(f"{_prefix(where)}packed word {word} has a padding bit set "
                            f"(bits {used}..{nbytes * 8 - 1} must be zero)")
    weights_of_bits = (1 << np.arange(bits)).astype(np.int64)
    fields = (bits_matrix[:, :used].reshape(words, per_word, bits).astype(np.int64)
              * weights_of_bits).sum(axis=2).reshape(-1)
    tail = fields[count:]
    if tail.any():
        raise ContractError(f"{_prefix(where)}packed weights have non-zero padding after the "
                            f"last of {count} codes")
    return decode_fields(fields[:count], bits, where)


def signed_bits(lo, hi):
    """Smallest two's-complement width holding every integer in [lo, hi]."""
    n = 1
    while not (-(1 << (n - 1)) <= lo and hi <= (1 << (n - 1)) - 1):
        n += 1
    return n


def unsigned_bits(hi):
    """Smallest unsigned width holding every integer in [0, hi]."""
    return max(1, int(hi).bit_length())


def accumulator_bound(fan_in, weight_bits, in_bits):
    """Largest |sum of products| a layer can reach: fan_in * max|w| * max a."""
    return fan_in * max_abs_code(weight_bits) * ((1 << in_bits) - 1)


def bias_bounds(acc_bound, shift, out_bits, residual_reach=0):
    """Range of BSN biases that the contract stores, [lo, hi].

    Any bias outside this range gives exactly the same activations as the nearest end of it: below
    ``lo`` every output is already clamped to 0 (or, with a residual ``add``, so negative that no
    skip value can lift it above 0); above ``hi`` every output is already the maximum. Clamping a
    bias into this range is therefore exact, and it bounds the adder width.

    ``residual_reach`` is the largest skip value added before the clamp (0 without ``add``).
    """
    step = 1 << shift
    top = (1 << out_bits) - 1
    lo = -acc_bound - residual_reach * step + step - 1
    hi = acc_bound + top * step
    return lo, hi


def classifier_bias_bounds(acc_bound):
    """The classifier's logits are outputs, so its bias is not clamp-equivalent: [-A, A]."""
    return -acc_bound, acc_bound


def max_shift(acc_bound):
    """Largest legal BSN shift: the accumulator's width. Beyond it ``acc >> shift`` is -1 or 0 for
    every accumulator value, so a larger shift adds nothing a bias could not do."""
    return signed_bits(-acc_bound, acc_bound)


def bsn(acc, bias, shift):
    """Bit-shift normalization: (acc + bias) >> shift, arithmetic (floor). ``bias`` broadcasts over
    the channel axis the caller aligns."""
    acc = np.asarray(acc, dtype=np.int64)
    return (acc + np.asarray(bias, dtype=np.int64)) >> int(shift)


def hwmsb(y, bits):
    """Half-wave rectify and keep the ``bits`` MSBs the shift selected: clamp(y, 0, 2**bits - 1)."""
    return np.clip(np.asarray(y, dtype=np.int64), 0, (1 << bits) - 1)


def residual_add(y, skip, bits):
    """Saturating residual add: clamp(y + skip, 0, 2**bits - 1), y signed (after BSN)."""
    return np.clip(np.asarray(y, dtype=np.int64) + np.asarray(skip, dtype=np.int64),
                   0, (1 << bits) - 1)


def residual_mux(y, skip, select, bits, skip_bits, channel_axis=1):
    """Per-channel MUX: where ``select`` is 1 pass the skip (rescaled to ``bits`` by dropping its
    low ``skip_bits - bits`` bits), else the block output hwmsb(y)."""
    if skip_bits < bits:
        raise ContractError(f"mux residual needs a skip of at least {bits} bits, got {skip_bits}")
    y = hwmsb(y, bits)
    skip = np.asarray(skip, dtype=np.int64) >> (skip_bits - bits)
    shape = [1] * y.ndim
    shape[channel_axis] = -1
    select = np.asarray(select, dtype=bool).reshape(shape)
    return np.where(select, skip, y)


def residual_or(y, skip):
    """OR residual for binary activations: hwmsb(y, 1) | skip."""
    return hwmsb(y, 1) | np.asarray(skip, dtype=np.int64)


def sum_pool(a):
    """Global sum pooling over the two trailing (spatial) axes."""
    return np.asarray(a, dtype=np.int64).sum(axis=(-2, -1))


def argmax_lowest(logits):
    """Class index per row; on a tie the lowest index wins."""
    # numpy's argmax returns the first maximum, which is exactly the contract; kept explicit here.
    return np.argmax(np.asarray(logits), axis=-1)

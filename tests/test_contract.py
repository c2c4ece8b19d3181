"""The integer contract, checked against plain Python arithmetic."""

import itertools

import numpy as np
import pytest

from nqe.model import contract
from nqe.model.contract import ContractError
from nqe.model.integer_reference import conv_int
from nqe.model.random_spec import random_spec
from nqe.model.spec import load_spec


@pytest.mark.parametrize("bits", contract.WEIGHT_BITS)
@pytest.mark.parametrize("word_bits", [3, 8, 16, 24, 32, 48, 64, 72])
def test_pack_unpack_round_trip(bits, word_bits):
    rng = np.random.default_rng(bits * 100 + word_bits)
    for count in (1, 7, word_bits, 1000):
        codes = rng.choice(contract.legal_codes(bits), size=count)
        data = contract.pack_codes(codes, bits, word_bits)
        words = contract.packed_words(count, bits, word_bits)
        assert len(data) == words * contract.word_bytes(word_bits)
        assert (contract.unpack_codes(data, bits, word_bits, count) == codes).all()


def test_pack_layout_matches_hand_computed_words():
    # 3b fields 001, 111, 010, 000, 110 from the LSB of a 16-bit word: 0b0110_0000_1011_1001
    assert contract.pack_codes([1, -1, 2, 0, -2], 3, 16) == bytes([0xB9, 0x60])
    # 1b: +1 is field 1, -1 is field 0
    assert contract.pack_codes([1, -1, 1], 1, 8) == bytes([0b101])
    # 2b two's complement: 1 -> 01, -1 -> 11, 0 -> 00; four codes per byte
    assert contract.pack_codes([1, -1, 0, 1], 2, 8) == bytes([0b01_00_11_01])


def test_pack_layout_against_python_bit_loop():
    rng = np.random.default_rng(7)
    for bits, word_bits in itertools.product(contract.WEIGHT_BITS, (16, 48)):
        codes = rng.choice(contract.legal_codes(bits), size=50)
        per = word_bits // bits
        words = []
        for start in range(0, len(codes), per):
            word = 0
            for i, code in enumerate(codes[start:start + per]):
                field = (1 if code > 0 else 0) if bits == 1 else int(code) & ((1 << bits) - 1)
                word |= field << (i * bits)
            words.append(word.to_bytes(contract.word_bytes(word_bits), "little"))
        assert contract.pack_codes(codes, bits, word_bits) == b"".join(words)


@pytest.mark.parametrize("bits,code", [(3, 3), (3, -3), (3, -4), (2, 2), (2, -2), (1, 0),
                                       (1, 2)])
def test_illegal_code_is_named(bits, code):
    with pytest.raises(ContractError, match=rf"layer 'b3.pw2': weight code {code} at index "
                                            rf"\[2\] is illegal for {bits}-bit weights"):
        contract.encode_codes([contract.legal_codes(bits)[0]] * 2 + [code], bits,
                              where="layer 'b3.pw2'")


@pytest.mark.parametrize("bits,field", [(3, 0b011), (3, 0b100), (3, 0b101), (2, 0b10)])
def test_illegal_field_is_rejected(bits, field):
    with pytest.raises(ContractError, match="illegal"):
        contract.decode_fields([0, field], bits)
    data = bytes([field])
    with pytest.raises(ContractError, match="illegal"):
        contract.unpack_codes(data, bits, 8, 1)


def test_unpack_rejects_wrong_length_and_padding():
    data = contract.pack_codes([1, 0, -1], 2, 8)
    with pytest.raises(ContractError, match="hold 2 bytes, expected 1"):
        contract.unpack_codes(data + b"\0", 2, 8, 3)
    with pytest.raises(ContractError, match="padding"):
        contract.unpack_codes(bytes([data[0] | 0b1100_0000]), 2, 8, 3)
    with pytest.raises(ContractError, match="padding bit"):   # 3b in 8-bit words: bits 6, 7
        contract.unpack_codes(bytes([0b1000_0000]), 3, 8, 2)


def test_signed_and_unsigned_bits():
    assert contract.signed_bits(-128, 127) == 8
    assert contract.signed_bits(-129, 0) == 9
    assert contract.signed_bits(0, 128) == 9
    assert contract.unsigned_bits(255) == 8
    assert contract.unsigned_bits(0) == 1


def test_bsn_is_an_arithmetic_floor_shift():
    acc = np.arange(-40, 41)
    for shift in range(5):
        for bias in (-7, 0, 5):
            expected = [(a + bias) // (1 << shift) for a in acc]   # Python's // floors
            assert list(contract.bsn(acc, bias, shift)) == expected
    assert int(contract.bsn(-5, 0, 1)) == -3      # floor, not truncation toward zero


def test_hwmsb_clamp_edges():
    y = np.array([-100, -1, 0, 1, 2, 3, 4, 100])
    assert list(contract.hwmsb(y, 2)) == [0, 0, 0, 1, 2, 3, 3, 3]
    assert list(contract.hwmsb(y, 1)) == [0, 0, 0, 1, 1, 1, 1, 1]
    assert list(contract.hwmsb(y, 3)) == [0, 0, 0, 1, 2, 3, 4, 7]


def test_residual_modes():
    y = np.array([[-5, -1, 2, 3]]).reshape(1, 4, 1, 1)
    skip = np.array([3, 3, 1, 2]).reshape(1, 4, 1, 1)
    assert contract.residual_add(y, skip, 2).ravel().tolist() == [0, 2, 3, 3]
    select = [True, False, True, False]
    assert contract.residual_mux(y, skip, select, 2, 2).ravel().tolist() == [3, 0, 1, 3]
    # a 3-bit skip into a 2-bit output keeps its two MSBs
    skip3 = np.array([7, 4, 3, 0]).reshape(1, 4, 1, 1)
    assert contract.residual_mux(y, skip3, [True] * 4, 2, 3).ravel().tolist() == [3, 2, 1, 0]
    with pytest.raises(ContractError):
        contract.residual_mux(y, skip, select, 3, 2)
    yb = np.array([-1, 0, 1, 5])
    assert contract.residual_or(yb, np.array([1, 0, 0, 1])).tolist() == [1, 0, 1, 1]


def test_argmax_lowest_index_wins_ties():
    logits = np.array([[3, 7, 7, 1], [-2, -2, -2, -2], [0, 0, 5, 5]])
    assert contract.argmax_lowest(logits).tolist() == [1, 0, 2]


def test_sum_pool():
    a = np.arange(2 * 3 * 4 * 4).reshape(2, 3, 4, 4)
    assert (contract.sum_pool(a) == a.sum(axis=(2, 3))).all()


def _naive_conv(x, w, stride, pad, groups):
    n, c, h, wd = x.shape
    o, cg, k, _ = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad))).astype(np.int64)
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    out = np.zeros((n, o, ho, wo), dtype=np.int64)
    og = o // groups
    for oc in range(o):
        g = oc // og
        for i in range(ho):
            for j in range(wo):
                patch = xp[:, g * cg:(g + 1) * cg, i * stride:i * stride + k,
                           j * stride:j * stride + k]
                out[:, oc, i, j] = (patch * w[oc].astype(np.int64)).sum(axis=(1, 2, 3))
    return out


@pytest.mark.parametrize("k,stride,groups", [(1, 1, 1), (1, 1, 2), (3, 1, 1), (3, 2, 4),
                                             (3, 1, 8), (5, 2, 1)])
def test_conv_int_matches_naive_loops(k, stride, groups):
    rng = np.random.default_rng(k * 100 + stride * 10 + groups)
    x = rng.integers(0, 256, size=(2, 8, 7, 9))
    w = rng.integers(-2, 3, size=(8, 8 // groups, k, k))
    bound = 8 // groups * k * k * 2 * 255
    got = conv_int(x, w, stride, k // 2, groups, bound)
    assert (got == _naive_conv(x, w, stride, k // 2, groups)).all()


def _layers_under_test():
    layers = list(load_spec("nqe-1mb").layers())
    for seed in range(20):
        layers += list(random_spec(seed).layers())
    return [layer for layer in layers if layer.has_weights]


def test_accumulator_width_holds_adversarial_sums():
    """Worst-case operands reach exactly +-bound, and the derived width holds them."""
    for layer in _layers_under_test():
        amax = (1 << layer.in_bits) - 1
        wmax = contract.max_abs_code(layer.weight_bits)
        x = np.full((1, layer.in_channels, layer.in_height, layer.in_width), amax)
        for sign in (1, -1):
            w = np.full(layer.weight_shape, sign * wmax)
            pad = layer.padding if layer.kernel > 0 else 0
            # Interior pixels see the full fan-in: the bound is reached, not merely respected.
            acc = conv_int(x, w, layer.stride, pad, layer.groups, layer.acc_bound)
            assert np.abs(acc).max() == layer.acc_bound, layer.name
            lo, hi = -(1 << (layer.acc_bits - 1)), (1 << (layer.acc_bits - 1)) - 1
            assert lo <= acc.min() and acc.max() <= hi, layer.name
        # One bit fewer would overflow on that worst case: the width is tight.
        assert layer.acc_bound > (1 << (layer.acc_bits - 2)) - 1, layer.name
        # The post-accumulation sum (acc + bias at the widest bias range) fits sum_bits.
        blo, bhi = layer.bias_bounds(layer.max_shift)
        slo, shi = -(1 << (layer.sum_bits - 1)), (1 << (layer.sum_bits - 1)) - 1
        assert slo <= blo - layer.acc_bound and bhi + layer.acc_bound <= shi, layer.name


@pytest.mark.parametrize("residual_reach", [0, 3])
def test_bias_clamp_to_contract_range_is_exact(residual_reach):
    """A bias outside bias_bounds gives the same activations as the clamped bias."""
    rng = np.random.default_rng(residual_reach)
    for acc_bound, shift, bits in [(100, 0, 2), (1000, 4, 2), (5000, 7, 3), (63, 2, 1)]:
        lo, hi = contract.bias_bounds(acc_bound, shift, bits, residual_reach)
        acc = np.arange(-acc_bound, acc_bound + 1)
        skip = rng.integers(0, residual_reach + 1, size=acc.shape)
        for bias in (lo - 1, lo - 1000, hi + 1, hi + 12345):
            clamped = min(max(bias, lo), hi)
            y, yc = contract.bsn(acc, bias, shift), contract.bsn(acc, clamped, shift)
            if residual_reach:
                assert (contract.residual_add(y, skip, bits) ==
                        contract.residual_add(yc, skip, bits)).all()
            else:
                assert (contract.hwmsb(y, bits) == contract.hwmsb(yc, bits)).all()
        # ...and the range is not wider than it needs to be at its ends.
        assert (contract.hwmsb(contract.bsn(acc, hi - 1, shift), bits) <
                (1 << bits) - 1).any() or residual_reach

"""infopt.quant.formats and the pure-torch reference matmuls in infopt.ops.quant_ref."""

import pytest
import torch

from infopt.ops import quant_ref
from infopt.quant import formats as F


def _weight(n, k, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(dtype)


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("k", [1, 2, 7, 33, 129, 576])
def test_pack_unpack_round_trip(k):
    codes = torch.randint(0, 16, (5, k), dtype=torch.uint8)
    packed = F.pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, (k + 1) // 2)
    assert torch.equal(F.unpack_int4(packed, k), codes)


def test_pack_layout_low_nibble_is_even_k():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    packed = F.pack_int4(codes)
    # byte0 = 1 | 2 << 4, byte1 = 3 | 4 << 4, byte2 = 5 | pad 0
    assert packed.tolist() == [[0x21, 0x43, 0x05]]


def test_pack_rejects_out_of_range_and_bad_shapes():
    with pytest.raises(ValueError, match="0..15"):
        F.pack_int4(torch.tensor([[16]]))
    with pytest.raises(ValueError, match="0..15"):
        F.pack_int4(torch.tensor([[-1]]))
    with pytest.raises(ValueError, match="2-D"):
        F.pack_int4(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TypeError, match="integer"):
        F.pack_int4(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="bytes per row"):
        F.unpack_int4(torch.zeros(2, 3, dtype=torch.uint8), 8)


# ------------------------------------------------------------------------ error bounds


def test_int8_error_bounded_by_half_scale():
    w = _weight(64, 100)
    qw, scale = F.quantize_int8(w)
    assert qw.dtype == torch.int8 and scale.shape == (64,)
    assert int(qw.abs().max()) <= 127
    err = (F.dequantize_int8(qw, scale) - w).abs().amax(dim=1)
    assert torch.all(err <= scale / 2 * (1 + 1e-5))


@pytest.mark.parametrize("k,gs", [(576, 128), (576, 64), (100, 32), (129, 128), (7, 32), (1, 64)])
def test_int4_error_bounded_by_half_scale_per_group(k, gs):
    w = _weight(16, k, seed=k)
    qweight, scale, zero = F.quantize_int4(w, gs)
    g = F.num_groups(k, gs)
    assert qweight.shape == (16, (k + 1) // 2)
    assert scale.shape == zero.shape == (16, g)
    assert int(zero.max()) <= 15
    deq = F.dequantize_int4(qweight, scale, zero, gs, k)
    err = (deq - w).abs()
    col_group = torch.arange(k) // gs
    bound = scale[:, col_group] / 2 * (1 + 1e-5) + 1e-7
    assert torch.all(err <= bound)


def test_ragged_last_group_uses_only_its_own_columns():
    # K=576, g128: 4 full groups + one of 64. Make the tail tiny: its scale must be tiny too
    # (a wrong implementation mixing it with padding or other columns would get a big scale).
    w = _weight(4, 576)
    w[:, 512:] *= 1e-3
    _, scale, _ = F.quantize_int4(w, 128)
    assert scale.shape == (4, 5)
    assert torch.all(scale[:, 4] < scale[:, :4].min(dim=1).values * 0.01)
    tail_range = w[:, 512:].amax(1).clamp(min=0) - w[:, 512:].amin(1).clamp(max=0)
    assert torch.allclose(scale[:, 4], tail_range / 15)


def test_zero_is_exactly_representable_and_zero_rows_are_safe():
    w = _weight(3, 64)
    w[1] = 0
    qweight, scale, zero = F.quantize_int4(w, 32)
    deq = F.dequantize_int4(qweight, scale, zero, 32, 64)
    assert torch.all(deq[1] == 0)
    q8, s8 = F.quantize_int8(w)
    assert torch.all(F.dequantize_int8(q8, s8)[1] == 0)
    w8, sf = F.quantize_fp8(w)
    assert torch.all(F.dequantize_fp8(w8, sf)[1] == 0)


def test_fake_quantize_matches_pack_path():
    w = _weight(8, 200)
    qweight, scale, zero = F.quantize_int4(w, 64)
    deq = F.dequantize_int4(qweight, scale, zero, 64, 200)
    assert torch.equal(F.fake_quantize_int4(w, 64), deq)


def test_clip_ratio_shrinks_scale():
    w = _weight(8, 128)
    s1, _ = F.int4_params(w, 128)
    s2, _ = F.int4_params(w, 128, clip_ratio=0.8)
    assert torch.allclose(s2, s1 * 0.8)


# ---------------------------------------------------------------------------- SQNR of the
# reference linears vs an fp32 linear on random data. Measured on this data: int8 ~44 dB,
# int4 g128 ~20 dB, g32 ~22 dB, w8a8 ~38 dB, fp8 ~29 dB; thresholds leave a few dB margin.


@pytest.fixture
def linear_data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 576, generator=g)
    w = torch.randn(320, 576, generator=g) * 0.05
    b = torch.randn(320, generator=g) * 0.1
    return x, w, b, x @ w.t() + b


def test_int8_weight_only_sqnr(linear_data):
    x, w, b, ref = linear_data
    qw, s = F.quantize_int8(w)
    y = quant_ref.int8_weight_only_linear(x, qw, s, b)
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert F.sqnr_db(ref, y) > 38


@pytest.mark.parametrize("gs,threshold", [(128, 17), (64, 18), (32, 19)])
def test_int4_sqnr(linear_data, gs, threshold):
    x, w, b, ref = linear_data
    qweight, scale, zero = F.quantize_int4(w, gs)
    y = quant_ref.int4_weight_only_linear(x, qweight, scale, zero, gs, b)
    assert F.sqnr_db(ref, y) > threshold


@pytest.mark.parametrize("gs", [32, 128])
def test_int4_dynamic_costs_little_over_weight_only(linear_data, gs):
    """int8 activations per 32-block on top of int4 weights: the activation rounding (~45 dB
    on its own) barely moves the int4 error (~17-19 dB)."""
    x, w, b, ref = linear_data
    qweight, scale, zero = F.quantize_int4(w, gs)
    wo = F.sqnr_db(ref, quant_ref.int4_weight_only_linear(x, qweight, scale, zero, gs, b))
    dyn = F.sqnr_db(ref, quant_ref.int4_dynamic_linear(x, qweight, scale, zero, gs, b))
    assert wo - 0.1 < dyn < wo + 0.1
    xq, xs = quant_ref.quantize_blockwise_int8(x.reshape(-1, 576))
    assert F.sqnr_db(x.reshape(-1, 576), xq.float() * xs.repeat_interleave(32, 1)) > 40


def test_blockwise_int8_codes():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5, 0.25] + [0.0] * 29])  # K = 65: 3 blocks
    xq, xs = quant_ref.quantize_blockwise_int8(x)
    assert xq.shape == (1, 65) and xs.shape == (1, 3)
    assert xs[0, 0] == 1.0 and (xq[0, :32] == 0).all()  # an all-zero block: scale 1, codes 0
    assert xs[0, 1] == torch.tensor(2.0) / 127 and xs[0, 2] == 1.0
    # round half to even: 0.5 * 127 / 2 = 31.75 -> 32, 0.25 * 63.5 = 15.875 -> 16
    assert xq[0, 32:36].tolist() == [64, -127, 32, 16]


def test_w8a8_sqnr(linear_data):
    x, w, b, ref = linear_data
    qw, s = F.quantize_int8(w)
    assert F.sqnr_db(ref, quant_ref.int8_dynamic_linear(x, qw, s, b)) > 33


def test_fp8_sqnr(linear_data):
    x, w, b, ref = linear_data
    w8, s = F.quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn
    assert F.sqnr_db(ref, quant_ref.fp8_linear(x, w8, s, b)) > 25


def test_int4_sqnr_improves_with_smaller_groups(linear_data):
    x, w, b, ref = linear_data
    sq = {}
    for gs in (32, 128):
        qweight, scale, zero = F.quantize_int4(w, gs)
        sq[gs] = F.sqnr_db(ref, quant_ref.int4_weight_only_linear(x, qweight, scale, zero, gs, b))
    assert sq[32] > sq[128] + 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reference_linears_preserve_input_dtype(linear_data, dtype):
    x, w, b, ref = linear_data
    qw, s = F.quantize_int8(w)
    qweight, scale, zero = F.quantize_int4(w, 128)
    w8, s8 = F.quantize_fp8(w)
    xs = x.to(dtype)
    outs = [
        quant_ref.int8_weight_only_linear(xs, qw, s, b.to(dtype)),
        quant_ref.int4_weight_only_linear(xs, qweight, scale, zero, 128, b.to(dtype)),
        quant_ref.int8_dynamic_linear(xs, qw, s, b.to(dtype)),
        quant_ref.fp8_linear(xs, w8, s8, b.to(dtype)),
    ]
    for y in outs:
        assert y.dtype == dtype and y.shape == ref.shape
        assert F.sqnr_db(ref, y.float()) > 15


# --------------------------------------------------------------------- int32 exactness


def test_int8_matmul_is_exact_int32():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (9, 4099), generator=g, dtype=torch.int8)
    b = torch.randint(-127, 128, (13, 4099), generator=g, dtype=torch.int8)
    exact = (a.long()[:, None, :] * b.long()[None, :, :]).sum(-1)
    out = quant_ref.int8_matmul_int32(a, b)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), exact)
    # worst case magnitudes: all -127 * -127 still exact
    a.fill_(-127)
    b.fill_(-127)
    assert int(quant_ref.int8_matmul_int32(a, b)[0, 0]) == 127 * 127 * 4099


def test_w8a8_matches_fp64_reference():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 96, generator=g)
    w = torch.randn(40, 96, generator=g)
    qw, s = F.quantize_int8(w)
    xq, xs = quant_ref.quantize_per_token_int8(x)
    ref = (xq.double() @ qw.double().t()) * xs.double()[:, None] * s.double()
    y = quant_ref.int8_dynamic_linear(x, qw, s)
    assert torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_int8_matmul_rejects_non_int8():
    with pytest.raises(TypeError, match="int8"):
        quant_ref.int8_matmul_int32(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.int8))


def test_fp8_activation_quant_saturates_not_nan():
    # Large magnitudes: the row max maps to exactly 448 (no NaN from an overflowing cast) and
    # every value keeps e4m3's relative precision (3 mantissa bits: error <= 2**-4).
    x = torch.tensor([[1e6, -3e5, 5e4, 0.0]])
    q, s = quant_ref.quantize_per_token_fp8(x)
    assert torch.isfinite(q.float()).all()
    assert float(q.float()[0, 0]) == 448.0
    assert torch.all((q.float() * s[:, None] - x).abs() <= x.abs() * 2**-4)


# -------------------------------------------------------------------------- validation


def test_bad_bits_group_size_shape_dtype():
    w = _weight(4, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 8\)"):
        F.quantize_weight(w, bits=3)
    with pytest.raises(ValueError, match="bits"):
        F.quantize_weight(w, bits=True)
    with pytest.raises(ValueError, match=r"group_size must be one of \(32, 64, 128\)"):
        F.quantize_int4(w, group_size=48)
    with pytest.raises(ValueError, match="group_size"):
        F.quantize_weight(w, bits=4, group_size=-32)
    with pytest.raises(TypeError, match="group_size must be an int"):
        F.quantize_int4(w, group_size=64.0)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        F.quantize_int8(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="weight must be 2-D"):
        F.quantize_int4(torch.zeros(8))
    with pytest.raises(TypeError, match="floating-point"):
        F.quantize_int8(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        F.quantize_fp8([[1.0]])
    with pytest.raises(ValueError, match="non-empty"):
        F.quantize_int4(torch.zeros(0, 32))


def test_quantize_weight_dispatch():
    w = _weight(4, 64)
    assert F.quantize_weight(w, bits=8)[0].dtype == torch.int8
    assert len(F.quantize_weight(w, bits=4, group_size=32)) == 3


def test_reference_rejects_mismatched_features():
    qw, s = F.quantize_int8(_weight(4, 64))
    with pytest.raises(ValueError, match="expects 64"):
        quant_ref.int8_weight_only_linear(torch.zeros(2, 63), qw, s)

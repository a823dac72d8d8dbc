"""Triton kernels for the quantized linears (launchers: ``infopt.ops.quant_linear_triton``).

Layouts as in ``infopt/ops/quant_ref.py``: ``x [M, K]`` (unit stride along K), int8 ``qweight
[N, K]``, packed int4 ``qweight uint8 [N, ceil(K/2)]`` (low nibble = even k), per-channel
``scale [N]`` or per-group ``scale/zero [N, G]``; ``y [M, N]``. One program computes a
``BLOCK_M x BLOCK_N`` tile of y, looping over K.

Tile kernels (``int8_wo_kernel``, ``int4_wo_kernel``, ``int8_dyn_kernel``), two variants each
(``USE_DOT``): a broadcast-multiply-reduce for M <= 4 and ``tl.dot`` tiles beyond (BLOCK_M 16
up to M = 16: the broadcast tile spills at 16 rows). Weights enter the dot product as exact
small integers (int8 codes, or ``code - zero`` for int4) in x's dtype, and the scales multiply
the fp32 partial sums, so a bf16 ``x`` loses nothing to rounding the dequantized weights.
``IEEE`` dots (fp32 operands, no TF32) serve fp32 ``x``, and every dtype under the
interpreter, whose bf16/fp16 ``tl.dot`` is wrong (results off by orders of magnitude with
triton 3.9); bf16 and int8 codes are exact in fp32.

``int4_gemv_kernel``, ``int8_gemv_kernel`` and ``int8_dyn_gemv_kernel`` are the decode paths
(M <= 4), ``int4_dot_kernel`` the int4 path beyond: see their docstrings.
"""

import triton
import triton.language as tl


@triton.jit
def int8_wo_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,  # x [M, K], w int8 [N, K], s fp32 [N], b fp32 [N], y [M, N]
    M, N, K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if USE_DOT:
            # int8 codes are exact in bf16/fp16/fp32; fp32 x needs IEEE (TF32 would round x).
            if IEEE:
                acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc,
                             input_precision="ieee")  # fmt: skip
            else:
                acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        else:
            prod = x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
            acc += tl.sum(prod, axis=2)
    y = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def int4_wo_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # w uint8 [N, KB], s fp32 [N, G], z uint8 [N, G]
    M, N, K, KB, G, GS, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # BLOCK_K divides GS, so every K tile lies in one group: one (scale, zero) per row per tile.
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        g = k0 // GS
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        # Adjacent k share a byte: each byte is loaded twice, from L1, then one nibble kept.
        byte = tl.load(w_rows + (k // 2)[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        code = (byte >> ((k % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        zero = tl.load(z_ptr + rn * G + g, mask=n_ok, other=0)
        scale = tl.load(s_ptr + rn * G + g, mask=n_ok, other=0.0)
        # code - zero is an exact small integer; masked-off k have x == 0, so they add nothing.
        wq = code.to(tl.int32) - zero.to(tl.int32)[:, None]
        if USE_DOT:
            if IEEE:
                part = tl.dot(x.to(tl.float32), tl.trans(wq.to(tl.float32)), input_precision="ieee")
            else:
                part = tl.dot(x, tl.trans(wq.to(x.dtype)))
        else:
            part = tl.sum(x.to(tl.float32)[:, None, :] * wq.to(tl.float32)[None, :, :], axis=2)
        acc += part * scale[None, :]
    y = acc
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# Bits 0x4B000000 | v read as fp32 are 2**23 + v exactly (0 <= v < 2**23): an int -> float
# conversion in one LOP3 instead of an I2F, whose throughput is a fraction of the FP32 pipe's.
_MAGIC_BITS = tl.constexpr(0x4B000000)


@triton.jit
def _int4_gemv_step(acc, w_row, xp, z_row, s_row, k0, KB, G,
                    GS: tl.constexpr, X16: tl.constexpr, BF16: tl.constexpr,
                    CHUNKS: tl.constexpr, SUB: tl.constexpr, MASKED: tl.constexpr):  # fmt: skip
    """One K step of ``int4_gemv_kernel``: acc ``[CHUNKS]`` += each chunk's partial dot x its
    group's scale. ``MASKED`` only for the last, partial step (the main loop runs unmasked)."""
    rc = tl.arange(0, CHUNKS)
    bi = k0 // 2 + rc[:, None] * SUB + tl.arange(0, SUB)[None, :]  # [C, SUB] byte = x pair index
    g = (k0 + rc * (2 * SUB)) // GS  # [C]: a chunk (2 * SUB codes) never straddles two groups
    if MASKED:
        byte = tl.load(w_row + bi, mask=bi < KB, other=0)
        xw = tl.load(xp + bi, mask=bi < KB, other=0)
        z = tl.load(z_row + g, mask=g < G, other=0)
        sc = tl.load(s_row + g, mask=g < G, other=0.0)
    else:
        byte = tl.load(w_row + bi)
        xw = tl.load(xp + bi)
        z = tl.load(z_row + g)
        sc = tl.load(s_row + g)
    # xw holds the pair (x[2j], x[2j+1]) that byte j's (low, high) nibbles multiply.
    if X16:
        if BF16:  # bf16 -> fp32 is a 16-bit shift
            xe = (xw << 16).to(tl.float32, bitcast=True)
            xo = (xw & -65536).to(tl.float32, bitcast=True)
        else:
            xe = xw.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            xo = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        xe = xw.to(tl.int32).to(tl.float32, bitcast=True)
        xo = (xw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    # (2**23 + code) - (2**23 + zero) is the exact small integer code - zero.
    zp = (z.to(tl.int32) | _MAGIC_BITS).to(tl.float32, bitcast=True)[:, None]
    b32 = byte.to(tl.int32)
    lo = ((b32 & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - zp
    hi = ((b32 >> 4) | _MAGIC_BITS).to(tl.float32, bitcast=True) - zp
    return acc + tl.sum(lo * xe + hi * xo, axis=1) * sc


@triton.jit
def int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # x [M, 2 * KB] (even, padded), w uint8 [N, KB]
    K, KB, G, stride_xm, stride_ym,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, CHUNKS: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """int4 weight-only GEMV for decode: program (n, m) computes ``y[m, n]``.

    Built for the GPU's weight stream, not the interpreter (checked as sm_80/sm_90 SASS with
    triton 3.6 and 3.9):

    * x is read as element *pairs* (one int32 for bf16/fp16, one int64 for fp32; the launcher
      pads K to even and aligns the rows), so the ``[CHUNKS, SUB]`` tiles of weight bytes and of
      x pairs have the same shape and contiguity, hence the same register layout (SUB elements
      per thread): no shared-memory layout conversion in the loop, and the SUB-long reduction is
      in-thread. The nibbles need no interleave: the low one multiplies the pair's first
      element, the high one its second. (A multi-row ``[BN, CHUNKS, SUB]`` weight tile got a
      different thread order than x's tile from triton 3.6, and a conversion per step.)
    * one cross-thread reduction, after the loop (acc ``[CHUNKS]``);
    * code and zero become floats with the 2**23 bit trick, no I2F;
    * the main loop runs without masks; only the last partial K step is masked.
    * Each K step requests CHUNKS * SUB bytes per program (512 B at the launcher's 128 x 4), and
      with one program per (row, x row) ~N * 512 / 132 bytes are in flight per H100 SM (16 KB
      at N = 4096), the quantity that decides a GEMV's bandwidth.
    """
    n, m = tl.program_id(0), tl.program_id(1)
    X16: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if X16:
        xp = (x_ptr + m.to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int32))
    else:
        xp = (x_ptr + m.to(tl.int64) * stride_xm).to(tl.pointer_type(tl.int64))
    w_row = w_ptr + n.to(tl.int64) * KB
    z_row = z_ptr + n.to(tl.int64) * G
    s_row = s_ptr + n.to(tl.int64) * G
    BK: tl.constexpr = CHUNKS * SUB * 2
    acc = tl.zeros((CHUNKS,), dtype=tl.float32)
    k_main = (K // BK) * BK
    for k0 in range(0, k_main, BK):
        acc = _int4_gemv_step(acc, w_row, xp, z_row, s_row, k0, KB, G,
                              GS, X16, BF16, CHUNKS, SUB, False)  # fmt: skip
    if k_main < K:
        acc = _int4_gemv_step(acc, w_row, xp, z_row, s_row, k_main, KB, G,
                              GS, X16, BF16, CHUNKS, SUB, True)  # fmt: skip
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        y += tl.load(b_ptr + n)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, y.to(y_ptr.dtype.element_ty))


@triton.jit
def int4_dot_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,  # x [M, 2 * KB] (even, padded), w uint8 [N, KB]
    M, N, KB, G, stride_xm, stride_ym,
    GS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KB: tl.constexpr,
):  # fmt: skip
    """int4 weight-only matmul on tensor cores for M > 4: a ``BLOCK_M x BLOCK_N`` tile of y per
    program, ``BLOCK_KB`` weight bytes (2 * BLOCK_KB codes, within one group) per K step.

    A dot product does not care about the order of k, so the packed bytes are never
    interleaved: the low nibbles ``[BN, BKB]`` dot the even columns of x and the high nibbles
    the odd ones, x read as element pairs (as in ``int4_gemv_kernel``) and split with shifts.
    Weights load as contiguous bytes (the tile kernel gathered every byte twice) and the loads
    feed ``tl.dot``, so Triton pipelines them (``cp.async``, ``num_stages``). ``code - zero`` is
    an exact small integer in x's dtype; the group scale multiplies the fp32 partial dot.
    """
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rb = tl.arange(0, BLOCK_KB)
    # Rows past M / N re-read the last row (in bounds) and are never stored.
    rows = tl.minimum(rn, N - 1).to(tl.int64)
    X16: tl.constexpr = x_ptr.dtype.element_ty != tl.float32
    BF16: tl.constexpr = x_ptr.dtype.element_ty == tl.bfloat16
    if X16:
        xp = x_ptr.to(tl.pointer_type(tl.int32))
    else:
        xp = x_ptr.to(tl.pointer_type(tl.int64))
    x_rows = xp + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * (stride_xm // 2)
    w_rows = w_ptr + rows[:, None] * KB
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb0 in range(0, KB, BLOCK_KB):
        b = kb0 + rb
        b_ok = (b < KB)[None, :]
        byte = tl.load(w_rows + b[None, :], mask=b_ok, other=0)  # [BN, BKB]
        xw = tl.load(x_rows + b[None, :], mask=b_ok, other=0)  # [BM, BKB] element pairs
        if X16:
            if BF16:
                xe = (xw << 16).to(tl.float32, bitcast=True).to(tl.bfloat16)
                xo = (xw & -65536).to(tl.float32, bitcast=True).to(tl.bfloat16)
            else:
                xe = xw.to(tl.int16).to(tl.float16, bitcast=True)
                xo = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True)
        else:
            xe = xw.to(tl.int32).to(tl.float32, bitcast=True)
            xo = (xw >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        g = (2 * kb0) // GS
        zp = (tl.load(z_ptr + rows * G + g).to(tl.int32) | _MAGIC_BITS).to(tl.float32, bitcast=True)
        sc = tl.load(s_ptr + rows * G + g)
        b32 = byte.to(tl.int32)
        lo = ((b32 & 0xF) | _MAGIC_BITS).to(tl.float32, bitcast=True) - zp[:, None]
        hi = ((b32 >> 4) | _MAGIC_BITS).to(tl.float32, bitcast=True) - zp[:, None]
        if IEEE:  # fp32 x (no TF32), and every dtype under the interpreter (module docstring)
            part = tl.dot(xe.to(tl.float32), tl.trans(lo), input_precision="ieee")
            part = tl.dot(xo.to(tl.float32), tl.trans(hi), part, input_precision="ieee")
        else:
            part = tl.dot(xe, tl.trans(lo.to(xe.dtype)))
            part = tl.dot(xo, tl.trans(hi.to(xo.dtype)), part)
        acc += part * sc[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(rm < M)[:, None] & (rn < N)[None, :])


@triton.jit
def _int8_gemv_step(acc, w_row, a_row, k0, K, CHUNKS: tl.constexpr, SUB: tl.constexpr,
                    MASKED: tl.constexpr, INT_ACT: tl.constexpr):  # fmt: skip
    """One K step of ``int8_gemv_kernel`` / ``int8_dyn_gemv_kernel``: acc ``[CHUNKS, SUB]`` +=
    w * a elementwise; ``a`` is x (fp32 products) or, with ``INT_ACT``, the int8 activation
    codes (exact int32 products)."""
    k = k0 + tl.arange(0, CHUNKS)[:, None] * SUB + tl.arange(0, SUB)[None, :]
    if MASKED:
        w = tl.load(w_row + k, mask=k < K, other=0)
        a = tl.load(a_row + k, mask=k < K, other=0)
    else:
        w = tl.load(w_row + k)
        a = tl.load(a_row + k)
    if INT_ACT:
        acc += a.to(tl.int32) * w.to(tl.int32)
    else:
        # 2**23 + (w + 128) via the bit trick, minus 2**23 + 128: the exact code as fp32, no I2F.
        wf = ((w.to(tl.int32) + 128) | _MAGIC_BITS).to(tl.float32, bitcast=True) - 8388736.0
        acc += wf * a.to(tl.float32)
    return acc


@triton.jit
def _int8_gemv_dot(w_row, a_row, K, CHUNKS: tl.constexpr, SUB: tl.constexpr,
                   INT_ACT: tl.constexpr):  # fmt: skip
    """``sum_k w[k] * a[k]`` over one row for both int8 decode kernels: unmasked main loop,
    masked last step, elementwise accumulation in ``[CHUNKS, SUB]`` and one reduction after the
    loop (int32 with ``INT_ACT``, else fp32)."""
    BK: tl.constexpr = CHUNKS * SUB
    if INT_ACT:
        acc = tl.zeros((CHUNKS, SUB), dtype=tl.int32)
    else:
        acc = tl.zeros((CHUNKS, SUB), dtype=tl.float32)
    k_main = (K // BK) * BK
    for k0 in range(0, k_main, BK):
        acc = _int8_gemv_step(acc, w_row, a_row, k0, K, CHUNKS, SUB, False, INT_ACT)
    if k_main < K:
        acc = _int8_gemv_step(acc, w_row, a_row, k_main, K, CHUNKS, SUB, True, INT_ACT)
    return tl.sum(tl.sum(acc, axis=1), axis=0)


@triton.jit
def int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr,  # x [M, K], w int8 [N, K], s fp32 [N], y [M, N]
    K, stride_xm, stride_ym,
    HAS_BIAS: tl.constexpr, CHUNKS: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """int8 weight-only GEMV for decode: program (n, m) computes ``y[m, n]``.

    Same design as ``int4_gemv_kernel`` (SASS-checked, not yet timed on a GPU): the weight and x
    tiles are both ``[CHUNKS, SUB]`` with the same contiguity, hence one register layout and no
    conversion in the loop; fp32 accumulation elementwise, one reduction after the loop; the
    per-channel scale multiplies the final sum; unmasked main loop, masked last step.
    """
    n, m = tl.program_id(0), tl.program_id(1)
    w_row = w_ptr + n.to(tl.int64) * K
    x_row = x_ptr + m.to(tl.int64) * stride_xm
    y = _int8_gemv_dot(w_row, x_row, K, CHUNKS, SUB, False) * tl.load(s_ptr + n)
    if HAS_BIAS:
        y += tl.load(b_ptr + n)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, y.to(y_ptr.dtype.element_ty))


@triton.jit
def int8_dyn_gemv_kernel(
    q_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr,  # q int8 [M, K], xs fp32 [M], w int8 [N, K]
    K, stride_ym,
    HAS_BIAS: tl.constexpr, CHUNKS: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    """w8a8 GEMV for decode: program (n, m) computes ``y[m, n]`` from the quantized row q[m].

    The structure of ``int8_gemv_kernel``: weight and activation codes in ``[CHUNKS, SUB]``
    tiles with one register layout, exact int32 products accumulated elementwise (K <= 2**17 is
    validated, so no partial sum overflows), one reduction after the loop, then the reference's
    epilogue ``(acc * xs[m]) * s[n] + b[n]``.
    """
    n, m = tl.program_id(0), tl.program_id(1)
    w_row = w_ptr + n.to(tl.int64) * K
    q_row = q_ptr + m.to(tl.int64) * K
    tot = _int8_gemv_dot(w_row, q_row, K, CHUNKS, SUB, True)
    y = tot.to(tl.float32) * tl.load(xs_ptr + m) * tl.load(s_ptr + n)
    if HAS_BIAS:
        y += tl.load(b_ptr + n)
    tl.store(y_ptr + m.to(tl.int64) * stride_ym + n, y.to(y_ptr.dtype.element_ty))


@triton.jit
def quantize_rows_int8_kernel(
    x_ptr, q_ptr, s_ptr,  # x [M, K] float, q int8 [M, K] contiguous, s fp32 [M]
    K, stride_xm,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Per-row symmetric int8, bit-exact with ``quant_ref.quantize_per_token_int8``:
    ``scale = amax / 127`` (1 for a zero row), ``q = clamp(round_half_even(x / scale))``."""
    row = tl.program_id(0).to(tl.int64)
    rk = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(x.to(tl.float32)))
    a = tl.max(amax, axis=0)
    scale = tl.where(a > 0, tl.math.div_rn(a, 127.0), 1.0)
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + rk, mask=k0 + rk < K, other=0.0)
        v = tl.math.div_rn(x.to(tl.float32), scale)  # IEEE division, as torch's x / scale
        # Round half to even via the 1.5 * 2**23 trick (exact for |v| <= 127 < 2**22).
        v = (v + 12582912.0) - 12582912.0
        v = tl.minimum(tl.maximum(v, -127.0), 127.0)
        tl.store(q_ptr + row * K + k0 + rk, v.to(tl.int8), mask=k0 + rk < K)


@triton.jit
def int8_dyn_kernel(
    q_ptr, xs_ptr, w_ptr, s_ptr, b_ptr, y_ptr,  # q int8 [M, K], xs fp32 [M], w int8 [N, K]
    M, N, K, stride_ym,
    HAS_BIAS: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Exact int32 accumulation, then ``(acc * xs[m]) * s[n] + b[n]`` in the reference's order."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    q_rows = q_ptr + rm.to(tl.int64)[:, None] * K
    w_rows = w_ptr + rn.to(tl.int64)[:, None] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        q = tl.load(q_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0)
        w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
        if USE_DOT:
            acc = tl.dot(q, tl.trans(w), acc, out_dtype=tl.int32)
        else:
            acc += tl.sum(q.to(tl.int32)[:, None, :] * w.to(tl.int32)[None, :, :], axis=2)
    xs = tl.load(xs_ptr + rm, mask=m_ok, other=0.0)
    y = acc.to(tl.float32) * xs[:, None] * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

"""Triton paged-attention kernel (launcher: ``infopt.ops.paged_attention._paged_attention_triton``).

One program per (packed query token, KV head). It holds the ``GROUP = Hq / Hkv`` query heads that
share the KV head as a ``[GROUP_P, D_P]`` tile, so GQA/MQA reads each KV tile once and never
materializes repeated heads. It walks the sequence's block table one page (``BLOCK_SIZE`` tokens)
at a time up to its causal limit, with an fp32 online softmax (running max ``m``, denominator
``l``, accumulator ``acc``). Scores use broadcast-multiply + sum rather than ``tl.dot``: tiles can
be smaller than the 16x16 minimum of ``tl.dot`` (block size 8, MHA group of 1), and decode is
bandwidth-bound anyway.

Quantized caches (``QUANT``): K/V rows are int8 or float8_e4m3fn with one fp32 scale per (token,
KV head) in ``ks_ptr``/``vs_ptr`` (``[num_blocks, BLOCK_SIZE, Hkv]`` contiguous); rows are scaled
as they are loaded. fp8 arrives as raw bytes (``FP8``) and is decoded by :func:`_e4m3_to_f32`.

Sliding window (``SLIDING``, ``window`` keys): the loop starts at the page holding the query's
first window key, so pages before it are never read (their table entries may be stale), and keys
of that page before the window are masked. Soft-capping (``SOFTCAP``): scores become
``softcap * tanh(score / softcap)`` (score already scaled), with :func:`_tanh`.
"""

import triton
import triton.language as tl


@triton.jit
def _e4m3_to_f32(bits):
    """float8_e4m3fn bytes (uint8) -> fp32, exactly: s eeee mmm, bias 7, no infinities,
    ``eeee mmm == 1111 111`` is NaN, ``eeee == 0`` subnormal (m / 8 * 2**-6)."""
    b = bits.to(tl.int32)
    sign = tl.where((b & 0x80) != 0, -1.0, 1.0)
    e = (b >> 3) & 0xF
    m = (b & 0x7).to(tl.float32)
    normal = (1.0 + m / 8.0) * tl.exp2((e - 7).to(tl.float32))
    sub = m / 8.0 * 0.015625  # 2**-6
    val = tl.where(e == 0, sub, normal)
    val = tl.where((b & 0x7F) == 0x7F, float("nan"), val)
    return sign * val


@triton.jit
def _tanh(x):
    """fp32 tanh from ``tl.exp`` (``tl`` has none that the interpreter and every GPU share):
    Cephes' odd polynomial for ``|x| < 0.625`` (no cancellation near 0), else
    ``1 - 2 / (exp(2|x|) + 1)`` (``exp`` overflowing to inf gives exactly 1)."""
    a = tl.abs(x)
    z = x * x
    small = (
        (((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z + 1.33314422036e-1)
        * z
        - 3.33332819422e-1
    ) * z * x + x
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    return tl.where(a < 0.625, small, big)


@triton.jit
def _load_rows(ptr, off, mask, sc_ptr, sc_off, tmask, QUANT: tl.constexpr, FP8: tl.constexpr):
    """A ``[BLOCK_SIZE, D_P]`` tile of K or V as fp32, dequantized when ``QUANT``."""
    if FP8:
        x = _e4m3_to_f32(tl.load(ptr + off, mask=mask, other=0))
    else:
        x = tl.load(ptr + off, mask=mask, other=0).to(tl.float32)
    if QUANT:
        x = x * tl.load(sc_ptr + sc_off, mask=tmask, other=0.0)[:, None]
    return x


@triton.jit
def paged_attention_kernel(
    q_ptr,  # [N, Hq, D], D unit-stride
    k_ptr,  # [num_blocks, BLOCK_SIZE, Hkv, D], D unit-stride
    v_ptr,  # same layout as k
    o_ptr,  # [N, Hq, D] q.dtype (or fp32 under the interpreter)
    bt_ptr,  # int32 [B, max_blocks]
    seq_idx_ptr,  # int32 [N]: which sequence each query token belongs to
    q_pos_ptr,  # int32 [N]: absolute position of each query token (causal limit)
    ks_ptr,  # fp32 [num_blocks, BLOCK_SIZE, Hkv] K scales (read only when QUANT)
    vs_ptr,  # fp32 V scales, same layout
    stride_qn,
    stride_qh,
    stride_on,
    stride_oh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_bt,
    HKV,
    scale,
    window,  # keys per query window (read only when SLIDING)
    softcap,  # logit cap (read only when SOFTCAP)
    GROUP: tl.constexpr,
    GROUP_P: tl.constexpr,
    D: tl.constexpr,
    D_P: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    QUANT: tl.constexpr,
    FP8: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1).to(tl.int64)
    b = tl.load(seq_idx_ptr + n).to(tl.int64)
    kv_len = tl.load(q_pos_ptr + n) + 1

    g = tl.arange(0, GROUP_P)
    d = tl.arange(0, D_P)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    qmask = gmask[:, None] & dmask[None, :]
    q = tl.load(
        q_ptr + n * stride_qn + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )
    q = q.to(tl.float32)

    m = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_P], dtype=tl.float32)
    acc = tl.zeros([GROUP_P, D_P], dtype=tl.float32)
    t = tl.arange(0, BLOCK_SIZE)
    num_pages = tl.cdiv(kv_len, BLOCK_SIZE)
    if SLIDING:
        lo = tl.maximum(kv_len - window, 0)  # first key in the window
    else:
        lo = 0
    for p in range(lo // BLOCK_SIZE, num_pages):
        blk = tl.load(bt_ptr + b * stride_bt + p).to(tl.int64)
        tmask = p * BLOCK_SIZE + t < kv_len
        if SLIDING:
            tmask = tmask & (p * BLOCK_SIZE + t >= lo)
        kvmask = tmask[:, None] & dmask[None, :]
        sc_off = (blk * BLOCK_SIZE + t) * HKV + kvh
        k_off = blk * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + d[None, :]
        k = _load_rows(k_ptr, k_off, kvmask, ks_ptr, sc_off, tmask, QUANT, FP8)  # [BLOCK_SIZE, D_P]
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_P, BLOCK_SIZE]
        if SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(tmask[None, :], s, float("-inf"))
        # The first page holds key lo (lo <= kv_len - 1), so m_new is finite from it on.
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        pr = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(pr, axis=1)
        v_off = blk * stride_vb + t[:, None] * stride_vt + kvh * stride_vh + d[None, :]
        v = _load_rows(v_ptr, v_off, kvmask, vs_ptr, sc_off, tmask, QUANT, FP8)
        acc = acc * alpha[:, None] + tl.sum(pr[:, :, None] * v[None, :, :], axis=1)
        m = m_new

    out = acc / l_sum[:, None]
    o_off = n * stride_on + heads[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=qmask)

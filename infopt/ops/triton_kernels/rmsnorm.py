"""Triton RMSNorm kernel (launcher: ``infopt.ops.rmsnorm._rms_norm_triton``).

One program per row; fp32 accumulation; rounding as in HF LlamaRMSNorm (normalize in fp32, round
to x's dtype, multiply by the weight in fp32, round once more).
"""

import triton
import triton.language as tl


@triton.jit
def _round_to_out(v, out_ty: tl.constexpr, SOFT_BF16: tl.constexpr):
    """fp32 -> out_ty with round-to-nearest-even.

    The Triton interpreter truncates fp32 -> bf16 (GPUs round to nearest even), which would make
    interpreter results differ from torch in the last bit, so under the interpreter bf16 rounding
    is done on the bit pattern instead. NaNs keep the plain conversion (the bit trick can't).
    """
    if SOFT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        r = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(v != v, v.to(tl.bfloat16), r)
    else:
        return v.to(out_ty)


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [rows, H] x.dtype, hidden dim unit-stride, rows x_row_stride apart
    w_ptr,  # [H] x.dtype or float32
    y_ptr,  # [rows, H] x.dtype, rows y_row_stride apart
    x_row_stride,
    y_row_stride,
    H,
    eps,
    BLOCK: tl.constexpr,
    SINGLE_PASS: tl.constexpr,  # True: BLOCK >= H, the whole row stays in registers
    SOFT_BF16: tl.constexpr,  # True only for bf16 output under the interpreter
):
    row = tl.program_id(0).to(tl.int64)  # int64 offsets: rows * stride can exceed 2**31
    x_row = x_ptr + row * x_row_stride
    y_row = y_ptr + row * y_row_stride
    out_ty: tl.constexpr = y_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    if SINGLE_PASS:
        mask = cols < H
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / H
        inv = 1.0 / tl.sqrt_rn(var + eps)
        normed = _round_to_out(x * inv, out_ty, SOFT_BF16).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, _round_to_out(w * normed, out_ty, SOFT_BF16), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        var = tl.sum(acc, axis=0) / H
        inv = 1.0 / tl.sqrt_rn(var + eps)
        for start in range(0, H, BLOCK):
            mask = start + cols < H
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            normed = _round_to_out(x * inv, out_ty, SOFT_BF16).to(tl.float32)
            w = tl.load(w_ptr + start + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_row + start + cols, _round_to_out(w * normed, out_ty, SOFT_BF16), mask=mask)

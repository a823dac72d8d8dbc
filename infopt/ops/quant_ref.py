"""Pure-torch reference matmuls for infopt's quantized linear formats.

These are the ground truth the fast backends (C++, Triton, CUDA) are checked against, so
they favour obviously-correct math over speed: weights are dequantized to fp32, products are
accumulated in fp32 (int8 x int8 in exact integer arithmetic), and the result is cast back
to the input's dtype. No registry code lives here; ``infopt.ops`` registers these functions
as the ``reference`` backend of the ops of the same name.

Common conventions (``M`` = tokens, ``K`` = in features, ``N`` = out features):

* ``x``: ``[..., K]`` float (fp32 / bf16 / fp16); the output is ``[..., N]`` in ``x.dtype``.
* ``bias``: ``[N]`` or None, added in fp32 before the final cast.
* scales are float tensors (fp32 when produced by ``infopt.quant``; any float dtype accepted).

Packed int4 layout (``int4_weight_only_linear``): ``qweight`` is uint8 ``[N, ceil(K/2)]``,
row-major; byte ``j`` of row ``n`` holds code ``k = 2j`` in its low nibble and ``k = 2j + 1``
in its high nibble; for odd ``K`` the last high nibble is 0 padding. Codes are 0..15 and
dequantize as ``(code - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``; ``scale`` is
``[N, G]`` float and ``zero`` ``[N, G]`` uint8 (integer zero point, 0..15), ``G =
ceil(K / group_size)`` (the last group may be shorter than ``group_size``).
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_E4M3_MAX",
    "dequantize_int4_packed",
    "fp8_linear",
    "int4_weight_only_linear",
    "int8_dynamic_linear",
    "int8_matmul_int32",
    "int8_weight_only_linear",
    "quantize_per_token_fp8",
    "int4_dynamic_linear",
    "quantize_blockwise_int8",
    "quantize_per_token_int8",
    "true_div",
    "unpack_int4",
]

# Largest finite float8_e4m3fn value.
FP8_E4M3_MAX = 448.0


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the weight expects {k}")
    return x.reshape(-1, k)


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """fp32 ``y [M, N]`` + bias, back to ``x``'s leading shape and dtype."""
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])


def true_div(a: torch.Tensor, d: float) -> torch.Tensor:
    """``a / d`` by IEEE division on every device.

    ``tensor / python_float`` is not that on CUDA: PyTorch multiplies by the reciprocal when the
    divisor is a CPU scalar ("may lose one bit of precision"), so a scale ``amax / 127`` can
    differ in its last bit from the kernels' (and the CPU's) ``amax / 127``, and a code that
    sits on a rounding boundary then flips. Dividing by a same-device tensor takes the true
    division kernel.
    """
    return a / torch.full_like(a, d)


def int8_weight_only_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``y = x @ (qweight * scale[:, None]).T + bias``.

    Args:
        x: ``[..., K]`` float.
        qweight: int8 ``[N, K]`` (symmetric, codes in -127..127).
        scale: ``[N]`` per-output-channel scale.
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    x2 = _flatten(x, qweight.shape[1])
    # Scaling the [M, N] output instead of the [N, K] weight is the same math with fewer ops.
    y = (x2.float() @ qweight.float().t()) * scale.float()
    return _finish(y, bias, x)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of ``infopt.quant.pack_int4``: uint8 ``[N, ceil(K/2)]`` -> codes uint8 ``[N, K]``."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(
            f"packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}"
        )
    if packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed has {packed.shape[1]} bytes per row, K={k} needs {(k + 1) // 2}")
    return _unpack_int32(packed, k).to(torch.uint8)


def _unpack_int32(packed: torch.Tensor, k: int) -> torch.Tensor:
    # int32 arithmetic: uint8 elementwise kernels are ~10x slower on CPU in torch.
    p = packed.to(torch.int32)
    return torch.stack((p & 0x0F, p >> 4), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def dequantize_int4_packed(
    qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, k: int
) -> torch.Tensor:
    """Packed int4 -> fp32 ``[N, K]``: ``(code - zero[n, k // gs]) * scale[n, k // gs]``."""
    n = qweight.shape[0]
    g = (k + group_size - 1) // group_size
    if scale.shape != (n, g) or zero.shape != (n, g):
        raise ValueError(
            f"scale/zero must be [N, ceil(K/group_size)] = [{n}, {g}], got "
            f"{tuple(scale.shape)} / {tuple(zero.shape)}"
        )
    if qweight.dtype != torch.uint8 or qweight.shape[1] != (k + 1) // 2:
        raise ValueError(
            f"qweight must be uint8 [N, ceil(K/2)] = [{n}, {(k + 1) // 2}], got "
            f"{qweight.dtype} {tuple(qweight.shape)}"
        )
    codes = _unpack_int32(qweight, k)
    if g * group_size != k:  # ragged last group: pad to whole groups, drop the pad after
        codes = torch.nn.functional.pad(codes, (0, g * group_size - k))
    # Broadcasting per group avoids materialising [N, K] copies of scale and zero.
    w = (codes.view(n, g, group_size).float() - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(n, g * group_size)[:, :k]


def int4_weight_only_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = x @ dequant(qweight).T + bias`` for group-wise asymmetric int4 weights.

    Args:
        x: ``[..., K]`` float.
        qweight: uint8 ``[N, ceil(K/2)]``, layout in the module docstring.
        scale: ``[N, G]`` float, ``G = ceil(K / group_size)``.
        zero: ``[N, G]`` uint8 zero points in 0..15.
        group_size: columns per group along K (the last group may be ragged).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    # K is not recoverable from the packed width alone when it is odd; the groups pin it down.
    k = x.shape[-1]
    w = dequantize_int4_packed(qweight, scale, zero, group_size, k)
    y = _flatten(x, k).float() @ w.t()
    return _finish(y, bias, x)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric per-row int8: ``x [M, K]`` -> (codes int8 ``[M, K]``, scale fp32 ``[M]``).

    ``scale = max|x_m| / 127`` (1 for an all-zero row, whose codes are then 0).
    """
    return _symmetric_int8(x.float())


def _symmetric_int8(xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one int8 rounding rule, over the last dim of fp32 ``xf [..., B]``: (codes int8
    ``[..., B]``, scale ``[...]``), ``scale = max| | / 127`` (1 for all zeros) and codes
    ``round_half_even(x / scale)`` clamped to +-127."""
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, true_div(amax, 127.0), torch.ones_like(amax))
    q = torch.round(xf / scale[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul_int32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` for int8 ``a [M, K]``, ``b [N, K]`` -> int32 ``[M, N]``.

    Computed in float64: every product is at most 127*128 in magnitude and any realistic K
    keeps the sum far below 2**53, so the result is exact; it fits int32 for K < 2**17.
    (``torch._int_mm`` would be faster but has shape/device restrictions that vary across
    torch versions; the reference must work everywhere.)
    """
    if a.dtype != torch.int8 or b.dtype != torch.int8:
        raise TypeError(f"int8_matmul_int32 needs int8 operands, got {a.dtype} and {b.dtype}")
    if a.shape[1] >= 2**17:
        raise ValueError(f"K={a.shape[1]} could overflow int32 accumulation (limit 2**17)")
    return (a.double() @ b.double().t()).to(torch.int32)


def int8_dynamic_linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8: per-token dynamic int8 activations x per-channel int8 weights, int32 accumulation.

    ``y[m, n] = (sum_k xq[m, k] * qweight[n, k]) * x_scale[m] * scale[n] + bias[n]`` where
    ``xq, x_scale = quantize_per_token_int8(x)``. SmoothQuant's per-input-channel smoothing is
    either folded into the previous op or applied by the caller before this function.

    Args:
        x: ``[..., K]`` float.
        qweight: int8 ``[N, K]``.
        scale: ``[N]`` per-output-channel weight scale.
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    xq, xs = quantize_per_token_int8(_flatten(x, qweight.shape[1]))
    acc = int8_matmul_int32(xq, qweight)
    y = acc.float() * xs[:, None] * scale.float()
    return _finish(y, bias, x)


#: Activation block along K of :func:`quantize_blockwise_int8` / :func:`int4_dynamic_linear`.
ACT_BLOCK = 32


def quantize_blockwise_int8(
    x: torch.Tensor, block: int = ACT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per block of ``block`` along K: ``x [M, K]`` -> (codes int8
    ``[M, K]``, scale fp32 ``[M, ceil(K / block)]``).

    ``scale = max|block| / 127`` (1 for an all-zero block, whose codes are then 0); codes are
    ``round_half_even(x / scale)`` clamped to +-127. The last block may be short.
    """
    xf = x.float()
    m, k = xf.shape
    nb = -(-k // block)
    q, scale = _symmetric_int8(torch.nn.functional.pad(xf, (0, nb * block - k)).view(m, nb, block))
    return q.view(m, nb * block)[:, :k], scale


def int4_dynamic_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """int4 weights x int8 activations quantized on the fly per block of 32 along K.

    ``y = xhat @ dequant(qweight).T + bias`` with ``xhat = xq * xs`` from
    :func:`quantize_blockwise_int8` (fp32 math). The weights are exactly those of
    :func:`int4_weight_only_linear`; only the activations are rounded (to 8 bits per 32-wide
    block), which lets the CPU kernel use int8 dot products (AVX-512 VNNI).

    Args: as :func:`int4_weight_only_linear`.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    k = x.shape[-1]
    w = dequantize_int4_packed(qweight, scale, zero, group_size, k)
    xq, xs = quantize_blockwise_int8(_flatten(x, k))
    xhat = xq.float() * xs.repeat_interleave(ACT_BLOCK, dim=1)[:, :k]
    return _finish(xhat @ w.t(), bias, x)


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row e4m3: ``x [M, K]`` -> (float8_e4m3fn ``[M, K]``, scale fp32 ``[M]``).

    ``scale = max|x_m| / 448``; values are clamped to +-448 before the cast because an
    out-of-range float8_e4m3fn cast gives NaN rather than saturating.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    scale = torch.where(amax > 0, true_div(amax, FP8_E4M3_MAX), torch.ones_like(amax))
    q = (xf / scale[:, None]).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """FP8 (e4m3) weights and per-token dynamic e4m3 activations, fp32 accumulation.

    This is the *emulation* (quantize -> dequantize in fp32) that a native fp8 GEMM such as
    ``torch._scaled_mm`` on sm_89+ GPUs must match up to fp32 summation order.

    Args:
        x: ``[..., K]`` float.
        weight: float8_e4m3fn ``[N, K]``.
        scale: ``[N]`` per-output-channel weight scale (``w ~= weight * scale[:, None]``).
        bias: ``[N]`` or None.
    Returns:
        ``[..., N]`` in ``x.dtype``.
    """
    if weight.dtype != torch.float8_e4m3fn:
        raise TypeError(f"fp8_linear needs a float8_e4m3fn weight, got {weight.dtype}")
    xq, xs = quantize_per_token_fp8(_flatten(x, weight.shape[1]))
    y = (xq.float() @ weight.float().t()) * xs[:, None] * scale.float()
    return _finish(y, bias, x)

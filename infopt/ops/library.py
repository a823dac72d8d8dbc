"""Fake (meta) implementations of the ``infopt::*`` ops defined in ``csrc/cpu/schema.cpp``.

The schemas live in C++ (defined exactly once); their shape/dtype propagation for FakeTensor,
``torch.compile`` and ``torch.export`` lives here, all in one place. :func:`register_fakes` runs
right after the CPU library is loaded (the op must exist before a fake can be attached).
"""

from __future__ import annotations

import threading

import torch

__all__ = ["register_fakes"]

_registered = False
_lock = threading.Lock()


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # The kernels always write a fresh contiguous tensor of x's shape and dtype.
    torch._check(weight.dim() == 1, lambda: f"weight must be 1-D, got {weight.dim()}-D")
    torch._check(
        x.dim() >= 1 and x.shape[-1] == weight.shape[0],
        lambda: f"x.shape[-1] must equal weight.shape[0], got {tuple(x.shape)} / {weight.shape[0]}",
    )
    return x.new_empty(x.shape)


def _quant_linear_fake(x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    # Quantized linears: x [..., K] -> a fresh contiguous [..., N] in x's dtype.
    torch._check(x.dim() >= 1, lambda: "x must have at least 1 dimension")
    if bias is not None:
        torch._check(bias.shape == (n,), lambda: f"bias must be [N] = [{n}], got {bias.shape}")
    return x.new_empty((*x.shape[:-1], n))


def _int8_weight_only_linear_fake(x, qweight, scale, bias):
    torch._check(
        qweight.dim() == 2 and qweight.shape[1] == x.shape[-1],
        lambda: f"qweight must be [N, K={x.shape[-1]}], got {tuple(qweight.shape)}",
    )
    return _quant_linear_fake(x, qweight.shape[0], bias)


def _int4_weight_only_linear_fake(x, qweight, scale, zero, group_size, bias):
    torch._check(
        qweight.dim() == 2 and qweight.shape[1] == (x.shape[-1] + 1) // 2,
        lambda: f"qweight must be [N, ceil(K/2)] for K={x.shape[-1]}, got {tuple(qweight.shape)}",
    )
    return _quant_linear_fake(x, qweight.shape[0], bias)


def _int4_tiled_linear_fake(x, codes, meta, n, group_size, bias):
    torch._check(
        codes.dim() == 3 and codes.shape[1] * 128 == x.shape[-1],
        lambda: f"codes must be [ceil(N/16), K/128, 1024] for K={x.shape[-1]}, got {codes.shape}",
    )
    return _quant_linear_fake(x, n, bias)


def _paged_attention_fake(
    q,
    k_cache,
    v_cache,
    block_tables,
    seq_lens,
    query_start_loc,
    scale,
    k_scale=None,
    v_scale=None,
    window=None,
    softcap=None,
):
    # Output: a fresh tensor shaped and typed like the packed queries [N, Hq, D].
    torch._check(q.dim() == 3, lambda: f"q must be [N, Hq, D], got {q.dim()}-D")
    torch._check(k_cache.dim() == 4, lambda: "k_cache must be [num_blocks, block_size, Hkv, D]")
    torch._check(window is None or window >= 1, lambda: f"window must be >= 1, got {window}")
    torch._check(softcap is None or softcap > 0, lambda: f"softcap must be > 0, got {softcap}")
    return q.new_empty(q.shape)


def _dense_gemv_fake(x, weight, bias=None):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "x must be [M, K], weight [N, K]")
    return x.new_empty((x.shape[0], weight.shape[0]))


def register_fakes() -> None:
    """Attach fake impls to the loaded ``infopt::*`` ops (idempotent)."""
    global _registered
    with _lock:
        if _registered:
            return
        torch.library.register_fake("infopt::rms_norm")(_rms_norm_fake)
        torch.library.register_fake("infopt::dense_gemv")(_dense_gemv_fake)
        torch.library.register_fake("infopt::int8_weight_only_linear")(
            _int8_weight_only_linear_fake
        )
        torch.library.register_fake("infopt::int4_weight_only_linear")(
            _int4_weight_only_linear_fake
        )
        # int4 x dynamic int8 activations has the int4 weight-only signature and output.
        torch.library.register_fake("infopt::int4_dynamic_linear")(_int4_weight_only_linear_fake)
        # w8a8 has the int8 weight-only signature and output.
        torch.library.register_fake("infopt::int8_dynamic_linear")(_int8_weight_only_linear_fake)
        torch.library.register_fake("infopt::int4_tiled_linear")(_int4_tiled_linear_fake)
        torch.library.register_fake("infopt::paged_attention")(_paged_attention_fake)
        _registered = True

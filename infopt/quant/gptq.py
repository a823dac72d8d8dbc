"""GPTQ for group-wise asymmetric int4 (Frantar et al., 2022).

Given a layer's weight ``W [N, K]`` and the Hessian of its output error, ``H = 2 X^T X / T``
over calibration inputs ``X [T, K]``, GPTQ quantizes columns one at a time and pushes each
column's rounding error onto the not-yet-quantized columns through the inverse Hessian
(Optimal Brain Surgeon update), in lazy blocks of ``block_size`` columns:

1. dead inputs (``H_kk = 0``) get ``H_kk = 1`` and zero weight; ``H += damp * mean(diag H) * I``;
2. ``U = chol(H^-1)`` (upper); for each column k: ``q_k = Q(w_k)``,
   ``e_k = (w_k - q_k) / U_kk``, ``W[:, j>k] -= e_k U_k,j``;
3. group parameters (scale, zero) are computed when a group's first column is reached, from
   the error-compensated weights of that group (groups never straddle blocks because
   ``block_size`` is a multiple of ``group_size``);
4. ``act_order``: columns are visited in order of decreasing ``H_kk``; group parameters are
   then computed up front on the original weights in the original column order ("static
   groups"), so the stored codes and the packed layout are the standard, unpermuted ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .formats import check_group_size, check_weight, int4_params, num_groups, pack_int4

__all__ = ["gptq_quantize"]


@contextlib.contextmanager
def _one_thread_on_cpu(device: torch.device) -> Iterator[None]:
    """Run the column loop single-threaded on CPU: its ops are ``[N, <=block_size]`` updates,
    too small to amortise intra-op thread synchronisation (measured 30x slower with 2
    threads on a loaded 2-core machine). Restores the previous setting."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int = 128,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize one linear layer.

    Args:
        weight: float ``[N, K]``.
        hessian: ``[K, K]``, ``2 X^T X / T`` of the layer's calibration inputs.
        group_size: 32, 64 or 128.
        damp: diagonal damping as a fraction of ``mean(diag(H))``.
        block_size: lazy-update block width, a multiple of ``group_size``.
        act_order: quantize columns in decreasing-``H_kk`` order (static groups).
    Returns:
        ``(qweight uint8 [N, ceil(K/2)], scale fp32 [N, G], zero uint8 [N, G])``, the same
        format as :func:`~infopt.quant.formats.quantize_int4`.
    """
    w = check_weight(weight).float().clone()
    check_group_size(group_size)
    n, k = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [K, K] = [{k}, {k}], got {tuple(hessian.shape)}")
    if block_size <= 0 or block_size % group_size:
        raise ValueError(f"block_size must be a positive multiple of group_size, got {block_size}")
    h = hessian.to(device=w.device, dtype=torch.float32).clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g_total = num_groups(k, group_size)
    scale = torch.zeros(n, g_total, device=w.device)
    zero = torch.zeros(n, g_total, dtype=torch.uint8, device=w.device)
    perm = None
    if act_order:
        scale, zero = int4_params(w, group_size)  # static groups, original order
        perm = torch.argsort(torch.diag(h), descending=True)
        w = w[:, perm]
        h = h[perm][:, perm]
        group_of = (perm // group_size).tolist()
    else:
        group_of = [c // group_size for c in range(k)]

    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    # Upper Cholesky factor of H^-1: row k holds the OBS update coefficients for column k.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    with _one_thread_on_cpu(w.device):
        _column_loop(w, hinv, codes, scale, zero, group_of, group_size, block_size, act_order)

    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return pack_int4(codes), scale, zero


def _column_loop(
    w: torch.Tensor, hinv: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
    zero: torch.Tensor, group_of: list[int], group_size: int, block_size: int, act_order: bool,
) -> None:
    """Quantize ``w [N, K]`` column by column with OBS error feedback, filling ``codes`` (and,
    without act_order, ``scale`` / ``zero`` as groups are reached) in place."""
    k = w.shape[1]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_of[col]
            if not act_order and col % group_size == 0:
                width = min(group_size, k - col)
                s_g, z_g = int4_params(w1[:, i : i + width], group_size)
                scale[:, g], zero[:, g] = s_g[:, 0], z_g[:, 0]
            s, z = scale[:, g], zero[:, g].float()
            col_w = w1[:, i]
            q = torch.clamp(torch.round(col_w / s) + z, 0, 15)
            codes[:, col] = q.to(torch.uint8)
            e = (col_w - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

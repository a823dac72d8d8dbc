"""AWQ (activation-aware weight quantization, Lin et al., 2023) and SmoothQuant smoothing.

Both rescale a linear's input channels: ``y = x W^T = (x / s) (W diag(s))^T``. The ``1 / s``
is folded into the op that produces ``x`` when the block structure allows it (see
:func:`~infopt.quant.structure.find_fold`), otherwise it stays as an explicit ``in_scale``
multiplier in the quantized module.

AWQ search (per input group, i.e. linears sharing one input): for alpha on a grid in [0, 1),
``s = mean|X|^alpha`` (normalised so ``max(s) * min(s) = 1``), and the output error of the
fake-quantized group ``E(s) = sum_i tr(D_i C D_i^T)`` with ``D_i = Q(W_i diag(s)) diag(s)^-1
- W_i`` and ``C = X^T X / T`` is minimised. Because ``C`` accumulates *all* calibration tokens,
the error is exact over the calibration set, no token subsampling; it is a sum over output
rows, scored on up to 256 evenly spaced rows per weight (``O(256 K^2)`` per candidate).
The optional clip search then shrinks each (row, group) range by a ratio in
``{1, 0.95, ..., 0.55}``, chosen by one coordinate-descent sweep over the groups on the
linear's whole output error (cross-group terms included; see :func:`awq_clip_ratios`). With
clipping on, each alpha is scored by its error *after* its clip search on the row subset
(scoring before clipping picked scales that clipping then undid: on Qwen2.5-1.5B the
clip-aware search mostly picks alpha = 0 for q/k/v and gate/up). Both searches use
``C + damp * mean(diag C) * I`` (:func:`damp_cov`), which lowers the error on held-out text.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blockwise import InputStats, collect_stats
from .formats import fake_quantize_int4, num_groups
from .qlinear import Int4Linear, W8A8Linear
from .structure import BlockInputs, apply_fold, find_fold, set_tensor

__all__ = [
    "AWQ_DAMP", "awq_block", "awq_clip_ratios", "awq_search_scale", "damp_cov", "smooth_block",
    "smoothquant_scale",
]

_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))
# Ridge on the covariance for AWQ's searches, as a fraction of its mean diagonal (damp_cov).
AWQ_DAMP = 0.1


def _output_error(delta: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``tr(D C D^T)`` = mean squared output error of weight error ``D [N, K]``."""
    return ((delta @ cov) * delta).sum()


_SEARCH_ROWS = 256


def _row_subset(w: torch.Tensor) -> torch.Tensor:
    """At most ``_SEARCH_ROWS`` evenly spaced rows of ``w [N, K]`` (all of them when fewer)."""
    n = w.shape[0]
    if n <= _SEARCH_ROWS:
        return w
    return w[torch.linspace(0, n - 1, _SEARCH_ROWS, device=w.device).round().long()]


def damp_cov(cov: torch.Tensor, damp: float) -> torch.Tensor:
    """``C + damp * mean(diag C) * I`` for ``C [K, K]`` (GPTQ's damping, for AWQ's searches).

    Why: the searches fit choices to the calibration covariance, which is noisy (rank-deficient
    when K exceeds the calibration tokens: Qwen2.5-1.5B's down_proj has K = 8960 against 8192
    tokens). The ridge adds an uncorrelated-error floor, so choices that only cancel errors
    inside the calibration subspace are rewarded less (held-out errors: docs/results.md).
    """
    if damp == 0:
        return cov
    out = cov.clone()  # add to the diagonal in place: no [K, K] identity (K = 8960: 320 MB)
    out.diagonal().add_(damp * cov.diagonal().mean())
    return out


@torch.no_grad()
def awq_search_scale(
    weights: list[torch.Tensor], stats: InputStats, group_size: int, grid: int = 20,
    *, clip: bool = False,
) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale ``s [K]`` for a group of weights ``[N_i, K]`` sharing input.

    ``clip=True`` scores every candidate *after* its own clip search (:func:`awq_clip_ratios`),
    i.e. by the error the quantized weights will have, not the error before clipping. The
    error uses ``stats.cov`` as given (:func:`awq_block` passes it through :func:`damp_cov`).
    Returns ``(s, alpha)``: the winning scale and exponent; ``s`` is all ones when no
    rescaling helps (alpha = 0).
    """
    if stats.cov is None:
        raise ValueError("AWQ needs the input covariance (collect_stats(with_cov=True))")
    cov = stats.cov.float()
    # The error is a sum over output rows and every row sees the same input scaling, so the
    # search scores candidates on an evenly spaced subset of at most ``_SEARCH_ROWS`` rows per
    # weight: the cost per candidate is O(rows K^2) instead of O(N K^2) (Qwen2.5-1.5B's
    # down_proj, K = 8960: 6x cheaper, its gate/up_proj 35x).
    # Each subset's error is scaled back by N / rows so the group members keep their weight.
    ws = [(_row_subset(w.float()), w.shape[0]) for w in weights]
    x_mean = stats.mean_abs.float().clamp_min(1e-4)
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    # AutoAWQ's "duo scaling" (s = x^a / w^(1-a)) as extra candidates measured worse on
    # SmolLM2-135M (g128 KL 0.188 vs 0.173), mixed on Qwen2.5-0.5B, so only s = x^a is searched.
    for j in range(grid):
        alpha = j / grid
        s = x_mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        if clip:
            # The quantizer sees W diag(s) with input x / s (covariance C / (s s^T)); the
            # output error is the same in both spaces.
            cs = cov / (s[:, None] * s[None, :])
            err = sum(_clip_search(w * s, cs, group_size)[1] * (n / len(w)) for w, n in ws)
        else:
            err = sum(
                _output_error(fake_quantize_int4(w * s, group_size) / s - w, cov) * (n / len(w))
                for w, n in ws
            )
        if float(err) < best[0]:
            best = (float(err), s, alpha)
    return best[1], best[2]


@torch.no_grad()
def awq_clip_ratios(weight: torch.Tensor, cov: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-(row, group) range shrink ratios ``[N, G]`` minimising the linear's output error.

    One coordinate-descent sweep over the groups: group g's ratio minimises the row's whole
    error ``d^T C d`` with the other groups' errors held at their current choice, i.e.
    ``d_g^T C_gg d_g + 2 d_g^T (C d - C_gg d_g)_g`` (the cross terms matter: quantization errors
    of correlated channels in different groups add up or cancel in the output). Starts from no
    clipping and every step keeps the current choice as a candidate, so the error never grows.
    Cost O(N K^2), about one ``[N, K] x [K, K]`` product.
    """
    return _clip_search(weight, cov, group_size)[0]


def _clip_search(
    weight: torch.Tensor, cov: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`awq_clip_ratios` ``[N, G]`` and the error ``tr(D C D^T)`` it ends with (0-dim)."""
    w = weight.float()
    n, k = w.shape
    g = num_groups(k, group_size)
    pad = g * group_size - k
    c = torch.nn.functional.pad(cov.float(), (0, pad, 0, pad))  # ragged tail: zero rows / cols
    deltas = torch.stack(  # [R, N, G, gs] weight error per candidate ratio
        [
            torch.nn.functional.pad(fake_quantize_int4(w, group_size, clip_ratio=r) - w, (0, pad))
            .reshape(n, g, group_size)
            for r in _CLIP_RATIOS
        ]
    )
    choice = torch.zeros(n, g, dtype=torch.long, device=w.device)  # index 0: ratio 1.0
    d = deltas[0].reshape(n, g * group_size).clone()
    e = d @ c  # [N, Kp]: C d per row
    rows = torch.arange(n, device=w.device)
    for gi in range(g):
        sl = slice(gi * group_size, (gi + 1) * group_size)
        cgg = c[sl, sl]
        old = d[:, sl]
        cross = e[:, sl] - old @ cgg  # (C_g,rest d_rest) per row
        cand = deltas[:, :, gi, :]  # [R, N, gs]
        score = ((cand @ cgg) * cand).sum(-1) + 2 * (cand * cross).sum(-1)  # [R, N]
        best = score.argmin(0)
        new = cand[best, rows]
        e += (new - old) @ c[sl, :]
        d[:, sl] = new
        choice[:, gi] = best
    ratios = torch.tensor(_CLIP_RATIOS, device=w.device)
    return ratios[choice], (d * e).sum()


def _apply_scale(
    block: nn.Module, group: list[str], s: torch.Tensor, chunks: BlockInputs
) -> torch.Tensor | None:
    """Fold ``s`` into the group's producer if possible; returns the explicit ``in_scale``
    (``1 / s``) the group's modules must keep when no fold is possible, else None."""
    mods = dict(block.named_modules())
    prev = find_fold(block, group, *chunks[0])
    if prev is not None:
        apply_fold(block, prev, group, s)
        return None
    for name in group:
        w = mods[name].weight
        set_tensor(mods[name], "weight", w * s.to(w)[None, :])
    return 1.0 / s


@torch.no_grad()
def awq_block(
    block: nn.Module, groups: list[list[str]], chunks: BlockInputs, *, group_size: int,
    grid: int = 20, clip: bool = True, damp: float = AWQ_DAMP, sink_weight: float = 1.0,
) -> dict[str, nn.Module]:
    """AWQ for one block: search + apply scales for every group, then clip-search + quantize.

    ``damp``: ridge on the calibration covariance for both searches (:func:`damp_cov`).
    ``sink_weight``: how many times the covariance counts each calibration sequence's first
    token, the attention sink (``collect_stats(first_token_weight=)``; the candidate scales'
    ``mean|X|`` counts it once).
    """
    mods = dict(block.named_modules())
    stats = collect_stats(block, groups, chunks, with_cov=True, first_token_weight=sink_weight)
    plans = []
    # Scales first for every group (folds edit producers, which may be other groups'
    # linears; a per-row rescale commutes with per-row quantization), quantize afterwards.
    for group, st in zip(groups, stats):
        st.cov = damp_cov(st.cov, damp)  # once, for both searches
        s, _ = awq_search_scale([mods[n].weight for n in group], st, group_size, grid, clip=clip)
        identity = bool((s == 1).all())  # x^0: no rescaling helped
        in_scale = None if identity else _apply_scale(block, group, s, chunks)
        # The group now sees x / s: its covariance is C / (s s^T).
        cov = st.cov if identity else st.cov / (s[:, None] * s[None, :])
        plans.append((group, cov, in_scale))
    new: dict[str, nn.Module] = {}
    for group, cov, in_scale in plans:
        for name in group:
            lin = mods[name]
            ratio = awq_clip_ratios(lin.weight, cov, group_size) if clip else None
            new[name] = Int4Linear.from_linear(lin, group_size, in_scale=in_scale, clip_ratio=ratio)
    return new


# ------------------------------------------------------------------------------ SmoothQuant


@torch.no_grad()
def smoothquant_scale(
    weights: list[torch.Tensor], act_abs_max: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` over all weights ``[N_i, K]``; ``[K]``."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = act_abs_max.float().clamp_min(1e-5).pow(alpha) / w_max.clamp_min(1e-5).pow(1 - alpha)
    return s.clamp_min(1e-5)


@torch.no_grad()
def smooth_block(
    block: nn.Module, groups: list[list[str]], chunks: BlockInputs, *, alpha: float = 0.5
) -> dict[str, nn.Module]:
    """SmoothQuant W8A8 for one block: smooth every group, then int8-quantize its weights."""
    mods = dict(block.named_modules())
    stats = collect_stats(block, groups, chunks, with_cov=False)
    plans = []
    for group, st in zip(groups, stats):
        s = smoothquant_scale([mods[n].weight for n in group], st.abs_max, alpha)
        plans.append((group, _apply_scale(block, group, s, chunks)))
    return {
        name: W8A8Linear.from_linear(mods[name], in_scale=in_scale)
        for group, in_scale in plans
        for name in group
    }

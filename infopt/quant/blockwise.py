"""Sequential, block-by-block driver shared by GPTQ, AWQ and SmoothQuant.

For each repeated block ``i`` (see :mod:`.structure`): run it on the calibration hidden
states while hooks gather per-input statistics of its target linears, let the method turn
the statistics into quantized modules, swap them in, then run the *quantized* block to
produce block ``i + 1``'s inputs (standard GPTQ practice: later blocks see, and compensate
for, the error of earlier ones). Memory: the hidden states of all calibration samples
(``n x L x D`` floats) plus one ``K x K`` covariance per input group of one block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ..logs import progress_bar
from .structure import BlockInputs, capture_block_inputs, find_blocks, input_groups, run_block

__all__ = ["InputStats", "collect_stats", "run_sequential"]

# Gram matrices wider than this are accumulated one upper-triangle tile at a time.
_GRAM_TILE = 1024


def _gram_tiles(k: int) -> list[tuple[slice, slice]]:
    """Upper-triangle tiles ``(rows, cols)`` of a ``[k, k]`` Gram matrix (one tile if small)."""
    if k <= 2 * _GRAM_TILE:
        return [(slice(0, k), slice(0, k))]
    edges = list(range(0, k, _GRAM_TILE)) + [k]
    cuts = [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]
    return [(r, c) for i, r in enumerate(cuts) for c in cuts[i:]]


def _accumulate_gram(cov: torch.Tensor, x: torch.Tensor) -> None:
    """``cov += x^T x`` for ``x [T, K]``, upper-triangle tiles only (see :func:`_mirror_gram`).

    Why: ``X^T X`` is symmetric, and a plain ``addmm`` computes both halves. For
    Qwen2.5-1.5B's down_proj (K = 8960) the tiles do ~55 % of its FLOPs (2048 tokens on the
    2-core CPU: 0.66 s instead of 1.04 s per chunk, a few seconds per block).
    """
    for r, c in _gram_tiles(x.shape[1]):
        cov[r, c].addmm_(x[:, r].t(), x[:, c])


def _mirror_gram(cov: torch.Tensor) -> None:
    """Make a Gram matrix accumulated by :func:`_accumulate_gram` exactly symmetric.

    Off-diagonal tiles are copied to the lower triangle. A diagonal tile was computed in full
    by ``addmm``, whose blocked BLAS kernels may sum ``(i, j)`` and ``(j, i)`` in different
    orders on some CPUs (last-bit differences): its strict lower triangle is overwritten by
    the transpose of its upper one, so the whole matrix follows one triangle.
    """
    for r, c in _gram_tiles(cov.shape[0]):
        if r != c:
            cov[c, r] = cov[r, c].t()
        else:
            blk = cov[r, c]
            blk.copy_(blk.triu() + blk.triu(1).t())  # adding exact zeros: bits unchanged


@dataclass
class InputStats:
    """Statistics of one input group's activations ``X [T, K]`` (fp32).

    Attributes:
        cov: ``X^T X / T`` ``[K, K]`` (GPTQ's Hessian is ``2 * cov``); None if not requested.
        mean_abs: ``mean_t |X_tk|`` ``[K]`` (AWQ's activation salience).
        abs_max: ``max_t |X_tk|`` ``[K]`` (SmoothQuant's activation range).
        tokens: T.
    """

    cov: torch.Tensor | None
    mean_abs: torch.Tensor
    abs_max: torch.Tensor
    tokens: int = 0
    names: list[str] = field(default_factory=list)


@torch.no_grad()
def collect_stats(
    block: nn.Module, groups: list[list[str]], chunks: BlockInputs, with_cov: bool = True,
    first_token_weight: float = 1.0,
) -> list[InputStats]:
    """Run ``block`` on every chunk, accumulating :class:`InputStats` per input group.

    ``first_token_weight``: the covariance counts position 0 of every calibration sequence
    (inputs ``[B, T, K]``) this many times instead of once (the attention-sink weighting of
    ``gptq_sink_weight`` and ``awq_sink_weight``: see
    :class:`~infopt.quant.config.Int4WeightOnlyConfig`). ``mean_abs``, ``abs_max`` and
    ``tokens`` count every token once.
    """
    mods = dict(block.named_modules())
    stats: list[InputStats] = []
    handles = []
    for group in groups:
        k = mods[group[0]].in_features
        dev = mods[group[0]].weight.device
        st = InputStats(
            cov=torch.zeros(k, k, device=dev) if with_cov else None,
            mean_abs=torch.zeros(k, device=dev),
            abs_max=torch.zeros(k, device=dev),
            names=list(group),
        )
        stats.append(st)

        def hook(_m: nn.Module, args: tuple, st: InputStats = st) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if st.cov is not None:
                _accumulate_gram(st.cov, x)
                if first_token_weight != 1.0 and args[0].dim() == 3:
                    x0 = args[0].detach()[:, 0].float()  # [B, K]: each sequence's first token
                    _accumulate_gram(st.cov, x0 * (first_token_weight - 1.0) ** 0.5)
            st.mean_abs.add_(x.abs().sum(0))
            torch.maximum(st.abs_max, x.abs().amax(0), out=st.abs_max)
            st.tokens += x.shape[0]

        # One hook per group: every member reads the same tensor.
        handles.append(mods[group[0]].register_forward_pre_hook(hook))
    try:
        for hidden, kwargs in chunks:
            run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    for st in stats:
        if st.cov is not None:
            _mirror_gram(st.cov)
            st.cov.div_(st.tokens)
        st.mean_abs.div_(st.tokens)
    return stats


# (block, target names relative to the block, groups, calibration chunks) -> {name: module}
BlockFn = Callable[[nn.Module, list[list[str]], BlockInputs], dict[str, nn.Module]]


@torch.no_grad()
def run_sequential(
    model: nn.Module,
    targets: list[str],
    input_ids: torch.Tensor,
    block_fn: BlockFn,
    *,
    desc: str,
    progress: bool | None = True,
    batch_size: int = 8,
) -> list[str]:
    """Quantize the ``targets`` (dotted names) that live inside the model's blocks.

    Returns the targets that are *not* inside a block (e.g. an included ``lm_head``); the
    caller quantizes those without calibration.
    """
    prefix, blocks = find_blocks(model)
    chunks = capture_block_inputs(model, blocks, input_ids, batch_size)
    remaining = set(targets)
    for i, block in enumerate(progress_bar(progress, iterable=blocks, desc=desc)):
        bprefix = f"{prefix}.{i}." if prefix else f"{i}."
        names = [t[len(bprefix):] for t in targets if t.startswith(bprefix)]
        if names:
            groups = input_groups(block, names, *chunks[0])
            missed = set(names) - {n for g in groups for n in g}
            if missed:
                raise RuntimeError(
                    f"linears {sorted(missed)} of block {i} never ran on calibration data"
                )
            for name, mod in block_fn(block, groups, chunks).items():
                block.set_submodule(name, mod)
                remaining.discard(bprefix + name)
        if i + 1 < len(blocks):
            chunks = [(run_block(block, h, kw), kw) for h, kw in chunks]
    return [t for t in targets if t in remaining]

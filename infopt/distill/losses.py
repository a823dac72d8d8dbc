"""Soft-target distillation losses over logits ``[..., V]`` (functional, fp32 math).

Conventions (TRL's GKD uses the same ones, so numbers are comparable):

* ``P_t`` = softmax(teacher_logits / T), ``P_s`` = softmax(student_logits / T): ``temperature``
  divides *both* logits before any softmax.
* :func:`forward_kl` = KL(P_t || P_s) (mean-seeking; the classic Hinton loss),
  :func:`reverse_kl` = KL(P_s || P_t) (mode-seeking), :func:`tvd` = 0.5 * sum |P_t - P_s|,
  :func:`jsd` = generalized Jensen-Shannon with mixture ``M = beta * P_t + (1 - beta) * P_s``
  and loss ``beta * KL(P_t || M) + (1 - beta) * KL(P_s || M)``. ``beta = 0`` is *defined* as
  forward KL and ``beta = 1`` as reverse KL (the mixture formula tends to 0 at both ends).
* Each loss sums over the vocabulary and averages over the unmasked positions
  (``reduction="mean"``); ``"sum"`` and ``"none"`` (per position ``[...]``) exist for callers
  that accumulate over chunks.
* **No T^2 factor here**: these functions return the divergence of the tempered
  distributions. :func:`combined_loss` (and so the trainer) multiplies the divergence by
  ``T^2`` so its gradient scale does not shrink as T grows (Hinton et al. 2015).

Sparse teacher targets (:func:`topk_targets`, :func:`sparse_divergence`): the teacher's top-k
log-probs plus one explicit *tail* entry, the log of the mass outside the top k. The student
is coarsened the same way (its log-probs at the k indices, plus the log of its mass elsewhere),
and the divergence is taken between the two (k + 1)-category distributions. This never
invents teacher probabilities for tokens it did not store, and it is a lower bound on the full
divergence (data processing inequality) that equals it when k = V.

:func:`chunked_distill_loss` computes the combined loss from hidden states chunk by chunk over
the sequence, recomputing each chunk's logits in the backward pass, so the ``[B, L, V]``
logits of a long batch never sit in memory at once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIVERGENCES",
    "LossParts",
    "TopKTargets",
    "chunked_distill_loss",
    "combined_loss",
    "divergence",
    "divergence_from_logprobs",
    "forward_kl",
    "jsd",
    "reverse_kl",
    "sparse_divergence",
    "topk_targets",
    "tvd",
]

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")
REDUCTIONS = ("mean", "sum", "none")


# ------------------------------------------------------------------------------ validation


def check_kind(kind: object) -> str:
    if kind not in DIVERGENCES:
        raise ValueError(f"loss must be one of {DIVERGENCES}, got {kind!r}")
    return kind  # type: ignore[return-value]


def check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def check_beta(beta: object) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    return float(beta)


def _check_logits(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor [..., V], got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got {tuple(x.shape)}")
    return x


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    _check_logits("student_logits", student)
    _check_logits("teacher_logits", teacher)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"student vocabulary size {student.shape[-1]} != teacher vocabulary size "
            f"{teacher.shape[-1]}: distillation needs a shared vocabulary; map the teacher's "
            "logits onto the student's vocabulary first (infopt.distill.map_teacher_logits "
            "with a token_map)"
        )
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape")


def _reduce(per_pos: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Per-position values ``[...]`` -> mean over unmasked positions / sum / as is."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != per_pos.shape:
            raise ValueError(f"mask must be a tensor of shape {tuple(per_pos.shape)} (the "
                             f"logits without the vocabulary dim), got "
                             f"{tuple(getattr(mask, 'shape', ())) or type(mask).__name__}")
        mask = mask.to(device=per_pos.device, dtype=torch.bool)
        # where, not multiply: a masked position may hold inf/nan (padding logits).
        per_pos = torch.where(mask, per_pos, per_pos.new_zeros(()))
    if reduction == "none":
        return per_pos
    total = per_pos.sum()
    if reduction == "sum":
        return total
    count = per_pos.numel() if mask is None else int(mask.sum())
    return total / max(count, 1)


# ------------------------------------------------------------------------------ core math


def _blank(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero the masked positions of ``x [..., C]`` before any math: they may hold inf / nan
    (padding), which would otherwise reach the gradient as ``0 * nan``."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.shape != x.shape[:-1]:
        return x  # _reduce reports a bad mask
    return torch.where(mask.to(x.device, torch.bool).unsqueeze(-1), x, x.new_zeros(()))


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim from log-probs; ``0 * log 0`` = 0, also in the gradient
    (the -inf entries are replaced before they meet a multiply)."""
    p = logp.exp()
    live = p > 0
    zero = logp.new_zeros(())
    return (p * (torch.where(live, logp, zero) - torch.where(live, logq, zero))).sum(-1)


def divergence_from_logprobs(
    kind: str, teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float = 0.5
) -> torch.Tensor:
    """Per-position divergence ``[...]`` between two log-prob tensors ``[..., C]`` (any C:
    the full vocabulary or a coarsened top-k + tail). See the module docstring."""
    kind = check_kind(kind)
    if kind == "forward_kl":
        return _kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return _kl(student_logp, teacher_logp)
    if kind == "tvd":
        return 0.5 * (teacher_logp.exp() - student_logp.exp()).abs().sum(-1)
    beta = check_beta(beta)
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    log_m = torch.logsumexp(
        torch.stack([teacher_logp + math.log(beta), student_logp + math.log1p(-beta)]), dim=0
    )
    return beta * _kl(teacher_logp, log_m) + (1 - beta) * _kl(student_logp, log_m)


def divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``kind`` (one of :data:`DIVERGENCES`) between logits ``[..., V]`` of equal shape.

    Args:
        mask: bool ``[...]`` (the logits' shape without V); False positions are ignored.
        reduction: ``"mean"`` over unmasked positions (0 when none), ``"sum"``, ``"none"``.
    """
    _check_pair(student_logits, teacher_logits)
    t = check_temperature(temperature)
    s_logp = F.log_softmax(_blank(student_logits.float(), mask) / t, dim=-1)
    t_logp = F.log_softmax(_blank(teacher_logits.float(), mask) / t, dim=-1)
    return _reduce(divergence_from_logprobs(kind, t_logp, s_logp, beta), mask, reduction)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """KL(P_teacher || P_student), logits ``[..., V]``; see :func:`divergence`."""
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature,
                      mask=mask, reduction=reduction)


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
               temperature: float = 1.0, mask: torch.Tensor | None = None,
               reduction: str = "mean") -> torch.Tensor:
    """KL(P_student || P_teacher), logits ``[..., V]``; see :func:`divergence`."""
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature,
                      mask=mask, reduction=reduction)


def jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float = 0.5,
        temperature: float = 1.0, mask: torch.Tensor | None = None,
        reduction: str = "mean") -> torch.Tensor:
    """Generalized JSD (TRL convention, see the module docstring), logits ``[..., V]``."""
    return divergence("jsd", student_logits, teacher_logits, beta=beta,
                      temperature=temperature, mask=mask, reduction=reduction)


def tvd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *,
        temperature: float = 1.0, mask: torch.Tensor | None = None,
        reduction: str = "mean") -> torch.Tensor:
    """Total variation distance 0.5 * sum |P_t - P_s|, logits ``[..., V]``."""
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature,
                      mask=mask, reduction=reduction)


# -------------------------------------------------------------------------- sparse targets


class TopKTargets(NamedTuple):
    """A teacher's sparse targets.

    Attributes:
        logprobs: fp32 ``[..., k]`` teacher log-probs (at the temperature they were made
            with) of its k most likely tokens, descending.
        indices: int64 ``[..., k]`` their token ids.
        tail: fp32 ``[...]`` log of the teacher's probability mass outside those k tokens
            (``-inf`` when k = V).
    """

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor

    def slice(self, sl: slice) -> TopKTargets:
        """Positions ``sl`` along dim 1 (the sequence of ``[B, L, ...]`` targets)."""
        return TopKTargets(self.logprobs[:, sl], self.indices[:, sl], self.tail[:, sl])


@torch.no_grad()
def topk_targets(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> TopKTargets:
    """The teacher's top-``k`` log-probs of ``softmax(teacher_logits / temperature)`` with the
    exact log-mass of the rest. ``teacher_logits`` ``[..., V]``; ``1 <= k <= V``."""
    _check_logits("teacher_logits", teacher_logits)
    v = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= v:
        raise ValueError(f"k must be an int in [1, V={v}], got {k!r}")
    logp = F.log_softmax(teacher_logits.float() / check_temperature(temperature), dim=-1)
    vals, idx = logp.topk(k, dim=-1)
    # logsumexp of the rest, not log1p(-sum(top)): exact even when the tail is tiny.
    tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
    return TopKTargets(vals, idx, tail)


def sparse_divergence(
    kind: str,
    student_logits: torch.Tensor,
    targets: TopKTargets,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """``kind`` between the teacher's top-k + tail and the student coarsened alike.

    ``student_logits [..., V]``; ``targets`` from :func:`topk_targets` (or a shard) with the
    same leading shape. ``temperature`` tempers the student only: the teacher's temperature
    was fixed when its targets were made. When k = V no tail entry is used, and the result
    equals :func:`divergence` on the full logits.
    """
    _check_logits("student_logits", student_logits)
    if not isinstance(targets, TopKTargets):
        raise TypeError(f"targets must be a TopKTargets, got {type(targets).__name__}")
    lead, v = student_logits.shape[:-1], student_logits.shape[-1]
    k = targets.indices.shape[-1]
    if targets.indices.shape[:-1] != lead or targets.logprobs.shape != targets.indices.shape:
        raise ValueError(f"targets of shape {tuple(targets.indices.shape)} do not match "
                         f"student_logits {tuple(student_logits.shape)} (need [..., k])")
    if k > v or int(targets.indices.max()) >= v:
        raise ValueError(f"targets index tokens beyond the student's vocabulary size {v}: "
                         "the teacher's vocabulary differs; give a token map")
    temp = check_temperature(temperature)
    s_logp = F.log_softmax(_blank(student_logits.float(), mask) / temp, dim=-1)
    idx = targets.indices.to(s_logp.device)
    s_top = s_logp.gather(-1, idx)
    t_top = _blank(targets.logprobs.to(s_logp.device).float(), mask)
    if k < v:
        s_tail = torch.logsumexp(s_logp.scatter(-1, idx, float("-inf")), dim=-1, keepdim=True)
        t_tail = _blank(targets.tail.to(s_logp.device).float().unsqueeze(-1), mask)
        t_top = torch.cat([t_top, t_tail], -1)
        s_top = torch.cat([s_top, s_tail], -1)
    return _reduce(divergence_from_logprobs(kind, t_top, s_top, beta), mask, reduction)


# --------------------------------------------------------------------- combined + chunked


@dataclasses.dataclass
class LossParts:
    """``loss`` (differentiable) = ``alpha * ce + (1 - alpha) * T^2 * div``; ``ce`` / ``div``
    are detached per-token means over ``n_tokens`` unmasked positions."""

    loss: torch.Tensor
    ce: float
    div: float
    n_tokens: int


def combined_loss(ce: torch.Tensor, div: torch.Tensor, *, alpha: float, temperature: float
                  ) -> torch.Tensor:
    """``alpha * ce + (1 - alpha) * temperature**2 * div`` (the one place T^2 is applied)."""
    return alpha * ce + (1.0 - alpha) * temperature**2 * div


Head = Callable[[torch.Tensor], torch.Tensor]
TeacherSpec = torch.Tensor | TopKTargets | tuple[torch.Tensor, Head]


def chunked_distill_loss(
    student_hidden: torch.Tensor,
    student_head: Callable[[torch.Tensor], torch.Tensor],
    teacher: TeacherSpec,
    labels: torch.Tensor,
    *,
    kind: str = "forward_kl",
    alpha: float = 0.0,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = 256,
) -> LossParts:
    """The combined loss from the student's last hidden states, ``chunk_size`` positions at a
    time (None: all at once).

    Args:
        student_hidden: ``[B, L, H]`` (after the final norm; the head maps it to logits).
        student_head: ``[B, c, H] -> [B, c, V]`` (e.g. the model's ``lm_head``).
        teacher: full logits ``[B, L, V]``, :class:`TopKTargets` ``[B, L, k]``, or a
            ``(hidden [B, L, Ht], head)`` pair whose logits are made per chunk.
        labels: int64 ``[B, L]``, the token each position should predict (for the CE term).
        mask: bool ``[B, L]`` positions that count (both terms); default all.
    Each chunk's logits are recomputed in the backward pass (activation checkpointing), so at
    most one chunk's ``[B, c, V]`` logits (student and teacher) exist at a time.
    """
    kind, t = check_kind(kind), check_temperature(temperature)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    b, n = labels.shape
    if student_hidden.shape[:2] != (b, n):
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and labels "
                         f"{tuple(labels.shape)} must share [B, L]")
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=labels.device)
    mask = mask.to(torch.bool)
    step = n if chunk_size is None else int(chunk_size)
    if step < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")

    def part(h: torch.Tensor, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        # A position slice of [B, L, H] is not contiguous: a linear head over it cannot fold
        # [B, c] into one matmul and copies its [V, H] weight per batch row instead (a 152k
        # vocabulary made that copy most of a training step).
        logits = student_head(h.contiguous())
        m, y = mask[:, sl], labels[:, sl]
        if isinstance(teacher, TopKTargets):
            div = sparse_divergence(kind, logits, teacher.slice(sl), beta=beta,
                                    temperature=t, mask=m, reduction="sum")
        else:
            if isinstance(teacher, tuple):
                with torch.no_grad():
                    tl = teacher[1](teacher[0][:, sl].contiguous())
            else:
                tl = teacher[:, sl]
            div = divergence(kind, logits, tl, beta=beta, temperature=t, mask=m,
                             reduction="sum")
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        ce = torch.where(m.flatten(), ce, ce.new_zeros(())).sum()
        return ce, div

    ce_sum = div_sum = student_hidden.new_zeros((), dtype=torch.float32)
    for s0 in range(0, n, step):
        sl = slice(s0, min(s0 + step, n))
        h = student_hidden[:, sl]
        if chunk_size is not None and torch.is_grad_enabled() and h.requires_grad:
            ce, div = checkpoint(part, h, sl, use_reentrant=False)
        else:
            ce, div = part(h, sl)
        ce_sum, div_sum = ce_sum + ce, div_sum + div
    count = max(int(mask.sum()), 1)
    ce_mean, div_mean = ce_sum / count, div_sum / count
    loss = combined_loss(ce_mean, div_mean, alpha=alpha, temperature=t)
    return LossParts(loss, float(ce_mean.detach()), float(div_mean.detach()), int(mask.sum()))

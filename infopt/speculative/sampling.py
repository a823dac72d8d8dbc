"""Logits processing and the acceptance rules of speculative decoding (pure tensor functions).

Acceptance follows Leviathan et al. 2023 / Chen et al. 2023: a draft token ``x ~ q`` is kept
with probability ``min(1, p(x) / q(x))``; at the first rejection a replacement is drawn from
``norm(max(0, p - q))``; when every draft token is kept a bonus token is drawn from the target's
next distribution. The emitted tokens are then distributed exactly as ``p``. ``p`` and ``q`` are
the *processed* distributions (after EOS suppression, temperature, top-k and top-p), the same
ones each model actually samples from.

Conventions: ``B`` batch, ``k`` draft length, ``V`` vocabulary. A draft token of ``-1`` means
"no proposal at this position" (rows may propose fewer tokens than others); it is never accepted.
"""

from __future__ import annotations

import dataclasses

import torch

NO_TOKEN = -1  # padding in draft proposals: never accepted


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the target (and a sampling draft) choose tokens.

    Attributes:
        do_sample: False = greedy (argmax of the EOS-suppressed logits, warpers unused, like HF).
        temperature / top_k / top_p: HF semantics; ``top_k`` 0 or None and ``top_p`` 1.0 or None
            disable the filter. Applied in HF's order: temperature, top-k, top-p.
        eos_token_ids: ids suppressed (logit -inf) while fewer than ``min_new_tokens`` tokens
            have been generated, mirroring HF's ``MinNewTokensLengthLogitsProcessor``.
        min_new_tokens: see above.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: tuple[int, ...] = ()
    min_new_tokens: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if self.do_sample and not (isinstance(t, int | float) and t > 0):
            raise ValueError(f"temperature must be > 0 when do_sample=True, got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 0):
            raise ValueError(f"top_k must be a non-negative int or None, got {self.top_k!r}")
        if self.top_p is not None and not (
            isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.min_new_tokens, int) or self.min_new_tokens < 0:
            raise ValueError(f"min_new_tokens must be an int >= 0, got {self.min_new_tokens!r}")

    def process(self, logits: torch.Tensor, n_generated: torch.Tensor | None) -> torch.Tensor:
        """Processed float32 logits, same shape as ``logits`` ``[..., V]``; removed tokens = -inf.

        ``n_generated`` (``logits.shape[:-1]``, long) is how many tokens were generated before
        the token these logits choose; it drives EOS suppression (None: no suppression).
        """
        x = logits.float()
        if self.min_new_tokens > 0 and self.eos_token_ids and n_generated is not None:
            early = (n_generated < self.min_new_tokens).unsqueeze(-1)  # [..., 1]
            eos = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
            eos[list(self.eos_token_ids)] = True
            x = x.masked_fill(early & eos, float("-inf"))
        if not self.do_sample:
            return x  # greedy: warpers never change the argmax, HF skips them too
        if self.temperature != 1.0:
            x = x / self.temperature
        if self.top_k and self.top_k < x.shape[-1]:
            kth = torch.topk(x, self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1.0:
            x = _top_p_filter(x, self.top_p)
        return x

    def probs(self, logits: torch.Tensor, n_generated: torch.Tensor | None) -> torch.Tensor:
        """Processed distribution ``softmax(process(logits))``, float32 ``[..., V]``."""
        return torch.softmax(self.process(logits, n_generated), dim=-1)


def _top_p_filter(x: torch.Tensor, top_p: float) -> torch.Tensor:
    # HF's TopPLogitsWarper: drop the low tail whose cumulative mass is <= 1 - top_p, always
    # keeping the most likely token.
    sorted_x, idx = torch.sort(x, dim=-1, descending=False)
    cum = sorted_x.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= (1.0 - top_p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, idx, remove_sorted)
    return x.masked_fill(remove, float("-inf"))


def greedy_accept(draft: torch.Tensor, target_choice: torch.Tensor) -> torch.Tensor:
    """Number of leading draft tokens equal to the target's greedy choice.

    Args:
        draft: ``[B, k]`` long, ``-1`` where a row proposed nothing.
        target_choice: ``[B, k + 1]`` long, the target's argmax after each prefix.

    Returns ``n [B]`` long in ``[0, k]``. The emitted tokens are ``target_choice[b, : n[b] + 1]``
    (the first ``n`` equal the draft; the last is the correction or the bonus token).
    """
    k = draft.shape[1]
    match = draft == target_choice[:, :k]
    return match.long().cumprod(dim=1).sum(dim=1)


def rejection_accept(
    draft: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact speculative sampling for a batch of drafts.

    Args:
        draft: ``[B, k]`` long draft tokens (``-1`` = no proposal, always rejected).
        q: ``[B, k, V]`` processed draft distributions the tokens were sampled from, or None for
            a deterministic draft (q = one-hot: accept with probability ``p(x)``).
        p: ``[B, k + 1, V]`` processed target distributions after each prefix.
        generator: RNG for the uniforms and the replacement / bonus sample.

    Returns ``(n [B], token [B])``: ``n`` accepted draft tokens and the token emitted after them
    (the residual sample at the first rejection, or the bonus token from ``p[:, k]``).
    """
    bsz, k = draft.shape
    valid = draft >= 0
    safe = draft.clamp(min=0).unsqueeze(-1)  # [B, k, 1]
    p_x = p[:, :k].gather(-1, safe).squeeze(-1)  # [B, k]
    if q is None:
        q_x = valid.to(p.dtype)
    else:
        q_x = q.gather(-1, safe).squeeze(-1).to(p.dtype)
    u = torch.rand(bsz, k, generator=generator, device=p.device, dtype=p.dtype)
    # u < p/q  <=>  u * q < p  (q(x) > 0 for a sampled x); invalid positions always reject.
    ok = (u * q_x < p_x) & valid
    n = ok.long().cumprod(dim=1).sum(dim=1)  # [B]

    # Distribution for the emitted token: residual at the rejection point, p[:, k] if none.
    p_n = p.gather(1, n.view(bsz, 1, 1).expand(bsz, 1, p.shape[-1])).squeeze(1)  # [B, V]
    if k > 0:
        at = n.clamp(max=k - 1)
        if q is None:
            q_n = torch.zeros_like(p_n)
            tok = draft.gather(1, at.unsqueeze(1))  # [B, 1]
            q_n.scatter_(1, tok.clamp(min=0), (tok >= 0).to(p.dtype))
        else:
            q_n = q.gather(1, at.view(bsz, 1, 1).expand(bsz, 1, q.shape[-1])).squeeze(1)
            q_n = q_n.to(p.dtype)
        resid = (p_n - q_n).clamp(min=0)
        mass = resid.sum(dim=-1, keepdim=True)
        rejected = (n < k).unsqueeze(-1)
        # mass == 0 only when p == q at the rejection point, which has probability 0; fall back
        # to p so the sample stays well-defined under rounding.
        dist = torch.where(rejected & (mass > 0), resid / mass.clamp(min=1e-30), p_n)
    else:
        dist = p_n
    token = torch.multinomial(dist, 1, generator=generator).squeeze(1)
    return n, token


def emitted_tokens(draft: torch.Tensor, n: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """``[B, k + 1]`` with ``draft[b, :n]`` then ``token[b]`` at index ``n[b]`` (rest: junk)."""
    out = torch.cat([draft, draft.new_zeros(draft.shape[0], 1)], dim=1)
    out.scatter_(1, n.unsqueeze(1), token.unsqueeze(1))
    return out


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from ``probs [B, V]`` -> ``[B]`` long."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def next_draft_length(k: int, proposed: int, all_kept: bool, mean_kept: float, k_max: int) -> int:
    """Adaptive draft length for the next step, clamped to ``[1, k_max]``.

    +2 when every row kept everything it proposed (drafting is cheap relative to how much it
    wins), -1 when rows kept less than half of the ``proposed`` tokens on average (early
    rejections waste draft and verification work), else unchanged. ``proposed == 0`` (nothing
    was proposed, e.g. no lookup match) leaves ``k`` as is.
    """
    if proposed == 0:
        return k
    if all_kept:
        k = k + 2
    elif mean_kept < proposed / 2:
        k = k - 1
    return max(1, min(k, k_max))

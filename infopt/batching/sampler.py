"""``Sampler``: next tokens from the sampled rows' logits, per request.

Greedy rows take the argmax (all at once). Sampled rows apply temperature, top-k and top-p to
their own row and draw with their request's ``torch.Generator``, so a seeded request gets the
same tokens whatever else is in the batch. ``min_tokens`` masks the stop tokens first.
Log-probabilities come from the model's raw distribution (before temperature / top-k / top-p),
as vLLM reports them.
"""

from __future__ import annotations

import torch

from .request import Request, TokenLogprobs

__all__ = ["Sampler", "apply_top_k_top_p"]


def apply_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to ``-inf``) what top-k / top-p exclude. ``logits`` ``[V]`` fp32 -> ``[V]``."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass
        # *before* it already does (the most likely token is always kept).
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[0] = False
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


class Sampler:
    """Args: eos_token_ids: the model's end-of-sequence ids (masked by ``min_tokens``)."""

    def __init__(self, eos_token_ids: tuple[int, ...] = ()):
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[int]:
        """logits ``[S, V]`` fp32 (row ``i`` belongs to ``requests[i]``) -> ``S`` token ids.
        Appends a :class:`TokenLogprobs` to each request that asked for them."""
        if logits.shape[0] != len(requests):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(requests)} requests")
        if not requests:
            return []
        raw = logits
        logits = self._mask_min_tokens(logits, requests)
        out = logits.argmax(-1).tolist()
        for i, req in enumerate(requests):
            sp = req.sampling
            if sp.temperature == 0:
                continue
            row = logits[i] / sp.temperature
            row = apply_top_k_top_p(row, sp.top_k, sp.top_p)
            probs = row.softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=req.generator).item())
        want = [i for i, r in enumerate(requests) if r.logprobs is not None]
        if want:
            logp = raw[want].log_softmax(-1)
            for j, i in enumerate(want):
                req = requests[i]
                k = req.sampling.logprobs
                top = ()
                if k:
                    vals, idx = torch.topk(logp[j], k)
                    top = tuple(zip(idx.tolist(), vals.tolist()))
                req.logprobs.append(TokenLogprobs(out[i], float(logp[j, out[i]]), top))
        return out

    def _mask_min_tokens(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [
            i for i, r in enumerate(requests) if len(r.output_token_ids) < r.sampling.min_tokens
        ]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            sp = requests[i].sampling
            stop = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids))
            stop = [t for t in stop if t < logits.shape[-1]]
            if stop:
                logits[i, stop] = float("-inf")
        return logits

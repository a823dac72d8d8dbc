"""A causal LM with its own KV cache, fed in chunks, rolled back exactly.

Batching scheme (the choice the rest of the package relies on): every row of a batch shares one
cache *length*. The cache always holds a dense prefix that is valid for every row (the left
padding of the prompt is the only masked part). Rows that got further ahead than the slowest
row re-feed their extra committed tokens in the next chunk, right-padded to a common width;
right padding sits after a row's real tokens, so causality already hides it, and it is cropped
away before it could ever be attended to. Within one forward, positions that must be hidden
from *later* queries of the same cache (a draft model's autoregressive steps after a padded
chunk) are marked invalid in a 2-D attention mask, and ``position_ids`` come from the mask's
cumulative sum, the way HF ``generate`` handles left padding. Nothing here is per-architecture:
it only uses ``model(input_ids, attention_mask, position_ids, past_key_values, use_cache)``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache


def cache_length(cache: Any) -> int:
    """Tokens held by an HF cache (0 for None)."""
    return 0 if cache is None else int(cache.get_seq_length())


def crop_cache(cache: Any, new_length: int) -> None:
    """Drop every cached position ``>= new_length`` in place, on transformers 5.17 .. 5.23.

    ``Cache.crop`` changed meaning across versions: on 5.17 a positive argument is the absolute
    length to keep (deprecated), on 5.23 a positive argument raises and only "remove ``n``" as
    ``crop(-n)`` works; ``crop(0)`` is a no-op on both. So we always pass ``-n`` with ``n > 0``,
    and per layer: a cache whose model skipped some layers (self-speculative drafting) has
    uninitialised layers, which 5.17's ``DynamicLayer.crop`` cannot slice.
    """
    layers = getattr(cache, "layers", None)
    if layers is None:  # not a layered Cache: trust its own crop
        n = cache_length(cache) - new_length
        if n > 0:
            cache.crop(-n)
        return
    for layer in layers:
        n = int(layer.get_seq_length()) - new_length
        if n > 0:
            layer.crop(-n)


class CachedLM:
    """``model`` plus its KV cache and the 2-D validity mask of the cached positions.

    Args:
        model: an HF causal LM (anything returning ``.logits`` and ``.past_key_values``).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.cache: Any = None
        #: builds the cache on the first forward. Not the model's own choice: for a config with
        #: sliding layers HF builds sliding cache layers, which cannot be cropped back after a
        #: rejected draft once the window is full, and a layer-skip draft's config lists only
        #: its kept layers while each writes at its own index. A config-free DynamicCache grows
        #: a full-history layer for any index; the attention masks still apply each window.
        self.new_cache: Any = DynamicCache
        self.mask: torch.Tensor | None = None  # [B, length] bool: which cached positions are real
        self.all_valid = True  # fast path: no mask at all (batch 1 / unpadded batches)
        self.forwards = 0
        try:
            params = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            params = {}
        self._logits_to_keep = "logits_to_keep" in params

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def forward(
        self, ids: torch.Tensor, valid: torch.Tensor | None = None, keep: int | None = None
    ) -> torch.Tensor:
        """Append ``ids [B, W]`` to the cache and return logits ``[B, keep or W, V]``.

        ``valid [B, W]`` bool marks real positions (None: all real); invalid ones are masked
        from every later query and do not advance the row's position ids. ``keep`` asks for the
        logits of the last ``keep`` positions only.
        """
        bsz, width = ids.shape
        if valid is None:
            valid = torch.ones(bsz, width, dtype=torch.bool, device=ids.device)
            chunk_all_valid = True
        else:
            chunk_all_valid = bool(valid.all())
        full = valid if self.mask is None else torch.cat([self.mask, valid], dim=1)
        all_valid = self.all_valid and chunk_all_valid
        if all_valid:
            start = self.length
            pos = torch.arange(start, start + width, device=ids.device).expand(bsz, width)
            attn = None  # lets SDPA take its is_causal fast path
        else:
            pos = (full.long().cumsum(dim=1) - 1).clamp(min=0)[:, -width:]
            attn = full.long()
        kwargs: dict[str, Any] = {}
        if self._logits_to_keep and keep is not None:
            kwargs["logits_to_keep"] = keep
        if self.cache is None and self.new_cache is not None:
            self.cache = self.new_cache()
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=pos,
            past_key_values=self.cache,
            use_cache=True,
            **kwargs,
        )
        self.cache = out.past_key_values
        self.mask = full
        self.all_valid = all_valid
        self.forwards += 1
        logits = out.logits
        if keep is not None and logits.shape[1] != keep:
            logits = logits[:, -keep:]
        return logits

    def crop(self, length: int) -> None:
        """Roll back to the first ``length`` positions (no-op if already that short)."""
        if self.mask is None or length >= self.length:
            return
        crop_cache(self.cache, length)
        self.mask = self.mask[:, :length]
        if not self.all_valid:
            self.all_valid = bool(self.mask.all())

    def reset(self) -> None:
        self.cache = None
        self.mask = None
        self.all_valid = True
        self.forwards = 0


def build_chunk(
    tokens: torch.Tensor,
    start: int,
    lens: list[int],
    active: list[bool],
    extra: torch.Tensor | None,
    prompt_valid: torch.Tensor | None,
    pad_id: int,
) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """The next chunk to feed a :class:`CachedLM` whose cache holds ``start`` positions.

    Row ``b`` gets its committed tokens ``tokens[b, start:lens[b]]`` (``m_b`` of them), then
    ``extra[b]`` (draft tokens, ``-1`` -> ``pad_id``), right-padded to a common width ``W``.
    Finished rows (``active[b]`` False) get padding marked valid: their outputs are ignored and
    keeping them "valid" lets unpadded batches stay on the mask-free fast path.

    Args:
        tokens: ``[B, T]`` committed-token buffer (left-padded prompt first).
        prompt_valid: ``[B, P]`` bool prompt mask or None (no left padding).

    Returns ``(chunk [B, W], valid [B, W] bool or None if all valid, m)`` with ``m[b] = m_b``
    (1 for finished rows).
    """
    bsz = tokens.shape[0]
    dev = tokens.device
    m = [lens[b] - start if active[b] else 1 for b in range(bsz)]
    n_extra = 0 if extra is None else extra.shape[1]
    width = max(m) + n_extra
    if bsz == 1 or (len(set(m)) == 1 and all(active)):
        # Common case (batch 1, or rows in lockstep): a plain slice + concat, no padding.
        chunk = tokens[:, start : start + m[0]] if all(active) else None
        if chunk is not None:
            if extra is not None:
                chunk = torch.cat([chunk, extra.clamp(min=0)], dim=1)
            return chunk, _prompt_part(prompt_valid, start, width, None), m
    cols = torch.arange(width, device=dev)
    m_t = torch.tensor(m, device=dev).unsqueeze(1)  # [B, 1]
    src = (start + cols).clamp(max=tokens.shape[1] - 1).expand(bsz, width)
    chunk = torch.where(cols < m_t, tokens.gather(1, src), torch.full_like(src, pad_id))
    if extra is not None and n_extra:
        e_idx = (cols - m_t).clamp(0, n_extra - 1)
        from_extra = (cols >= m_t) & (cols < m_t + n_extra)
        chunk = torch.where(from_extra, extra.clamp(min=0).gather(1, e_idx), chunk)
    act = torch.tensor(active, device=dev).unsqueeze(1)
    valid = (cols < m_t + n_extra) | ~act
    if bool(valid.all()):
        valid = None
    return chunk, _prompt_part(prompt_valid, start, width, valid), m


def _prompt_part(
    prompt_valid: torch.Tensor | None, start: int, width: int, valid: torch.Tensor | None
) -> torch.Tensor | None:
    # Chunk columns that still fall inside the (left-padded) prompt take the prompt's mask.
    if prompt_valid is None or start >= prompt_valid.shape[1]:
        return valid
    bsz = prompt_valid.shape[0]
    if valid is None:
        valid = torch.ones(bsz, width, dtype=torch.bool, device=prompt_valid.device)
    n = min(width, prompt_valid.shape[1] - start)
    valid = valid.clone()
    valid[:, :n] &= prompt_valid[:, start : start + n]
    return valid

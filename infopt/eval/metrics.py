"""Perplexity and reference-vs-candidate agreement metrics.

Every optimization in infopt is judged by these numbers, so they are deterministic (fixed
text, fixed windows, no sampling) and computed in fp32 regardless of the models' dtypes.

Models are anything callable as ``model(input_ids=[B, L], use_cache=False)`` returning
logits ``[B, L, V]`` (a tensor or an object with ``.logits``) -- HF causal LMs qualify.
``generate_greedy`` additionally needs HF's ``model.generate``.

Windowing (HF perplexity-guide semantics): the token ids are cut into windows of ``window``
tokens whose starts are ``stride`` apart. Each token is scored by the first window that
contains it with at least one token of context, i.e. window ``[begin, end)`` scores targets
``[max(prev_end, begin + 1), end)``. With ``stride < window`` every token but the first is
scored exactly once (``n_tokens = T - 1``); with non-overlapping windows (``stride ==
window``, the default) the first token of each window has no context and is skipped
(``n_tokens = T - ceil(T / window)``; a trailing one-token window, which would score
nothing, is not run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "CompareResult",
    "PerplexityResult",
    "compare",
    "generate_greedy",
    "greedy_agreement",
    "perplexity",
    "tokenize_text",
    "window_spans",
]

# A text is a string (tokenized with the tokenizer) or already-tokenized ids ([T] or [1, T]).
TextLike = str | torch.Tensor | Sequence[int]

# Positions per chunk in compare's fp32 math: bounds the temporaries to a few
# [chunk, V] fp32 tensors (e.g. 128 x 152k x 4 B = 78 MB each) whatever the window size.
_KL_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll)``; ``nll`` is the mean negative log-likelihood (nats) over
    ``n_tokens`` scored tokens from ``n_windows`` forward windows."""

    ppl: float
    nll: float
    n_tokens: int
    n_windows: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class CompareResult:
    """Agreement of a candidate model with a reference over the same windows and prompts.

    Attributes:
        ppl_ref, ppl_cand: perplexity of each model on the scored tokens.
        ppl_rel_increase: ``ppl_cand / ppl_ref - 1`` (0.01 = 1 % worse).
        nll_ref, nll_cand: mean NLL in nats.
        kl_mean: mean over scored positions of ``KL(P_ref || P_cand)`` in nats.
        kl_p99, kl_max: 99th percentile (nearest rank) and maximum of the per-position KL.
        top1_agreement: fraction of scored positions where both argmaxes agree.
        greedy_prefix_match: mean over prompts of (generated tokens matching before the
            first divergence) / (length of the longer of the two generations); ``None``
            when no prompts were given.
        greedy_exact_match: fraction of prompts whose greedy generations are identical.
        n_tokens, n_windows: scored positions / forward windows (per model).
        n_prompts, max_new_tokens: greedy-generation settings.
    """

    ppl_ref: float
    ppl_cand: float
    ppl_rel_increase: float
    nll_ref: float
    nll_cand: float
    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    greedy_prefix_match: float | None
    greedy_exact_match: float | None
    n_tokens: int
    n_windows: int
    n_prompts: int
    max_new_tokens: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of all fields."""
        return dataclasses.asdict(self)


class Divergence:
    """Running reference-vs-candidate statistics over scored positions: NLL of each model,
    ``KL(P_ref || P_cand)`` per position and top-1 agreement, all in fp32. The one
    implementation behind :func:`compare` and :func:`~infopt.eval.compare_through_cache`.

    ``add(ref_logits [n, V], cand_logits [n, V], targets [n])`` on one device (each chunk of
    ``_KL_CHUNK`` rows is upcast and log-softmaxed on its own, so memory stays bounded);
    :meth:`summary` gives the fields :class:`CompareResult` shares with the cache comparison.
    """

    def __init__(self) -> None:
        self.kls: list[torch.Tensor] = []
        self.nll_ref = self.nll_cand = 0.0
        self.agree = self.count = 0

    def add(
        self, ref_logits: torch.Tensor, cand_logits: torch.Tensor, targets: torch.Tensor
    ) -> None:
        n = targets.shape[0]
        for c0 in range(0, n, _KL_CHUNK):
            r = ref_logits[c0 : c0 + _KL_CHUNK].float().log_softmax(-1)
            c = cand_logits[c0 : c0 + _KL_CHUNK].float().log_softmax(-1)
            t = targets[c0 : c0 + _KL_CHUNK, None]
            # KL(P_ref || P_cand) per position; rounding can make it a hair negative.
            self.kls.append((r.exp() * (r - c)).sum(-1).clamp_min(0.0).cpu())
            self.nll_ref -= r.gather(-1, t).sum().item()
            self.nll_cand -= c.gather(-1, t).sum().item()
            self.agree += (r.argmax(-1) == c.argmax(-1)).sum().item()
        self.count += n

    def summary(self) -> dict[str, Any]:
        """``ppl_ref, ppl_cand, ppl_rel_increase, nll_ref, nll_cand, kl_mean, kl_p99, kl_max,
        top1_agreement, n_tokens``."""
        kl = torch.cat(self.kls).double()
        nll_ref, nll_cand = self.nll_ref / self.count, self.nll_cand / self.count
        ppl_ref, ppl_cand = math.exp(nll_ref), math.exp(nll_cand)
        return {
            "ppl_ref": ppl_ref,
            "ppl_cand": ppl_cand,
            "ppl_rel_increase": ppl_cand / ppl_ref - 1.0,
            "nll_ref": nll_ref,
            "nll_cand": nll_cand,
            "kl_mean": kl.mean().item(),
            # Nearest-rank percentile (torch.quantile refuses > 16M elements).
            "kl_p99": kl.kthvalue(max(1, math.ceil(0.99 * kl.numel()))).values.item(),
            "kl_max": kl.max().item(),
            "top1_agreement": self.agree / self.count,
            "n_tokens": self.count,
        }


def tokenize_text(tokenizer: Any, text: TextLike, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids ``[T]`` (int64, CPU) of ``text``, truncated to ``max_tokens``.

    Strings are tokenized once with ``tokenizer(text)`` (its default special tokens, e.g. a
    leading BOS); tensors / int sequences are taken as ids, which lets tests and callers
    with custom tokenization skip the tokenizer (pass ``tokenizer=None``).
    """
    if isinstance(text, str):
        if tokenizer is None:
            raise ValueError("a tokenizer is required to evaluate a string text")
        from transformers import PreTrainedTokenizerBase

        # verbose=False: the whole corpus is longer than model_max_length on purpose (it is
        # cut into windows), so HF's "sequence length is longer than..." warning is noise.
        kw = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
        ids = torch.as_tensor(tokenizer(text, **kw)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(text, dtype=torch.long).cpu()
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token ids must be [T] or [1, T], got shape {tuple(ids.shape)}")
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.numel()}")
    return ids


def window_spans(
    n_tokens: int, window: int, stride: int | None = None
) -> list[tuple[int, int, int]]:
    """Windows over ``n_tokens`` ids as ``(begin, score_start, end)``: the model sees
    ``ids[begin:end]`` and targets ``ids[score_start:end]`` are scored (predicted from the
    logits at positions ``score_start - 1 .. end - 2``). See the module docstring."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in [1, window={window}], got {stride}")
    spans, prev_end, begin = [], 0, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        start = max(prev_end, begin + 1)
        if start < end:
            spans.append((begin, start, end))
        prev_end, begin = end, begin + stride
    return spans


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    """Put modules in eval mode (no dropout) for the measurement, then restore."""
    mods = [m for m in models if isinstance(m, torch.nn.Module)]
    was_training = [m.training for m in mods]
    try:
        for m in mods:
            m.eval()
        yield
    finally:
        for m, t in zip(mods, was_training):
            m.train(t)


def _logits(model: Any, ids: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``[B, L]`` ids -> ``[B, L, V]`` logits, without building a KV cache."""
    out = model(input_ids=ids.to(device), use_cache=False)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if hasattr(out, "logits") else out[0]


def _batches(spans: list[tuple[int, int, int]], batch_size: int) -> Iterator[list]:
    """Consecutive spans grouped up to ``batch_size``, never mixing input lengths."""
    group: list[tuple[int, int, int]] = []
    for span in spans:
        if group and (len(group) == batch_size or span[2] - span[0] != group[0][2] - group[0][0]):
            yield group
            group = []
        group.append(span)
    if group:
        yield group


def perplexity(
    model: Any,
    tokenizer: Any,
    text: TextLike | None = None,
    *,
    max_tokens: int | None = 4096,
    window: int = 512,
    stride: int | None = None,
    batch_size: int = 1,
    device: str | torch.device | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (default: :func:`infopt.eval.default_text`).

    Args:
        text: a string, or token ids ``[T]`` / ``[1, T]`` (then ``tokenizer`` may be None).
        max_tokens: keep only the first ``max_tokens`` tokens (None: all).
        window, stride: see the module docstring; ``stride=None`` = non-overlapping.
        batch_size: windows per forward pass (same-length windows only).
        device: where the ids go; default the model's parameter device.
    """
    if text is None:
        from .texts import default_text

        text = default_text()
    ids = tokenize_text(tokenizer, text, max_tokens)
    spans = window_spans(ids.numel(), window, stride)
    dev = torch.device(device) if device is not None else _model_device(model)
    nll_sum, count = 0.0, 0
    with torch.inference_mode(), _eval_mode(model):
        for group in _batches(spans, batch_size):
            x = torch.stack([ids[b:e] for b, _, e in group])
            logits = _logits(model, x, dev)
            for row, (b, s, e) in enumerate(group):
                # fp32 log-softmax on the model's device; only the scored slice is upcast.
                lg = logits[row, s - b - 1 : e - b - 1].float()
                tgt = ids[s:e].to(lg.device)
                nll_sum += F.cross_entropy(lg, tgt, reduction="sum").item()
                count += e - s
            del logits
    nll = nll_sum / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=count, n_windows=len(spans))


def _encode_prompt(tokenizer: Any, prompt: TextLike) -> torch.Tensor:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a tokenizer is required for string prompts")
        ids = torch.as_tensor(tokenizer(prompt)["input_ids"], dtype=torch.long)
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long).cpu()
    return ids.reshape(1, -1)


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[TextLike],
    max_new_tokens: int = 32,
    *,
    device: str | torch.device | None = None,
) -> list[list[int]]:
    """Greedy continuations via ``model.generate(do_sample=False, num_beams=1)``.

    Prompts run one at a time (no padding, so results are independent of batching) and the
    model's own ``generation_config`` supplies everything else (EOS, processors). Returns
    the generated token ids only (prompt excluded), each of length <= ``max_new_tokens``
    (shorter if EOS was produced).
    """
    dev = torch.device(device) if device is not None else _model_device(model)
    gen_cfg = getattr(model, "generation_config", None)
    pad = getattr(gen_cfg, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None and gen_cfg is not None:
        eos = gen_cfg.eos_token_id
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    extra = {} if pad is None else {"pad_token_id": pad}
    outs = []
    with torch.inference_mode(), _eval_mode(model):
        for prompt in prompts:
            ids = _encode_prompt(tokenizer, prompt).to(dev)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                **extra,
            )
            outs.append(out[0, ids.shape[1] :].tolist())
    return outs


def greedy_agreement(
    ref: Sequence[Sequence[int]], cand: Sequence[Sequence[int]]
) -> tuple[float, float]:
    """``(prefix_match, exact_match)`` of two lists of generations (see CompareResult).

    Per prompt, prefix match = tokens equal before the first divergence divided by the
    longer generation's length (1.0 when both are empty); exact match = sequences equal.
    Both are averaged over prompts.
    """
    if len(ref) != len(cand) or not ref:
        raise ValueError(f"need equally many (>0) generations, got {len(ref)} and {len(cand)}")
    prefix, exact = 0.0, 0
    for r, c in zip(ref, cand):
        r, c = list(r), list(c)
        n = 0
        while n < min(len(r), len(c)) and r[n] == c[n]:
            n += 1
        longest = max(len(r), len(c))
        prefix += n / longest if longest else 1.0
        exact += r == c
    return prefix / len(ref), exact / len(ref)


def compare(
    reference: Any,
    candidate: Any,
    tokenizer: Any,
    texts: TextLike | Sequence[TextLike] | None = None,
    prompts: Sequence[TextLike] | None = None,
    *,
    max_tokens: int | None = 2048,
    window: int = 512,
    stride: int | None = None,
    max_new_tokens: int = 32,
    n_prompts: int = 8,
) -> CompareResult:
    """Compare ``candidate`` against ``reference`` on identical windows and prompts.

    Both models run on each window in turn and only that window's logits are alive, so
    memory stays ~2 x [window, V]. The math (fp32 log-softmax, KL, NLL, argmax) runs on the
    reference's device when both logits share it, else on the CPU; a model compared with
    itself therefore gives exactly ``kl_mean == 0.0`` and ``top1_agreement == 1.0``.

    Args:
        texts: one text or a list (string or ids each); each is truncated to
            ``max_tokens`` tokens. Default: :func:`infopt.eval.default_text`.
        prompts: for greedy agreement (strings or ids). Default:
            ``eval_prompts(n_prompts)``; pass ``[]`` to skip generation (then the greedy
            fields are None).
        window, stride: windowing as in :func:`perplexity`.
        max_new_tokens: greedy tokens generated per prompt per model.
    """
    if texts is None:
        from .texts import default_text

        texts = [default_text()]
    elif isinstance(texts, (str, torch.Tensor)) or (len(texts) > 0 and isinstance(texts[0], int)):
        texts = [texts]
    if prompts is None:
        from .texts import eval_prompts

        prompts = eval_prompts(n_prompts)
    dev_ref, dev_cand = _model_device(reference), _model_device(candidate)

    div = Divergence()
    n_windows = 0
    with torch.inference_mode(), _eval_mode(reference, candidate):
        for text in texts:
            ids = tokenize_text(tokenizer, text, max_tokens)
            spans = window_spans(ids.numel(), window, stride)
            n_windows += len(spans)
            for b, s, e in spans:
                x = ids[b:e].unsqueeze(0)
                lr = _logits(reference, x, dev_ref)[0, s - b - 1 : e - b - 1]
                lc = _logits(candidate, x, dev_cand)[0, s - b - 1 : e - b - 1]
                if lr.device != lc.device:
                    lr, lc = lr.cpu(), lc.cpu()
                div.add(lr, lc, ids[s:e].to(lr.device))
                del lr, lc

    if len(prompts) > 0:
        gen_ref = generate_greedy(reference, tokenizer, prompts, max_new_tokens)
        gen_cand = generate_greedy(candidate, tokenizer, prompts, max_new_tokens)
        prefix, exact = greedy_agreement(gen_ref, gen_cand)
    else:
        prefix = exact = None
    return CompareResult(
        **div.summary(),
        greedy_prefix_match=prefix,
        greedy_exact_match=exact,
        n_windows=n_windows,
        n_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
    )

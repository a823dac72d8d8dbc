"""Calibration token ids for AWQ / GPTQ / SmoothQuant.

Calibration text defaults to the second half of the Lee news corpus (``"lee"``), disjoint
from the start of the corpus that infopt evaluates on, so quality numbers are never measured
on the text the quantizer was fitted to. Windows are sampled with a seeded
``torch.Generator``: the same tokenizer, text, sizes and seed always give the same ids.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch

__all__ = ["calibration_ids", "calibration_text", "resolve_tokenizer"]


def _pydoc_text_fallback() -> str:
    # Used only if infopt.eval is unavailable: same idea (prose paragraphs of pydoc topics).
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for block in re.split(r"\n[ \t]*\n", topics[key]):
            if block.strip() and not block[0].isspace() and len(block.split()) >= 8:
                paras.append(" ".join(block.split()))
    return "\n\n".join(paras)


def calibration_text(name: str = "lee") -> str:
    """The calibration text named ``name``.

    * ``"lee"``: the *second half* of the Lee news corpus (articles 150-299). infopt's
      evaluation uses the first few thousand tokens (articles 0-~15), so calibration and
      evaluation text never overlap while sharing a distribution (English news).
    * ``"pydoc"``: CPython documentation prose (offline, no download). A different domain
      from news: GPTQ fitted to it generalises badly to news text (see docs/results.md).
    """
    if name == "lee":
        from ..eval.texts import lee_articles

        articles = lee_articles()
        return "\n".join(articles[len(articles) // 2 :])
    if name != "pydoc":
        raise ValueError(f"unknown calibration text {name!r}; available: lee, pydoc")
    try:
        from ..eval.texts import pydoc_paragraphs
    except ImportError:
        return _pydoc_text_fallback()
    return "\n\n".join(pydoc_paragraphs())


@functools.lru_cache(maxsize=4)
def _tokenized(tokenizer: Any, name: str) -> torch.Tensor:
    # The whole corpus is one sequence on purpose (windows are cut from it), so transformers'
    # "longer than the model's maximum length" warning would be misleading: verbose=False
    # (only for transformers tokenizers; any callable returning input_ids is accepted).
    from transformers import PreTrainedTokenizerBase

    quiet = {"verbose": False} if isinstance(tokenizer, PreTrainedTokenizerBase) else {}
    ids = tokenizer(calibration_text(name), add_special_tokens=False, **quiet)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long)


def calibration_ids(
    tokenizer: Any, n_samples: int, seq_len: int, seed: int = 0, text: str = "lee"
) -> torch.Tensor:
    """``n_samples`` windows of ``seq_len`` tokens from ``text``: int64 ``[n_samples, seq_len]``.

    Window starts are drawn uniformly (with a generator seeded by ``seed``) from the whole
    tokenized text, as in the GPTQ/AWQ reference implementations.
    """
    ids = _tokenized(tokenizer, text)
    if ids.numel() <= seq_len:
        raise ValueError(
            f"calibration text {text!r} has {ids.numel()} tokens, fewer than "
            f"calib_seq_len={seq_len}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len, (n_samples,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def check_calibration_source(model: Any) -> None:
    """Raise the error :func:`resolve_tokenizer` would, without loading a tokenizer: the model
    must have a local ``config.name_or_path`` directory to find calibration text's tokenizer."""
    import os

    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not (path and os.path.isdir(path)):
        raise ValueError(_NO_TOKENIZER)


_NO_TOKENIZER = (
    "this quantization method needs calibration data: the model has no local "
    "config.name_or_path directory to load a tokenizer from. Call "
    "infopt.quant.quantize_model(model, config, tokenizer=tok) or pass "
    "calib_input_ids=[n, seq_len] token ids"
)


def resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer to calibrate with: ``tokenizer`` if given, else the one saved next to the
    model (``model.config.name_or_path`` when it is a local directory; never the hub)."""
    if tokenizer is not None:
        return tokenizer
    import os

    path = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if path and os.path.isdir(path):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"this quantization method needs calibration text and no tokenizer could be "
                f"loaded from the model's directory {path!r} ({e}); call "
                "infopt.quant.quantize_model(model, config, tokenizer=tok) or pass "
                "calib_input_ids=[n, seq_len] token ids"
            ) from e
    raise ValueError(_NO_TOKENIZER)

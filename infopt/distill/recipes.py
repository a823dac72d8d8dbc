"""End-to-end recipes behind ``infopt distill``: load, build the student, distill, measure,
export. Also :func:`layer_truncated` (a smaller student / draft that keeps a subset of the
teacher's decoder layers and shares its tokenizer).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..logs import get_logger
from .config import DistillConfig
from .data import DistillData, load_texts, token_windows
from .trainer import distill, evaluate, export_student

__all__ = ["DistillRun", "eval_token_ids", "layer_truncated", "run_distill"]

_log = get_logger("infopt.distill")


def layer_truncated(model: nn.Module, keep: int | Sequence[int]) -> nn.Module:
    """A deep copy of ``model`` keeping decoder layers ``keep`` (an int n: the first n),
    with embeddings, final norm and head. Each kept layer is renumbered (``layer_idx``) so KV
    caches index it densely; ``config.num_hidden_layers`` (and ``layer_types``) follow."""
    from ..speculative.drafts import find_decoder_layers

    _, _, layers = find_decoder_layers(model)
    n = len(layers)
    kept = list(range(keep)) if isinstance(keep, int) else sorted(set(int(i) for i in keep))
    if not kept or kept[0] < 0 or kept[-1] >= n:
        raise ValueError(f"keep must name layers in [0, {n}) (an int in [1, {n}] for the "
                         f"first n), got {keep!r}")
    small = copy.deepcopy(model)
    parent, attr, layers = find_decoder_layers(small)
    setattr(parent, attr, nn.ModuleList([layers[i] for i in kept]))
    for new, layer in enumerate(getattr(parent, attr)):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new
    cfg = getattr(small, "config", None)
    if cfg is not None:
        types = getattr(cfg, "layer_types", None)
        if isinstance(types, (list, tuple)) and len(types) == n:
            cfg.layer_types = [types[i] for i in kept]
        cfg.num_hidden_layers = len(kept)
    return small


def eval_token_ids(tokenizer: Any, n_tokens: int = 4096) -> torch.Tensor:
    """The held-out evaluation ids ``[n_tokens]``: the start of infopt's default evaluation
    text (Lee articles 0-~15), which training (:data:`~.data.TRAIN_ARTICLES`) and
    calibration never use."""
    from ..eval import default_text, tokenize_text

    return tokenize_text(tokenizer, default_text(), n_tokens)


@dataclasses.dataclass
class DistillRun:
    """Summary of :func:`run_distill`: ``before`` / ``after`` held-out metrics of the student
    (``eval_ppl``, ``eval_kl`` to the teacher, ``eval_top1``, ``eval_ppl_teacher``), the
    training ``history``, wall time and the output directory."""

    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, Any]]
    train_seconds: float
    out: str
    config: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self) -> str:
        lines = [f"{'':<8}{'ppl':>10}{'KL(teacher||student)':>24}{'top-1':>8}"]
        for name, m in (("before", self.before), ("after", self.after)):
            lines.append(f"{name:<8}{m['eval_ppl']:>10.3f}{m.get('eval_kl', float('nan')):>24.4f}"
                         f"{m.get('eval_top1', float('nan')):>8.3f}")
        if "eval_ppl_teacher" in self.after:
            lines.append(f"teacher ppl {self.after['eval_ppl_teacher']:.3f}; trained "
                         f"{self.train_seconds:.0f} s; wrote {self.out}")
        return "\n".join(lines)


def run_distill(
    teacher: str,
    student: str,
    out: str | Path,
    config: DistillConfig,
    *,
    student_quant: str | None = None,
    student_layers: int | None = None,
    data: str = "text",
    seq_len: int = 256,
    max_windows: int | None = None,
    eval_tokens: int = 4096,
    resume: bool = False,
    progress: bool | None = None,
) -> DistillRun:
    """Load ``teacher`` and ``student`` (registry names or local dirs), distill, evaluate on
    held-out text before and after, export to ``out`` (``load_model(out)``, or
    ``load_quantized(out)`` with ``student_quant="int4"``) and write ``out/distill.json``.

    Args:
        student_quant: ``"int4"``: train with int4 fake quantization and export int4.
        student_layers: keep only the student's first n decoder layers.
        data: ``"sharegpt"``, ``"text"`` or a file (see :func:`~.data.load_texts`).
    """
    from ..models import load_model

    if student_quant not in (None, "int4"):
        raise ValueError(f"student_quant must be None or 'int4', got {student_quant!r}")
    if student_quant and config.fake_quant != "int4":
        config = dataclasses.replace(config, fake_quant="int4")
    t_model, t_tok = load_model(teacher, dtype=torch.float32, progress=progress)
    s_model, s_tok = load_model(student, dtype=torch.float32, progress=progress)
    if student_layers is not None:
        s_model = layer_truncated(s_model, student_layers)
    texts = load_texts(data, role="conversation")
    train = token_windows(s_tok, texts, seq_len, max_windows=max_windows)
    if config.steps * config.grad_accum * config.batch_size > 4 * len(train):
        _log.warning("%d steps x %d sequences revisit each of the %d training windows more "
                     "than 4 times", config.steps, config.grad_accum * config.batch_size,
                     len(train))
    held = eval_token_ids(s_tok, eval_tokens)
    window = min(512, getattr(s_model.config, "max_position_embeddings", 512))
    out = Path(out)
    if config.fake_quant:
        # the fake-quantized student before training is the RTN int4 model
        from .student_linear import attach

        probe = copy.deepcopy(s_model)
        attach(probe, fake_quant_group=config.group_size)
        before = evaluate(probe, t_model, held, window=window)
        del probe
    else:
        before = evaluate(s_model, t_model, held, window=window)
    t0 = time.perf_counter()
    res = distill(s_model, t_model, DistillData(train.input_ids), config, out_dir=out,
                  resume=resume, student_tokenizer=s_tok, teacher_tokenizer=t_tok,
                  progress=progress)
    secs = time.perf_counter() - t0
    after = evaluate(s_model, t_model, held, window=window)
    export_student(s_model, s_tok, out, quant=student_quant, group_size=config.group_size)
    run = DistillRun(before, after, res.history, secs, str(out), config.to_dict())
    (out / "distill.json").write_text(json.dumps(run.to_dict(), indent=1))
    return run

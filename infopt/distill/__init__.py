"""Knowledge distillation: soft-target losses, teacher data, a small trainer, applications.

    from infopt import distill
    distill.forward_kl(student_logits, teacher_logits, temperature=2.0)
    distill.distill(student, teacher, data, distill.DistillConfig(loss="jsd", beta=0.5))

See ``docs/distill.md``.
"""

from .align import HiddenStateLoss, check_vocab, map_teacher_logits, vocab_size
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import (
    TRAIN_ARTICLES,
    DistillData,
    load_shards,
    load_texts,
    paraphrase_prompts,
    sample_continuations,
    save_shards,
    teacher_generate,
    teacher_topk,
    token_windows,
    training_text,
)
from .losses import (
    DIVERGENCES,
    LossParts,
    TopKTargets,
    chunked_distill_loss,
    combined_loss,
    divergence,
    divergence_from_logprobs,
    forward_kl,
    jsd,
    reverse_kl,
    sparse_divergence,
    topk_targets,
    tvd,
)
from .student_linear import DistillLinear, attach, export_int4, merge
from .trainer import DistillResult, distill, evaluate, export_student

__all__ = [
    "DIVERGENCES",
    "TRAIN_ARTICLES",
    "DistillConfig",
    "DistillData",
    "DistillLinear",
    "DistillResult",
    "attach",
    "distill",
    "evaluate",
    "export_int4",
    "export_student",
    "latest_checkpoint",
    "load_checkpoint",
    "load_shards",
    "load_texts",
    "merge",
    "paraphrase_prompts",
    "sample_continuations",
    "save_checkpoint",
    "save_shards",
    "teacher_generate",
    "teacher_topk",
    "token_windows",
    "training_text",
    "HiddenStateLoss",
    "LossParts",
    "TopKTargets",
    "check_vocab",
    "chunked_distill_loss",
    "combined_loss",
    "divergence",
    "divergence_from_logprobs",
    "forward_kl",
    "jsd",
    "map_teacher_logits",
    "reverse_kl",
    "sparse_divergence",
    "topk_targets",
    "tvd",
    "vocab_size",
]

"""Knowledge distillation: soft-target losses, teacher data, a small trainer, applications.

    from infopt import distill
    distill.forward_kl(student_logits, teacher_logits, temperature=2.0)
    distill.distill(student, teacher, data, distill.DistillConfig(loss="jsd", beta=0.5))

See ``docs/distill.md``.
"""

from .align import HiddenStateLoss, check_vocab, map_teacher_logits, vocab_size
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

__all__ = [
    "DIVERGENCES",
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

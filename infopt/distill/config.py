"""``DistillConfig``: every knob of :func:`infopt.distill.distill` in one versioned dataclass.

The config is saved in each checkpoint; resuming with a config that differs in anything but
the run-control fields (:data:`RUN_CONTROL_FIELDS`) is refused, naming the fields, because
the continued run would no longer be the run the checkpoint belongs to.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from ..config import InfoptConfig, register_config
from .losses import DIVERGENCES

__all__ = ["DTYPES", "FAKE_QUANT", "RUN_CONTROL_FIELDS", "DistillConfig"]

DTYPES = ("fp32", "bf16")
FAKE_QUANT = (None, "int4")
#: fields that may change between a checkpoint and its resumption
RUN_CONTROL_FIELDS = ("eval_every", "save_every", "log_every", "keep_checkpoints")


def _int(name: str, v: Any, lo: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def _num(name: str, v: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False) -> None:
    ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a number in {rng}, got {v!r}")


@register_config
@dataclasses.dataclass(frozen=True)
class DistillConfig(InfoptConfig):
    """Args (loss):
        loss: divergence, one of ``forward_kl``, ``reverse_kl``, ``jsd``, ``tvd``.
        beta: JSD mixture weight (TRL convention; 0 = forward KL, 1 = reverse KL).
        temperature: divides both logits; the divergence term is scaled by T^2.
        alpha: weight of the cross-entropy on the data's next tokens:
            ``alpha * CE + (1 - alpha) * T^2 * divergence``.
        hidden_weight, hidden_layer_map, hidden_loss: optional hidden-state matching
            (``{student layer: teacher layer}`` as pairs; ``mse`` / ``cosine``) added as
            ``hidden_weight * loss``.
        chunk_size: positions per chunk of the loss (None: the whole sequence at once).

    Args (data): batch_size sequences per micro-batch, grad_accum micro-batches per step;
        lmbda: fraction of micro-batches whose continuation the *student* samples (on-policy,
        GKD): the first ``prompt_len`` tokens of each sequence are kept as the prompt, the
        rest is sampled at ``gen_temperature`` and only those tokens are scored.

    Args (optimisation): AdamW with ``lr``, ``weight_decay``, ``adam_betas``; linear warmup over
        ``warmup_steps`` then cosine decay to ``min_lr_ratio * lr`` at ``steps``;
        ``max_grad_norm`` clipping (None: off); ``dtype`` fp32 or bf16 autocast;
        ``gradient_checkpointing`` (HF models).

    Args (what trains): ``trainable``/``frozen`` glob patterns over parameter names;
        ``lora_rank > 0`` trains rank-r adapters on the linears matching ``lora_targets``
        instead of their weights (merged into the weights on export);
        ``fake_quant="int4"``: linears selected like ``quant="int4"`` (all but ``lm_head``) run
        with int4 RTN group-wise weights (``group_size``) in the forward and straight-through
        gradients, so the exported int4 model computes what was trained.

    Args (run control): ``eval_every`` / ``save_every`` / ``log_every`` steps (0 = never),
        ``keep_checkpoints`` newest checkpoints kept, ``seed``.
    """

    loss: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    alpha: float = 0.0
    hidden_weight: float = 0.0
    hidden_layer_map: tuple = ()
    hidden_loss: str = "mse"
    chunk_size: int | None = 256
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lmbda: float = 0.0
    prompt_len: int = 16
    gen_temperature: float = 1.0
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    dtype: str = "fp32"
    gradient_checkpointing: bool = False
    trainable: tuple = ("*",)
    frozen: tuple = ()
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple = ("*_proj",)
    fake_quant: str | None = None
    group_size: int = 128
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in DIVERGENCES:
            raise ValueError(f"loss must be one of {DIVERGENCES}, got {self.loss!r}")
        _num("beta", self.beta, 0.0, 1.0)
        _num("temperature", self.temperature, 0.0, lo_open=True)
        _num("alpha", self.alpha, 0.0, 1.0)
        _num("hidden_weight", self.hidden_weight, 0.0)
        if self.hidden_loss not in ("mse", "cosine"):
            raise ValueError(f"hidden_loss must be 'mse' or 'cosine', got {self.hidden_loss!r}")
        pairs = tuple(tuple(int(x) for x in p) for p in self.hidden_layer_map)
        if any(len(p) != 2 for p in pairs):
            raise ValueError("hidden_layer_map must be (student layer, teacher layer) pairs, got "
                             f"{self.hidden_layer_map!r}")
        object.__setattr__(self, "hidden_layer_map", pairs)
        if self.hidden_weight > 0 and not pairs:
            raise ValueError("hidden_weight > 0 needs hidden_layer_map pairs")
        if self.chunk_size is not None:
            _int("chunk_size", self.chunk_size, 1)
        for name, lo in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("prompt_len", 1),
                         ("warmup_steps", 0), ("lora_rank", 0), ("eval_every", 0),
                         ("save_every", 0), ("log_every", 0), ("keep_checkpoints", 1),
                         ("seed", 0)):
            _int(name, getattr(self, name), lo)
        _num("lmbda", self.lmbda, 0.0, 1.0)
        _num("gen_temperature", self.gen_temperature, 0.0, lo_open=True)
        _num("lr", self.lr, 0.0, lo_open=True)
        _num("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _num("weight_decay", self.weight_decay, 0.0)
        if len(self.adam_betas) != 2:
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")
        for b in self.adam_betas:
            _num("adam_betas", b, 0.0, 0.999999)
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if self.max_grad_norm is not None:
            _num("max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.fake_quant not in FAKE_QUANT:
            raise ValueError(f"fake_quant must be one of {FAKE_QUANT}, got {self.fake_quant!r}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be one of (32, 64, 128), got {self.group_size!r}")
        _num("lora_alpha", self.lora_alpha, 0.0, lo_open=True)
        for name in ("trainable", "frozen", "lora_targets"):
            v = getattr(self, name)
            v = (v,) if isinstance(v, str) else tuple(v)
            if not all(isinstance(p, str) for p in v):
                raise ValueError(f"{name} must be glob patterns (strings), got {v!r}")
            object.__setattr__(self, name, v)

    @property
    def micro_batches(self) -> int:
        return self.steps * self.grad_accum

    def diff(self, other: DistillConfig) -> list[str]:
        """Names of the fields (other than run control) whose values differ."""
        a, b = self.to_dict()["fields"], other.to_dict()["fields"]
        return [k for k in a if k not in RUN_CONTROL_FIELDS and a[k] != b.get(k)]

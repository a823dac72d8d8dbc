"""Trainable linears for distillation: int4 fake quantization (straight-through) and LoRA.

:class:`DistillLinear` is an ``nn.Linear`` (same ``weight`` / ``bias`` names) whose forward
uses ``W + (alpha / r) * B @ A`` when LoRA adapters are attached and, with fake quantization,
that weight rounded onto infopt's int4 RTN grid (:func:`infopt.quant.formats.fake_quantize_int4`:
asymmetric, one ``(scale, zero)`` per ``group_size`` columns, range including 0). The
rounding is the straight-through estimator: the forward sees the rounded weight, the gradient
flows to the unrounded one as if rounding were the identity (torchao's QAT does the same).
Because the grid is recomputed from the current weight on every forward exactly as RTN
quantization computes it, :func:`export_int4` (merge, then ``quantize_model(..., "int4")``)
produces a model whose weights are the ones the last training forward used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..module_walk import matches_any, replace_modules
from ..quant.formats import check_group_size, fake_quantize_int4

__all__ = ["DistillLinear", "attach", "export_int4", "fake_quant_targets", "merge"]


class _RoundSTE(torch.autograd.Function):
    """Forward: ``fake_quantize_int4(w)``; backward: identity (straight-through)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group_size: int) -> torch.Tensor:  # noqa: ANN001
        return fake_quantize_int4(w.detach(), group_size).to(w.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: ANN001
        return grad, None


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype ``F.linear`` computes in for input ``x``: the autocast dtype when autocast is
    on for ``x``'s device type, else ``x``'s own dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class DistillLinear(nn.Linear):
    """``nn.Linear`` with optional LoRA (``lora_a [r, K]``, ``lora_b [N, r]``) and optional
    int4 fake quantization of the effective weight ``[N, K]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 fake_quant_group: int | None = None, lora_rank: int = 0,
                 lora_alpha: float = 16.0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.fake_quant_group = (None if fake_quant_group is None
                                 else check_group_size(fake_quant_group))
        self.lora_rank = lora_rank
        self.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            self.lora_a = nn.Parameter(torch.empty(lora_rank, in_features))
            self.lora_b = nn.Parameter(torch.zeros(out_features, lora_rank))
            nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, fake_quant_group: int | None = None,
                    lora_rank: int = 0, lora_alpha: float = 16.0,
                    generator: torch.Generator | None = None) -> DistillLinear:
        """Wrap ``linear``, sharing its weight and bias Parameters (no copy)."""
        with torch.device("meta"):
            mod = cls(linear.in_features, linear.out_features, linear.bias is not None)
        mod.weight, mod.bias = linear.weight, linear.bias
        mod.fake_quant_group = None if fake_quant_group is None else check_group_size(
            fake_quant_group)
        mod.lora_rank = lora_rank
        mod.lora_scale = lora_alpha / lora_rank if lora_rank else 0.0
        if lora_rank:
            w = linear.weight
            a = torch.empty(lora_rank, linear.in_features, dtype=w.dtype, device=w.device)
            # kaiming-uniform bound of nn.Linear, drawn from a given generator (reproducible)
            bound = 1.0 / math.sqrt(linear.in_features)
            a.uniform_(-bound, bound, generator=generator)
            mod.lora_a = nn.Parameter(a)
            mod.lora_b = nn.Parameter(torch.zeros(linear.out_features, lora_rank, dtype=w.dtype,
                                                  device=w.device))
        return mod

    def effective_weight(self) -> torch.Tensor:
        """The ``[N, K]`` weight the forward uses before fake quantization."""
        w = self.weight
        if self.lora_rank:
            w = w + self.lora_scale * (self.lora_b @ self.lora_a)
        return w

    def _params(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.lora_a, self.lora_b] if self.lora_rank else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fake_quant_group is not None and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self._params())
        ):
            # No gradient reaches this weight (sampling, evaluation, or a frozen linear in
            # training): its rounded weight only changes when a parameter does.
            w = self._rounded_cached(_compute_dtype(x))
        else:
            self.__dict__["_rounded"] = None  # training: the weights are about to change
            w = self.effective_weight()
            if self.fake_quant_group is not None:
                w = _RoundSTE.apply(w, self.fake_quant_group)
        return F.linear(x, w.to(x.dtype) if w.dtype != x.dtype else w, self.bias)

    def _rounded_cached(self, dtype: torch.dtype) -> torch.Tensor:
        """The rounded weight ``[N, K]`` in ``dtype`` for forwards that train no parameter of
        this linear (on-policy sampling runs one per generated token; a frozen linear one per
        training forward), recomputed only when a weight changed in place (the optimizer step)
        or was replaced, or another dtype is asked for: rounding every linear per forward
        dominated sampling and partial training. One dtype is cached at a time (a bf16
        autocast forward gets the bf16 copy, with no per-forward cast)."""
        params = self._params()
        key = (tuple((id(p), p._version) for p in params), dtype)
        cached = self.__dict__.get("_rounded")
        if cached is None or cached[0] != key:
            self.__dict__["_rounded"] = None  # free the old copy before making the new one
            w = fake_quantize_int4(self.effective_weight().detach(), self.fake_quant_group)
            cached = (key, w.to(dtype), params)  # params kept: ids stay unique
            self.__dict__["_rounded"] = cached
        return cached[1]

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the merged (unrounded) weight."""
        with torch.device("meta"):
            lin = nn.Linear(self.in_features, self.out_features, self.bias is not None)
        lin.weight = nn.Parameter(self.effective_weight().detach().clone()) if self.lora_rank \
            else self.weight
        lin.bias = self.bias
        return lin

    def extra_repr(self) -> str:
        extra = []
        if self.fake_quant_group is not None:
            extra.append(f"fake_quant=int4 g{self.fake_quant_group}")
        if self.lora_rank:
            extra.append(f"lora_rank={self.lora_rank}")
        return ", ".join([super().extra_repr(), *extra])


def fake_quant_targets(model: nn.Module, group_size: int = 128) -> list[str]:
    """The linears ``wrap_model(quant="int4")`` would quantize (every ``nn.Linear`` except the
    output head), i.e. the ones to fake-quantize."""
    from ..quant import Int4WeightOnlyConfig, select_targets

    return select_targets(model, Int4WeightOnlyConfig(method="rtn", group_size=group_size))


def attach(model: nn.Module, *, fake_quant_group: int | None = None, lora_rank: int = 0,
           lora_alpha: float = 16.0, lora_targets: Sequence[str] = ("*_proj",),
           seed: int = 0) -> list[str]:
    """Swap linears for :class:`DistillLinear` in place; returns the swapped names.

    Fake quantization covers :func:`fake_quant_targets`; LoRA covers linears whose dotted
    name matches ``lora_targets``. A linear gets both when selected by both.
    """
    fq = set(fake_quant_targets(model, fake_quant_group)) if fake_quant_group else set()
    lora = {n for n, m in model.named_modules()
            if lora_rank and isinstance(m, nn.Linear) and matches_any(n, lora_targets)}
    if lora_rank and not lora:
        raise ValueError(f"lora_targets {list(lora_targets)} match no nn.Linear of the model")
    names = sorted(fq | lora)
    gen = torch.Generator().manual_seed(seed)

    def build(m: nn.Module, n: str) -> nn.Module:
        return DistillLinear.from_linear(
            m, fake_quant_group=fake_quant_group if n in fq else None,
            lora_rank=lora_rank if n in lora else 0, lora_alpha=lora_alpha, generator=gen)

    wanted = set(names)
    replace_modules(model, lambda m, n: n in wanted and not isinstance(m, DistillLinear), build)
    return names


def merge(model: nn.Module) -> nn.Module:
    """Replace every :class:`DistillLinear` by a plain ``nn.Linear`` with the merged,
    unrounded weight (in place; returns the model)."""
    replace_modules(model, lambda m, n: isinstance(m, DistillLinear), lambda m, n: m.to_linear())
    return model


def export_int4(model: nn.Module, group_size: int = 128) -> nn.Module:
    """Merge and quantize to infopt's int4 RTN format (``Int4Linear``; save it with
    :func:`infopt.quant.save_quantized`). In place; returns the model."""
    from ..quant import Int4WeightOnlyConfig, quantize_model

    merge(model)
    return quantize_model(model, Int4WeightOnlyConfig(method="rtn", group_size=group_size),
                          progress=False)

"""Model structure discovery for calibrated quantization, without architecture names.

* :func:`find_blocks`: the repeated transformer blocks
  (:func:`infopt.module_walk.find_decoder_blocks`, shared with layer-skip speculation).
* :func:`capture_block_inputs`: run the model until the first block and keep its inputs
  (hidden states plus the keyword arguments the model passes: masks, rotary embeddings...),
  so each block can then be run on its own, one at a time (GPTQ-style sequential
  calibration).
* :func:`input_groups`: linears that read the very same input tensor (q/k/v, gate/up) and
  must therefore share one per-input-channel scale.
* :func:`find_fold`: the op whose output channels can absorb ``1 / s`` for a group. Candidates
  are norm-like modules (a 1-D ``weight`` of size K) and linears with ``out_features == K``
  inside the block; a candidate is accepted only if folding a random scale through it leaves
  the block's output unchanged on real activations (checked in fp32). That test is what
  makes the choice architecture-agnostic: RMSNorm -> q/k/v passes, up_proj -> down_proj passes
  (``act(gate) * up`` is linear in ``up``), gate_proj or q_proj -> anything fails.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn

from ..module_walk import find_decoder_blocks

__all__ = [
    "BlockInputs",
    "apply_fold",
    "capture_block_inputs",
    "find_blocks",
    "find_fold",
    "input_groups",
    "run_block",
    "set_tensor",
]

# (hidden [B, L, D], kwargs) for one calibration chunk.
BlockInputs = list[tuple[torch.Tensor, dict[str, Any]]]


class _Stop(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the model's repeated blocks
    (:func:`infopt.module_walk.find_decoder_blocks`); ``ValueError`` if there is none."""
    return find_decoder_blocks(model, "calibrated quantization")


def _to(obj: Any, device: torch.device | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move / cast the floating tensors inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.is_floating_point():
            obj = obj.to(dtype)
        return obj.to(device) if device is not None else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, dtype) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, batch_size: int = 8
) -> BlockInputs:
    """Inputs to ``blocks[0]`` for ``input_ids [n, L]``, in chunks of ``batch_size`` samples.

    The model is run with ``use_cache=False`` up to the first block only.
    """
    device = next(model.parameters()).device
    captured: BlockInputs = []

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        if len(args) > 1:
            raise ValueError("blocks called with extra positional arguments are not supported")
        captured.append((hidden.detach(), rest))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(input_ids=input_ids[i : i + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    if len(captured) != (input_ids.shape[0] + batch_size - 1) // batch_size:
        raise RuntimeError("the model's forward did not reach its first block for every chunk")
    return captured


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """``block(hidden, **kwargs)`` -> hidden ``[B, L, D]`` (tuple outputs: first element)."""
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _named_linears(block: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    mods = dict(block.named_modules())
    return {n: mods[n] for n in names}


@torch.no_grad()
def input_groups(
    block: nn.Module, names: list[str], hidden: torch.Tensor, kwargs: dict[str, Any]
) -> list[list[str]]:
    """Group the linears ``names`` (relative to ``block``) by identical input tensor.

    Groups come in execution order; the tensors are kept alive during the probe so their
    identity (``is``) is meaningful.
    """
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def make_hook(name: str):
        def hook(_m: nn.Module, args: tuple) -> None:
            for t, group in seen:
                if t is args[0]:
                    group.append(name)
                    return
            seen.append((args[0], [name]))

        return hook

    for n, lin in _named_linears(block, names).items():
        handles.append(lin.register_forward_pre_hook(make_hook(n)))
    try:
        run_block(block, hidden, kwargs)
    finally:
        for h in handles:
            h.remove()
    return [g for _, g in seen]


def _fold_candidates(block: nn.Module, group: list[str], k: int) -> Iterator[str]:
    for name, mod in block.named_modules():
        if not name or name in group:
            continue
        if isinstance(mod, nn.Linear):
            if mod.out_features == k:
                yield name
        elif not list(mod.children()):
            w = getattr(mod, "weight", None)
            b = getattr(mod, "bias", None)
            if (
                isinstance(w, torch.Tensor) and w.dim() == 1 and w.numel() == k
                and (b is None or (isinstance(b, torch.Tensor) and b.shape == w.shape))
            ):
                yield name


def set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace ``module.<name>`` (a parameter or buffer) by ``value``, never writing into the
    old tensor: ``wrap_model`` restores a model whose option failed half-way by putting its
    original tensor objects back, which only works if they were never modified in place."""
    old = getattr(module, name)
    if isinstance(old, nn.Parameter):
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


@torch.no_grad()
def apply_fold(block: nn.Module, prev: str, group: list[str], s: torch.Tensor) -> None:
    """Fold a smoothing scale: ``prev``'s output channels ``/= s``, the group's input columns
    ``*= s``. ``s [K]`` > 0. The block's function is unchanged (up to rounding). The modules
    get new tensors (see :func:`set_tensor`); the old ones are left as they were."""
    mods = dict(block.named_modules())
    p = mods[prev]
    if isinstance(p, nn.Linear):
        set_tensor(p, "weight", p.weight / s.to(p.weight)[:, None])
    else:
        set_tensor(p, "weight", p.weight / s.to(p.weight))
    if getattr(p, "bias", None) is not None:
        set_tensor(p, "bias", p.bias / s.to(p.bias))
    for n in group:
        w = mods[n].weight
        set_tensor(mods[n], "weight", w * s.to(w)[None, :])


@torch.no_grad()
def find_fold(
    block: nn.Module, group: list[str], hidden: torch.Tensor, kwargs: dict[str, Any],
    tol: float = 1e-3,
) -> str | None:
    """Name (relative to ``block``) of the op that can absorb the group's input scale, or None.

    Each candidate is tried on an fp32 copy of the block: fold a random scale in [0.5, 2]
    through it and accept if the block's residual update changes by less than ``tol``
    (relative); correct folds change it by ~1e-6, wrong ones by O(0.1). Candidates whose
    output *is* the group's input tensor are tried first.
    """
    mods = dict(block.named_modules())
    k = mods[group[0]].in_features
    candidates = list(_fold_candidates(block, group, k))
    if not candidates:
        return None
    ref_block = copy.deepcopy(block).float()
    h = hidden[:1].float()
    kw = _to(kwargs, dtype=torch.float32)
    ref_delta = run_block(ref_block, h, kw) - h
    # Direct producers of the group's input first, so the common case costs one trial.
    outputs: dict[str, Any] = {}
    inputs: list[torch.Tensor] = []
    ref_mods = dict(ref_block.named_modules())
    handles = [ref_mods[c].register_forward_hook(
        lambda _m, _a, out, c=c: outputs.__setitem__(c, out)) for c in candidates]
    handles.append(ref_mods[group[0]].register_forward_pre_hook(lambda _m, a: inputs.append(a[0])))
    try:
        run_block(ref_block, h, kw)
    finally:
        for hd in handles:
            hd.remove()
    direct = [c for c in candidates if outputs.get(c) is inputs[0]]
    ordered = direct + [c for c in candidates if c not in direct]
    gen = torch.Generator().manual_seed(1234)
    s = 0.5 + 1.5 * torch.rand(k, generator=gen)
    scale = ref_delta.norm().clamp_min(1e-12)
    for cand in ordered:
        trial = copy.deepcopy(ref_block)
        apply_fold(trial, cand, group, s)
        err = (run_block(trial, h, kw) - h - ref_delta).norm() / scale
        if float(err) < tol:
            return cand
    return None

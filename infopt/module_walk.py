"""One walk over a module tree, with full dotted names and a filter; the decoder-block finder.

Techniques (quantization, layer skipping...) never special-case an architecture: they select
modules by type and by name patterns and replace them through :func:`replace_modules`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator

import torch.nn as nn


def matches_any(name: str, patterns: Iterable[str]) -> bool:
    """True if the dotted module name matches any glob pattern (``"lm_head"``, ``"*.mlp.*"``)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def iter_modules(
    model: nn.Module, filter_fn: Callable[[nn.Module, str], bool]
) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(fqn, module)`` for every submodule for which ``filter_fn(module, fqn)`` holds."""
    for fqn, mod in model.named_modules():
        if fqn and filter_fn(mod, fqn):
            yield fqn, mod


def replace_modules(
    model: nn.Module,
    filter_fn: Callable[[nn.Module, str], bool],
    replace_fn: Callable[[nn.Module, str], nn.Module],
) -> list[str]:
    """Replace, in place, every child module selected by ``filter_fn(module, fqn)``.

    The walk is over ``named_children`` so a replaced module's own children are not visited
    again (a quantized linear is not re-quantized). Returns the replaced dotted names in order.
    """
    replaced: list[str] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in list(parent.named_children()):
            fqn = f"{prefix}.{child_name}" if prefix else child_name
            if filter_fn(child, fqn):
                new = replace_fn(child, fqn)
                if not isinstance(new, nn.Module):
                    raise TypeError(f"replace_fn returned {type(new).__name__} for {fqn}")
                setattr(parent, child_name, new)
                replaced.append(fqn)
            else:
                visit(child, fqn)

    visit(model, "")
    return replaced


def _has_linear(module: nn.Module) -> bool:
    # nn.Linear, or a drop-in replacement of one (infopt's quantized linears, LoRA wrappers...).
    return any(
        isinstance(m, nn.Linear)
        or (isinstance(getattr(m, "in_features", None), int)
            and isinstance(getattr(m, "out_features", None), int))
        for m in module.modules()
    )  # fmt: skip


def _numel(module: nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def find_decoder_blocks(model: nn.Module, purpose: str = "this") -> tuple[str, nn.ModuleList]:
    """``(dotted name, ModuleList)`` of the model's repeated decoder blocks, found by structure
    (never by architecture name): among the ``nn.ModuleList`` s of same-typed modules that
    contain linear layers, the one holding the most parameter and buffer elements.

    Raises ``ValueError`` (``"<purpose> needs a stack of repeated blocks ..."``) if there is
    none.
    """
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if len({type(m) for m in mod}) != 1 or not _has_linear(mod[0]):
            continue
        size = _numel(mod)
        if best is None or size > best[0]:
            best = (size, name, mod)
    if best is None:
        raise ValueError(
            f"{purpose} needs a stack of repeated blocks (an nn.ModuleList of same-typed modules "
            f"containing linear layers); none found in {type(model).__name__}"
        )
    return best[1], best[2]

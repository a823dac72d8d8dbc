"""Compound rows and the "stack" table: how techniques combine.

A compound row is named by its parts joined with ``+`` (``int4+paged-prefix+spec-prompt-lookup``)
and applies every part's ``wrap_model`` options in one call. When the parts were measured in
the same run, :func:`format_stack` lines up each part's decode speedup over the baseline, their
product (what the gains would be if they multiplied) and the compound's measured speedup, with
the perplexity increase of every row, so a combination that loses its gains or its quality shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["compound_config", "format_stack"]


def compound_config(parts: Sequence[Any]) -> Any:
    """A :class:`~infopt.bench.configs.BenchConfig` applying the ``wrap_model`` options of every
    row in ``parts`` (rows with ``apply`` callables or a non-fp32 dtype cannot be combined; two
    parts setting the same option are refused)."""
    from .configs import BenchConfig

    options: dict[str, Any] = {}
    quality = None
    for p in parts:
        if p.apply is not None or p.dtype != parts[0].dtype:
            raise ValueError(f"bench row {p.name!r} cannot be part of a compound row (it "
                             "replaces the model or changes its dtype)")
        clash = set(options) & set(p.wrap_options)
        if clash:
            raise ValueError(f"compound row: {sorted(clash)} set by more than one part")
        options.update(p.wrap_options)
        quality = quality or p.quality  # e.g. a kv part reads quality through the cache
    name = "+".join(p.name for p in parts)
    desc = "compound: " + " + ".join(p.name for p in parts)
    return BenchConfig(name, desc, dtype=parts[0].dtype, wrap_options=options, quality=quality)


def _ppl_increase(row: Any) -> float | None:
    ev = row.eval or {}
    ref, cand = ev.get("ppl_ref"), ev.get("ppl_cand")
    if not ref or cand is None:
        return None
    return 100.0 * (cand / ref - 1.0)


def format_stack(rows: Sequence[Any]) -> str:
    """The stack table for every compound row whose parts are all in ``rows`` ("" if none)."""
    by_name = {r.name: r for r in rows}
    lines = []
    for r in rows:
        parts = r.name.split("+")
        if len(parts) < 2 or not all(p in by_name for p in parts):
            continue
        product = 1.0
        cells = []
        for p in parts:
            s = by_name[p].ratios.get("decode_speedup", float("nan"))
            product *= s
            inc = _ppl_increase(by_name[p])
            cells.append(f"{p} {s:.2f}x" + (f" ({inc:+.1f}% ppl)" if inc is not None else ""))
        measured = r.ratios.get("decode_speedup", float("nan"))
        inc = _ppl_increase(r)
        lines.append(
            f"  {r.name}: " + " x ".join(cells) + f" = {product:.2f}x expected; measured "
            f"{measured:.2f}x ({measured / product:.0%} of the product)"
            + (f", ppl {inc:+.1f}%" if inc is not None else "")
        )
    if not lines:
        return ""
    return "stack (decode speedup over the baseline, each part alone and combined):\n" + \
        "\n".join(lines)

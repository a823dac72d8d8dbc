"""``infopt bench --plot PATH``: decode speed against quality loss, one point per row.

x: perplexity increase over the baseline (``ppl_rel_increase``, in %, the worst of the main
text and the evaluation domains; 0 for the baseline and for exact rows); y: decode tokens/s
(median of the timed runs). Up and to the left is better: a row above the baseline's dashed
line is faster, one right of it costs quality. Rows without quality figures
(``--eval-tokens 0``) are drawn at x = 0 and say so in their label; rows over the quality
gate's budget say so too.

matplotlib is an optional dependency (``pip install matplotlib``, or ``infopt[dev]``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

__all__ = ["plot_available", "plot_speed_quality"]

_MISSING = (
    "--plot needs matplotlib, which is not installed: pip install matplotlib "
    "(or pip install 'infopt[dev]')"
)


def plot_available() -> str | None:
    """``None`` if matplotlib can be imported, else the message to show."""
    return None if importlib.util.find_spec("matplotlib") is not None else _MISSING


def _points(res: Any) -> list[tuple[str, float, float, bool]]:
    """``(name, ppl increase %, decode tok/s, has quality)`` per row."""
    out = []
    for r in res.rows:
        ev = r.eval or {}
        rels = [ev.get("ppl_rel_increase"),
                *((d or {}).get("ppl_rel_increase") for d in (r.domains or {}).values())]
        rels = [v for v in rels if isinstance(v, int | float)]
        rel = max(rels) if rels else None
        has_quality = rel is not None
        out.append((r.name, 100.0 * rel if has_quality else 0.0, r.decode_tok_s["median"],
                    has_quality))
    return out


def plot_speed_quality(res: Any, path: str | os.PathLike[str]) -> str:
    """Write the speed-vs-quality PNG of a :class:`~infopt.bench.BenchResult` to ``path``;
    returns the path. Raises ``ImportError`` naming the fix when matplotlib is missing."""
    missing = plot_available()
    if missing is not None:
        raise ImportError(missing)
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    points = _points(res)
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    try:
        base = next((p for p in points if p[0] == res.baseline), points[0])
        ax.axhline(base[2], color="0.6", linestyle="--", linewidth=1)
        ax.axvline(0.0, color="0.8", linewidth=1)
        for name, x, y, has_quality in points:
            is_base = name == res.baseline
            ax.scatter([x], [y], s=60 if is_base else 45, zorder=3,
                       marker="s" if is_base else "o", color="0.3" if is_base else None)
            label = name if has_quality or is_base else f"{name} (no quality run)"
            row = next(r for r in res.rows if r.name == name)
            if row.gate is not None and not row.gate["passed"]:
                label += " (over quality budget)"
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
        ax.set_xlabel(f"perplexity increase vs {res.baseline} (%, worst text or domain)")
        ax.set_ylabel("decode tokens/s (median, batch 1, greedy)")
        ax.set_title(f"infopt bench: {res.model} on {res.device} ({res.threads} threads)",
                     fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15, y=0.12)
        fig.tight_layout()
        fig.savefig(os.fspath(path))
    finally:
        plt.close(fig)
    return os.fspath(path)

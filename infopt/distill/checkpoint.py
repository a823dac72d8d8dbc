"""Training checkpoints as safetensors: trainable tensors + AdamW state + the config.

``<out>/checkpoint-<step>/trainer.safetensors`` holds ``param.<name>`` (every trainable
tensor, fp32 as trained), ``opt.<i>.<key>`` (AdamW's ``step`` / ``exp_avg`` /
``exp_avg_sq`` for parameter i, in the order of ``param_names``), and metadata (JSON
strings): ``config`` (the DistillConfig's ``to_dict()``), ``step``, ``param_names``,
``param_groups`` (AdamW hyper-parameters), ``frozen_fingerprint`` and ``history``. Frozen
tensors are not stored: resuming starts from the same student, which the fingerprint (count
and float64 sum of the frozen tensors) checks.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import DistillConfig

__all__ = ["CHECKPOINT_FILE", "fingerprint", "latest_checkpoint", "load_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FILE = "trainer.safetensors"
_DIR = re.compile(r"checkpoint-(\d+)")


def fingerprint(frozen: list[tuple[str, torch.Tensor]]) -> str:
    """Names, count and float64 sum of the frozen tensors (cheap; catches another student)."""
    total = sum(float(t.detach().double().sum()) for _, t in frozen)
    return json.dumps([len(frozen), sum(t.numel() for _, t in frozen), repr(total)])


def save_checkpoint(out_dir: str | Path, step: int, params: list[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, config: DistillConfig, frozen_fp: str,
                    history: list[dict[str, Any]]) -> Path:
    """Write ``checkpoint-<step>`` (atomically: a temp dir renamed) and drop the oldest
    beyond ``config.keep_checkpoints``. Returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params}
    state = optimizer.state_dict()
    for i, st in state["state"].items():
        for key, val in st.items():
            tensors[f"opt.{i}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    meta = {
        "format": "pt",
        "config": json.dumps(config.to_dict()),
        "step": str(step),
        "param_names": json.dumps([n for n, _ in params]),
        "param_groups": json.dumps(state["param_groups"]),
        "frozen_fingerprint": frozen_fp,
        "history": json.dumps(history),
    }
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(tensors, str(tmp / CHECKPOINT_FILE), metadata=meta)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    done = sorted((int(m.group(1)), p) for p in out.iterdir()
                  if (m := _DIR.fullmatch(p.name)) and (p / CHECKPOINT_FILE).exists())
    for _, old in done[: max(0, len(done) - config.keep_checkpoints)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The ``checkpoint-<step>`` directory of ``out_dir`` with the highest step, or None."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if (m := _DIR.fullmatch(p.name)) and (p / CHECKPOINT_FILE).exists()]
    return max(found)[1] if found else None


def load_checkpoint(path: str | Path, params: list[tuple[str, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, config: DistillConfig,
                    frozen_fp: str) -> tuple[int, list[dict[str, Any]]]:
    """Load a checkpoint into ``params`` (in place) and ``optimizer``; returns ``(step,
    history)``. Raises ``ValueError`` naming what differs (config fields, parameters, the
    frozen weights) before changing anything."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        try:
            saved = DistillConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{file}: not a distillation checkpoint ({e})") from e
        diff = config.diff(saved)
        if diff:
            a, b = config.to_dict()["fields"], saved.to_dict()["fields"]
            detail = ", ".join(f"{k}: checkpoint {b[k]!r}, now {a[k]!r}" for k in diff)
            raise ValueError(
                f"cannot resume from {file}: the config differs ({detail}). Resume with the "
                "checkpoint's config, or start a new run in another directory"
            )
        names = json.loads(meta["param_names"])
        if names != [n for n, _ in params]:
            raise ValueError(f"cannot resume from {file}: it trained {len(names)} tensors "
                             f"({names[:3]}...), this run {len(params)}; same student and config?")
        if meta.get("frozen_fingerprint") != frozen_fp:
            raise ValueError(f"cannot resume from {file}: the student's frozen weights differ "
                             "from the run's (start again from the same student model)")
        loaded = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    with torch.no_grad():
        for n, p in params:
            src = loaded[f"param.{n}"]
            if src.shape != p.shape:
                raise ValueError(f"{file}: {n} has shape {tuple(src.shape)}, the student "
                                 f"{tuple(p.shape)}")
            p.copy_(src)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in loaded.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"]), json.loads(meta.get("history", "[]"))

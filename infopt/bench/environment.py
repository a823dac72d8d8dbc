"""What the bench records around its measurements: the machine and library versions, the
kernel backend report, model sizes, the prompts it times, and freeing memory between rows."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from typing import Any

import torch

__all__ = ["machine_info", "model_bytes", "versions"]


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied embeddings).

    Tensor subclasses (e.g. torchao quantized weights) are measured through their inner
    tensors (``__tensor_flatten__``), so packed int8/int4 data counts at its real size. A peer
    whose weights live outside torch (llama.cpp) reports its file size as ``gguf_bytes``.
    """
    if getattr(model, "gguf_bytes", None) is not None:
        return int(model.gguf_bytes)
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()

    for t in (*model.parameters(), *model.buffers()):
        add(t.data if isinstance(t, torch.nn.Parameter) else t)
    return total


def _prompts(tokenizer: Any, text: str | None, kind: str, n: int) -> list[torch.Tensor]:
    """Prompt ids ``[1, L]`` for ``run_bench(prompt=kind)``."""
    if kind == "text":
        return [_prompt_ids(tokenizer, text, n)]
    from infopt.eval import CODE_PROMPTS, GROUNDED_PROMPTS

    texts = CODE_PROMPTS if kind == "code" else GROUNDED_PROMPTS
    return [
        torch.tensor([tokenizer.encode(t, add_special_tokens=False)], dtype=torch.long)
        for t in texts
    ]


def _prompt_ids(tokenizer: Any, text: str | None, n: int) -> torch.Tensor:
    """First ``n`` tokens of the evaluation text, shape ``[1, n]``."""
    if text is None:
        from infopt.eval import default_text

        text = default_text()
    # Encode only a generous head of the text (BPE averages ~4 characters a token): the
    # corpus is far longer than the model's context and tokenizers warn about that.
    ids = list(tokenizer.encode(text[: 16 * n + 256], add_special_tokens=False))
    if len(ids) < n:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    if not ids:
        raise ValueError("the prompt text tokenized to nothing")
    if len(ids) < n:  # only for short test texts; the eval corpus is far longer than any prompt
        ids = ids * (n // len(ids) + 1)
    return torch.tensor([ids[:n]], dtype=torch.long)


def _pad_token_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, list):
            v = v[0] if v else None
        if v is not None:
            return int(v)
    return 0


def _release_freed_memory(dev: torch.device) -> None:
    """Hand freed memory back to the OS so the next config's pre-load level is honest."""
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        # glibc keeps freed heap pages resident; the next config would reuse them "for free".
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def machine_info(dev: torch.device) -> dict[str, Any]:
    """CPU model, core counts, RAM, and the GPU when benchmarking on CUDA."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu
            )
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "logical_cores": os.cpu_count(), "os": platform.platform()}
    if hasattr(os, "getloadavg"):  # other work on the machine skews every timing; record it
        info["loadavg_1m_at_start"] = round(os.getloadavg()[0], 2)
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info["gpu"] = props.name
        info["gpu_mem_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def versions() -> dict[str, str]:
    import transformers

    import infopt

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "infopt": getattr(infopt, "__version__", "unknown"),
    }


def _backend_report() -> tuple[Any, str | None]:
    """``infopt.ops`` backend report, taken after the run so it shows what was used."""
    try:
        from infopt import ops

        return ops.backend_report(), ops.format_backend_report()
    except Exception as e:  # noqa: BLE001 - a missing/broken report must not lose the numbers
        return None, f"(kernel backend report unavailable: {type(e).__name__}: {e})"

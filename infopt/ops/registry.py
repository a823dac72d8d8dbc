"""Backend selection for the kernel layer.

Every public op in :mod:`infopt.ops` is registered here with a pure-torch reference and zero or
more kernel backends. A call resolves its backend in this order:

1. the per-call ``backend=`` argument, if given;
2. the process-wide default (:func:`set_backend` / :func:`use_backend`), initially ``AUTO``.

``AUTO`` picks by the input's device: CUDA tensors try ``cuda > triton > reference``, CPU tensors
try ``cpp > reference``, any other device runs ``reference``. Triton on CPU only runs through the
Triton interpreter, which is a correctness tool rather than a fast path, so ``AUTO`` never picks it
there; ask for it explicitly. An explicitly requested backend that cannot run the input raises
:class:`BackendUnavailableError`; it is never silently replaced. When ``AUTO`` has to skip a
preferred backend it logs a warning once per (op, device, chosen backend) on the
``infopt.ops.registry`` logger and records the fallback, which :func:`backend_report` shows.

Availability probes (building a C++ extension, importing Triton) run once per (op, backend,
device type) and their answer, with the reason when unavailable, is cached for the process.
Every call then checks, for each kernel backend, what all kernels share (here, once): the dtype
of the op's first argument (:data:`KERNEL_DTYPES`, or the backend's own ``dtypes``) and that no
input needs autograd (the kernels are inference-only); then the backend's own ``supports``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

__all__ = [
    "Backend",
    "BackendImpl",
    "BackendUnavailableError",
    "KERNEL_DTYPES",
    "backend_report",
    "format_backend_report",
    "get_backend",
    "kernel_call_check",
    "prime_probes",
    "parse_backend",
    "register_op",
    "reset_backend_stats",
    "select_backend",
    "set_backend",
    "use_backend",
]


class Backend(str, Enum):
    """Which implementation an op runs. ``AUTO`` resolves per call from the input's device."""

    AUTO = "auto"
    REFERENCE = "reference"
    CPP = "cpp"
    TRITON = "triton"
    CUDA = "cuda"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run this input (never silently downgraded)."""


# AUTO preference per device type; devices not listed run the reference.
_AUTO_ORDER: dict[str, tuple[Backend, ...]] = {
    "cuda": (Backend.CUDA, Backend.TRITON, Backend.REFERENCE),
    "cpu": (Backend.CPP, Backend.REFERENCE),
}

# A probe answers "can this backend run on this device type?": None if yes, else the reason.
Probe = Callable[[str], "str | None"]
# A support check answers the same for one concrete call's arguments (strides, shapes, ...).
SupportCheck = Callable[..., "str | None"]

#: The dtypes every kernel backend takes for an op's first argument (the activation / query);
#: the pure-torch reference takes any floating dtype.
KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)


def _dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class BackendImpl:
    """One backend of one op.

    ``fn`` takes the op's positional arguments (already validated). ``probe(device_type)`` is run
    once per device type and cached. On every call :func:`kernel_call_check` first checks the
    first argument's dtype against ``dtypes`` and that no input requires grad, then
    ``supports(*args)`` (optional, op-specific) runs; both must be cheap.
    """

    fn: Callable[..., Any]
    probe: Probe
    supports: SupportCheck | None = None
    dtypes: tuple[torch.dtype, ...] = KERNEL_DTYPES


def kernel_call_check(impl: BackendImpl, args: tuple) -> str | None:
    """Why the kernel ``impl`` cannot run this call (``None``: it can): the first argument's
    dtype, autograd, then the backend's own ``supports``."""
    x = args[0]
    if x.dtype not in impl.dtypes:
        return f"dtype {x.dtype} unsupported (kernels take {_dtype_names(impl.dtypes)})"
    if torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in args
    ):
        return "autograd needed (inputs require grad) and the kernels are inference-only"
    return None if impl.supports is None else impl.supports(*args)


@dataclass
class _OpEntry:
    name: str
    impls: dict[Backend, BackendImpl]
    probe_cache: dict[tuple[Backend, str], str | None] = field(default_factory=dict)
    ran: dict[str, int] = field(default_factory=dict)
    # (device, skipped backends -> reasons, chosen) -> count; the key is also the warn-once key.
    fallbacks: dict[tuple[str, tuple[tuple[str, str], ...], str], int] = field(default_factory=dict)


_OPS: dict[str, _OpEntry] = {}
_LOCK = threading.Lock()
_log = logging.getLogger(__name__)
_default_backend: Backend = Backend.AUTO


def parse_backend(value: Backend | str | None, arg: str = "backend") -> Backend:
    """Normalize an enum member or its string value (case-insensitive); ``None`` -> ``AUTO``."""
    if value is None:
        return Backend.AUTO
    if isinstance(value, Backend):
        return value
    if isinstance(value, str):
        try:
            return Backend(value.strip().lower())
        except ValueError:
            pass
    accepted = ", ".join(repr(b.value) for b in Backend)
    raise ValueError(f"{arg}={value!r} is not a backend; accepted values: {accepted}")


def set_backend(backend: Backend | str) -> Backend:
    """Set the process-wide default backend; returns the previous one."""
    global _default_backend
    new = parse_backend(backend, "backend")
    old, _default_backend = _default_backend, new
    return old


def get_backend() -> Backend:
    """The process-wide default backend."""
    return _default_backend


@contextlib.contextmanager
def use_backend(backend: Backend | str) -> Iterator[Backend]:
    """Temporarily set the process-wide default backend; restores the previous one on exit.

    The default is process-wide (not thread-local), so don't interleave this across threads.
    """
    old = set_backend(backend)
    try:
        yield _default_backend
    finally:
        set_backend(old)


def register_op(
    name: str, reference: Callable[..., Any], impls: dict[Backend, BackendImpl]
) -> None:
    """Register an op: its reference (always available) and kernel backends."""
    if name in _OPS:
        raise ValueError(f"op {name!r} is already registered")
    if Backend.AUTO in impls or Backend.REFERENCE in impls:
        raise ValueError("impls must not contain AUTO or REFERENCE; pass the reference separately")
    table = {Backend.REFERENCE: BackendImpl(fn=reference, probe=lambda _dev: None)}
    table.update(impls)
    _OPS[name] = _OpEntry(name=name, impls=table)


def _entry(op: str) -> _OpEntry:
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown op {op!r}; registered: {sorted(_OPS)}") from None


def _probe(entry: _OpEntry, backend: Backend, device_type: str) -> str | None:
    key = (backend, device_type)
    if key not in entry.probe_cache:
        impl = entry.impls.get(backend)
        if impl is None:
            reason: str | None = f"op {entry.name!r} has no {backend.value} implementation"
        else:
            try:
                reason = impl.probe(device_type)
            except Exception as e:  # a broken probe means unavailable, not a crash at call time
                reason = f"probe raised {type(e).__name__}: {e}"
        with _LOCK:
            entry.probe_cache.setdefault(key, reason)
    return entry.probe_cache[key]


def prime_probes(device_type: str) -> None:
    """Run (and cache) every registered op's backend probes for ``device_type`` now.

    A probe may build or load an extension under a lock; inside ``torch.compile`` tracing that
    cannot run (dynamo refuses the lock), so code that compiles ops calls this first.
    """
    for entry in list(_OPS.values()):
        for backend in entry.impls:
            _probe(entry, backend, device_type)


def _why_not(entry: _OpEntry, backend: Backend, device_type: str, args: tuple) -> str | None:
    reason = _probe(entry, backend, device_type)
    if reason is None and backend is not Backend.REFERENCE:
        reason = kernel_call_check(entry.impls[backend], args)
    return reason


def _compiling() -> bool:
    # Dynamo traces the selection once; counters and warnings belong to eager calls only.
    return torch.compiler.is_compiling()


def select_backend(
    op: str, device: torch.device, args: tuple, backend: Backend | str | None = None
) -> tuple[Backend, Callable[..., Any]]:
    """Resolve which backend runs ``op`` for this call; returns ``(backend, fn)``.

    ``args`` are the op's positional arguments, passed to each backend's ``supports`` check.
    """
    entry = _entry(op)
    requested = _default_backend if backend is None else parse_backend(backend)
    dev = device.type
    if requested is not Backend.AUTO:
        reason = _why_not(entry, requested, dev, args)
        if reason is not None:
            ok = [b.value for b in entry.impls if _why_not(entry, b, dev, args) is None]
            raise BackendUnavailableError(
                f"{op}: backend {requested.value!r} is unavailable for this {dev} input: "
                f"{reason}. Backends that can run it: {ok}"
            )
        chosen = requested
    else:
        skipped: list[tuple[str, str]] = []
        chosen = Backend.REFERENCE
        for cand in _AUTO_ORDER.get(dev, (Backend.REFERENCE,)):
            if cand not in entry.impls:
                continue  # the op simply has no such kernel: not a fallback
            reason = _why_not(entry, cand, dev, args)
            if reason is None:
                chosen = cand
                break
            skipped.append((cand.value, reason))
        if skipped and not _compiling():
            _record_fallback(entry, dev, tuple(skipped), chosen)
    if not _compiling():
        with _LOCK:
            entry.ran[chosen.value] = entry.ran.get(chosen.value, 0) + 1
    return chosen, entry.impls[chosen].fn


def _record_fallback(
    entry: _OpEntry, dev: str, skipped: tuple[tuple[str, str], ...], chosen: Backend
) -> None:
    key = (dev, skipped, chosen.value)
    with _LOCK:
        first = key not in entry.fallbacks
        entry.fallbacks[key] = entry.fallbacks.get(key, 0) + 1
    if first:
        why = "; ".join(f"{b}: {r}" for b, r in skipped)
        _log.warning(
            "infopt.ops.%s: backend=auto on %s fell back to %r (%s). This message is shown "
            "once; see infopt.ops.backend_report().", entry.name, dev, chosen.value, why,
        )


def reset_backend_stats() -> None:
    """Forget run counts and recorded fallbacks (so fallback messages can fire again)."""
    with _LOCK:
        for entry in _OPS.values():
            entry.ran.clear()
            entry.fallbacks.clear()


def _report_devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def backend_report(probe: bool = True) -> dict[str, dict[str, Any]]:
    """Per-op availability and usage.

    Returns ``{op: {"available": [...], "unavailable": {backend: reason}, "by_device": {dev:
    {"available": [...], "unavailable": {...}}}, "ran": {backend: count}, "fallbacks": [...]}}``.
    A backend is "available" if it can run on at least one device type present here (``cpu``,
    plus ``cuda`` when a GPU is visible). ``probe=True`` runs probes not yet run, which may build
    the C++/CUDA extensions; ``probe=False`` reports un-probed backends as ``"not probed yet"``.
    """
    report: dict[str, dict[str, Any]] = {}
    for name, entry in sorted(_OPS.items()):
        by_device: dict[str, dict[str, Any]] = {}
        for dev in _report_devices():
            avail, unavail = [], {}
            for b in entry.impls:
                if probe or (b, dev) in entry.probe_cache:
                    reason = _probe(entry, b, dev)
                else:
                    reason = "not probed yet"
                if reason is None:
                    avail.append(b.value)
                else:
                    unavail[b.value] = reason
            by_device[dev] = {"available": avail, "unavailable": unavail}
        available = [
            b.value
            for b in entry.impls
            if any(b.value in d["available"] for d in by_device.values())
        ]
        unavailable = {
            b.value: "; ".join(
                f"{dev}: {d['unavailable'][b.value]}" for dev, d in by_device.items()
            )
            for b in entry.impls
            if b.value not in available
        }
        fallbacks = [
            {"device": dev, "ran": chosen, "skipped": dict(skipped), "count": n}
            for (dev, skipped, chosen), n in entry.fallbacks.items()
        ]
        report[name] = {
            "available": available,
            "unavailable": unavailable,
            "by_device": by_device,
            "ran": dict(entry.ran),
            "fallbacks": fallbacks,
        }
    return report


def format_backend_report(probe: bool = True) -> str:
    """Human-readable :func:`backend_report`."""
    lines = [f"infopt.ops backends (default: {_default_backend.value})"]
    for name, rep in backend_report(probe).items():
        lines.append(f"{name}:")
        for dev, d in rep["by_device"].items():
            lines.append(f"  [{dev}] available: {', '.join(d['available']) or '-'}")
            for b, reason in d["unavailable"].items():
                lines.append(f"  [{dev}] unavailable {b}: {reason}")
        ran = ", ".join(f"{b}={n}" for b, n in rep["ran"].items()) or "-"
        lines.append(f"  ran: {ran}")
        for fb in rep["fallbacks"]:
            why = "; ".join(f"{b}: {r}" for b, r in fb["skipped"].items())
            lines.append(f"  fallback [{fb['device']}] -> {fb['ran']} x{fb['count']} ({why})")
    return "\n".join(lines)

"""``@triton.jit`` kernels only; their launchers live beside each op in ``infopt/ops/<op>.py``.

Imported lazily (never from ``infopt/ops/__init__``): ``TRITON_INTERPRET`` is read when a kernel
is decorated, so it must be set before the first import of a module in this package.
"""

"""infopt: composable LLM inference-optimization primitives over PyTorch.

    >>> import infopt
    >>> model, tok = infopt.load_model()            # embedded SmolLM2-135M-Instruct
    >>> model = infopt.wrap_model(model)            # options: see infopt.accepted_options()

Submodules (``ops``, ``eval``, ``bench``, ``models``) import lazily so ``import infopt`` stays
cheap and so the Triton interpreter switch (``TRITON_INTERPRET``) can be set before Triton loads.
"""

from __future__ import annotations

import importlib
from typing import Any

from .api import accepted_options, applied_configs, register_handler, register_option, wrap_model
from .config import InfoptConfig, register_config
from .logs import set_progress

__version__ = "0.1.0"

__all__ = [
    "InfoptConfig",
    "__version__",
    "accepted_options",
    "applied_configs",
    "load_model",
    "load_quantized",
    "save_quantized",
    "set_progress",
    "register_config",
    "register_handler",
    "register_option",
    "wrap_model",
]

_LAZY_SUBMODULES = {
    "ops", "eval", "bench", "models", "cli", "module_walk", "quant", "kvcache", "speculative",
}


def load_model(*args: Any, **kwargs: Any):
    """``load_model(name_or_path="smollm2-135m", dtype=torch.float32) -> (model, tokenizer)``.

    See :func:`infopt.models.load_model`.
    """
    from .models import load_model as _load_model

    return _load_model(*args, **kwargs)


def save_quantized(*args: Any, **kwargs: Any):
    """Save a quantized model as safetensors + config. See :func:`infopt.quant.save_quantized`."""
    from .quant import save_quantized as _save

    return _save(*args, **kwargs)


def load_quantized(*args: Any, **kwargs: Any):
    """Load what :func:`save_quantized` wrote. See :func:`infopt.quant.load_quantized`."""
    from .quant import load_quantized as _load

    return _load(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'infopt' has no attribute {name!r}")

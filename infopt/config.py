"""Versioned, serializable configuration dataclasses.

Every optimization that ``wrap_model`` can apply is described by a frozen dataclass that
subclasses :class:`InfoptConfig`. Configs carry a ``version`` so that a saved model records
exactly which semantics produced it, and round-trip through plain dicts (``to_dict`` /
``from_dict``) so they can live in JSON or safetensors metadata.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, TypeVar

T = TypeVar("T", bound="InfoptConfig")

# type name -> class; filled by ``@register_config`` so ``from_dict`` can rebuild any config.
_CONFIG_TYPES: dict[str, type[InfoptConfig]] = {}


@dataclasses.dataclass(frozen=True)
class InfoptConfig:
    """Base class. Subclasses set ``VERSION`` and are decorated with ``@register_config``."""

    VERSION: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict: ``{"type": ..., "version": ..., "fields": {...}}``."""
        fields = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, InfoptConfig):  # nested config (e.g. a draft model's quant)
                v = v.to_dict()
            elif isinstance(v, enum.Enum):
                v = v.value
            elif isinstance(v, tuple):
                v = list(v)
            fields[f.name] = v
        return {"type": type(self).__name__, "version": self.VERSION, "fields": fields}

    @classmethod
    def _upgrade_fields(cls, version: int, fields: dict[str, Any]) -> dict[str, Any]:
        """Turn the fields of a saved ``version`` (< ``VERSION``) dict into current ones.

        Subclasses override this when a version drops or renames a field; the default keeps
        them as they are (new fields take their defaults).
        """
        return fields

    @classmethod
    def from_dict(cls: type[T], d: dict[str, Any]) -> T:
        """Inverse of :meth:`to_dict`. Called on the base class it dispatches on ``d["type"]``."""
        if not isinstance(d, dict) or "type" not in d or "fields" not in d:
            raise ValueError(f"config dict must have 'type' and 'fields' keys, got {d!r}")
        target = _CONFIG_TYPES.get(d["type"])
        if target is None:
            raise ValueError(
                f"unknown config type {d['type']!r}; registered: {sorted(_CONFIG_TYPES)}"
            )
        if cls is not InfoptConfig and not issubclass(target, cls):
            raise ValueError(f"config type {d['type']!r} is not a {cls.__name__}")
        version = d.get("version", target.VERSION)
        if version > target.VERSION:
            raise ValueError(
                f"{d['type']} version {version} is newer than this infopt supports "
                f"({target.VERSION}); upgrade infopt"
            )
        fields = dict(d["fields"])
        if version < target.VERSION:
            fields = target._upgrade_fields(version, fields)
        known = {f.name: f for f in dataclasses.fields(target)}
        unknown = set(fields) - set(known)
        if unknown:
            raise ValueError(
                f"{d['type']}: unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )
        kwargs = {}
        for name, v in fields.items():
            # to_dict turned tuples into lists for JSON; configs are frozen, so turn them back.
            if isinstance(v, dict) and {"type", "fields"} <= set(v):
                v = InfoptConfig.from_dict(v)
            kwargs[name] = tuple(v) if isinstance(v, list) else v
        return target(**kwargs)  # type: ignore[return-value]


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` reconstructible by ``InfoptConfig.from_dict``."""
    name = cls.__name__
    if name in _CONFIG_TYPES and _CONFIG_TYPES[name] is not cls:
        raise ValueError(f"config type name {name!r} registered twice")
    _CONFIG_TYPES[name] = cls
    return cls

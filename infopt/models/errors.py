"""Exceptions of the embedded-model subsystem."""

from __future__ import annotations

__all__ = ["ModelFetchError"]


class ModelFetchError(RuntimeError):
    """A model could not be obtained: download failed, checksum mismatch, or hub unreachable.

    The message always names what failed and how to retry.
    """

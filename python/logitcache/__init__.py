"""logitcache: offline knowledge distillation stores and losses for language models."""

from logitcache._core import __version__

__all__ = ["__version__"]

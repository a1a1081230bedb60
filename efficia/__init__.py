"""efficia: small, efficient, causal language models on Lightning + Hydra."""

from efficia import config  # noqa: F401  (registers the yaml resolvers before any config is resolved)
from efficia.checkpoint import LoadedModel, load
from efficia.errors import EfficiaError

__all__ = ["EfficiaError", "LoadedModel", "load"]

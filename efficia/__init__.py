"""efficia: small, efficient, causal language models on Lightning + Hydra."""

from efficia import config  # noqa: F401  (registers the ${efficia.*} resolvers conf/ uses)
from efficia.errors import EfficiaError
from efficia.inference.loading import LoadedModel, load
from efficia.inference.pretrained import from_pretrained, save_pretrained

__all__ = ["EfficiaError", "LoadedModel", "from_pretrained", "load", "save_pretrained"]

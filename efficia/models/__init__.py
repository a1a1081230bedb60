"""Every architecture, registered by name. Importing this package registers them all."""

from efficia.models import (
    efficia,  # noqa: F401  (registers "efficia")
    efficientlm,  # noqa: F401  (registers "efficientlm")
    gpt,  # noqa: F401  (registers "gpt")
    lumenspark,  # noqa: F401  (registers "lumenspark")
    optimus,  # noqa: F401  (registers "optimus")
    yinggem,  # noqa: F401  (registers "yinggem")
)
from efficia.models.decoder import Cache, DecoderLM, LanguageModel, Mixer, Step
from efficia.models.registry import MODELS, build_model, register

__all__ = ["MODELS", "Cache", "DecoderLM", "LanguageModel", "Mixer", "Step", "build_model", "register"]

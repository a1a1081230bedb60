"""Models: the contract every architecture keeps (`decoder`), the pieces they share (`layers` for norms, RoPE and
feed-forwards, `kernels` for attention, `construction` for checks, init and renames, `attention` and `latent` for
shared mixers, `output` for the head + loss), one file per architecture, and the `registry` of names. Importing
this package registers them all. It imports nothing from the rest of efficia but `efficia.errors`; build a model
with `efficia.build.build_model`."""

from efficia.models import (
    efficia,  # noqa: F401  (registers "efficia")
    efficientlm,  # noqa: F401  (registers "efficientlm")
    gpt,  # noqa: F401  (registers "gpt")
    lumenspark,  # noqa: F401  (registers "lumenspark")
    optimus,  # noqa: F401  (registers "optimus")
    yinggem,  # noqa: F401  (registers "yinggem")
)
from efficia.models.decoder import Cache, DecoderLM, LanguageModel, Mixer, Step
from efficia.models.registry import MODELS, register

__all__ = ["MODELS", "Cache", "DecoderLM", "LanguageModel", "Mixer", "Step", "register"]

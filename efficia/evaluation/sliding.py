"""Loss of a token sequence longer than the model's context: the sliding-window method of Hugging Face's
perplexity guide. Windows of `window` tokens start every `stride` tokens (the last one ends at the last token);
each window scores only the targets the previous windows did not, so every token from the second on is scored
exactly once, with at least `window - stride` tokens of context once the first window is passed. stride =
window: disjoint windows (fastest, least context); stride = 1: every token sees a full window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from efficia.errors import ConfigError
from efficia.models.decoder import LanguageModel


def window_starts(n_targets: int, window: int, stride: int) -> list[int]:
    """Starts of the windows over inputs 0..n_targets-1 (targets 1..n_targets): every `stride`, the last one
    moved back so that it ends at the last target."""
    if n_targets <= window:
        return [0]
    last = n_targets - window
    return [*range(0, last, stride), last]


@torch.no_grad()
def token_nats(net: LanguageModel, ids: Tensor, window: int, stride: int, batch_size: int = 8) -> Tensor:
    """Nats of every token of `ids` [N] but the first, as predicted from its window's context: [N - 1]."""
    if not 1 <= stride <= window:
        raise ConfigError(f"stride={stride}: give a whole number of tokens between 1 and window={window}")
    if ids.numel() < 2:
        raise ConfigError("the text is shorter than two tokens: nothing to predict")
    n_targets = ids.numel() - 1
    length = min(window, n_targets)
    starts = window_starts(n_targets, window, stride)
    nats = torch.empty(n_targets, dtype=torch.float32)
    scored = 0  # targets 0..scored-1 (token positions 1..scored) are done
    for i in range(0, len(starts), batch_size):
        batch = starts[i:i + batch_size]
        x = torch.stack([ids[s:s + length] for s in batch]).to(net.device)
        y = torch.stack([ids[s + 1:s + 1 + length] for s in batch]).to(net.device)
        losses = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten(), reduction="none").view(len(batch), -1)
        for s, row in zip(batch, losses.cpu(), strict=True):
            new = scored - s  # this window's first target not scored yet
            nats[scored:s + length] = row[new:]
            scored = s + length
    return nats

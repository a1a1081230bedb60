"""The lm-evaluation-harness model `efficia`: every architecture, including those transformers cannot load, on the
harness's tasks. `pip install -e '.[eval]'`, then

    python -m efficia.harness --model efficia --model_args ckpt=<.ckpt or folder> --tasks <tasks>

(the harness's own `lm_eval` command with this model registered: lm-eval 0.4 discovers only the models it ships,
so importing this module is what registers `efficia`; from Python, `import efficia.evaluation.harness` and then
`lm_eval.simple_evaluate(model="efficia", model_args="ckpt=...")`).

- loglikelihood: log p(continuation | context), context and continuation tokenized together as the harness's own
  transformers model does (a word's leading space stays with it); the context is cut from the left to fit the
  model's context; an empty context starts from the end-of-text token.
- loglikelihood_rolling: a whole text after end-of-text, in disjoint windows of the model's context
  (efficia/evaluation/sliding.py).
- generate_until: greedy (or sampled with do_sample/temperature) on efficia's cached decoding, stopped at the
  first of `until`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from efficia.errors import ConfigError
from efficia.evaluation.sliding import token_nats
from efficia.inference.generate import generate_tokens
from efficia.inference.loading import pick_device
from efficia.inference.pretrained import load_any


@register_model("efficia")
class EfficiaLM(LM):
    def __init__(self, ckpt: str, device: str = "auto", batch_size: int | str = 8, **_: Any) -> None:
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            print(f"efficia: the harness asks for device={device} and there is no CUDA device; running on the CPU")
            device = "cpu"
        self.model = load_any(str(ckpt), device=str(pick_device(str(device))))
        self.net, self.tokenizer = self.model.net, self.model.tokenizer
        self.batch = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.context = self.net.max_seq_len

    # -- tokens ------------------------------------------------------------------------------------------------
    def start(self) -> list[int]:
        """What an empty context is: the end-of-text token (a char vocabulary has none)."""
        if self.tokenizer.eot is None:
            raise ConfigError(f"a request with an empty context needs an end-of-text token, and tokenizer "
                              f"{self.tokenizer.name} has none; use a task that gives every request a context")
        return [self.tokenizer.eot]

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, tokenized together (trailing spaces of the context move to the
        continuation, as the harness's transformers model does)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return self.start(), self.tokenizer.encode(continuation)
        whole, head = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return head, whole[len(head):]

    # -- the harness's three requests -----------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.pair(*r.args) for r in requests]
        out: list[tuple[float, bool]] = []
        for i in range(0, len(pairs), self.batch):
            out += self.score(pairs[i:i + self.batch])
        return out

    def score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One batch, right-padded: a causal model's logits at a position never see the padding after it."""
        rows = []
        for context, continuation in pairs:
            if not continuation or len(continuation) > self.context:
                raise ConfigError(f"a continuation of {len(continuation)} tokens: it must hold 1 to the model's "
                                  f"context of {self.context} tokens")
            rows.append((context + continuation)[-(self.context + 1):-1])
        width = max(len(r) for r in rows)
        x = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            x[i, :len(r)] = torch.tensor(r)
        logprobs = F.log_softmax(self.net.eval()(x.to(self.net.device)).float(), -1).cpu()
        out = []
        for i, (row, (_, continuation)) in enumerate(zip(rows, pairs, strict=True)):
            scored = logprobs[i, len(row) - len(continuation):len(row)]
            target = torch.tensor(continuation)
            out.append((scored.gather(1, target[:, None]).sum().item(), bool((scored.argmax(-1) == target).all())))
        return out

    @torch.no_grad()
    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in (r.args for r in requests):
            ids = torch.tensor(self.start() + self.tokenizer.encode(text))
            out.append(-token_nats(self.net.eval(), ids, self.context, self.context, self.batch).double().sum().item())
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, options in (r.args for r in requests):
            options = dict(options or {})
            until = options.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(options.get("temperature", 0.0)) if options.get("do_sample") else 0.0
            ids = self.tokenizer.encode(context) if context else self.start()
            prompt = torch.tensor([ids], device=self.net.device)
            text, new = "", []
            for token in generate_tokens(self.net, prompt, int(options.get("max_gen_toks", 256)),
                                         temperature=temperature):
                new.append(int(token[0]))
                text = self.tokenizer.decode(new)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            out.append(text)
        return out

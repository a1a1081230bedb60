"""The preset's choice: the micro-batch, accumulation and step time a GPU preset would run, from measured steps.

The fit rule is the preset's (efficia/training/hardware.py): halve the micro-batch from data.batch_size until
the step fits, then accumulate so that micro-batch x accumulation == data.batch_size. "Fits" here means the step's
peak (measured: efficia/plan/measure.py) within the cap less the preset's headroom, less the CUDA context
(CUDA_CONTEXT_GB), which on a real card lives outside PyTorch's allocator. Step time: FLOPs per token counted on
the meta device (efficia/training/throughput.py, with the recomputation that gradient checkpointing adds) over the
card's datasheet peak at an assumed MFU.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from efficia.errors import ConfigError
from efficia.plan.measure import Memory, measure_states, measure_step, measure_validation
from efficia.training.hardware import check_budget, plan_accumulation, search_micro_batch

CUDA_CONTEXT_GB = 0.5  # CUDA context + cuBLAS workspace + kernel images: about 0.3-0.5 GiB on Ampere/Ada
ASSUMED_MFU = 0.30     # eager PyTorch on small models; bench/gpu_check.py measures the real figure
GIB = 2**30


@dataclass(frozen=True)
class Choice:
    """What the preset would run for one gradient-checkpointing setting."""

    checkpointing: bool
    micro_batch: int | None  # None: even a micro-batch of 1 does not fit
    accumulate: int | None
    memory: Memory           # at micro_batch (at 1 when nothing fits; the model states alone when over at once)
    flops_per_token: float | None  # forward + backward (+ recomputation), counted on the meta device (None: not run)
    step_run: bool = True    # False: parameters, gradients and optimizer state alone were over, no step was run


@dataclass(frozen=True)
class Plan:
    card: str                # the preset's card, as in efficia.training.throughput.GPU_PEAK_TFLOPS
    memory_gb: float         # the preset's cap
    headroom: float          # the share of the cap the preset keeps free
    context_gb: float        # the CUDA context's share of a real card
    precision: str
    optimizer: str
    model: str
    params: int
    vocab_size: int
    seq_len: int
    batch_size: int
    budget: int              # bytes a step may peak at: cap x (1 - headroom) - context
    peak_flops: float        # datasheet FLOP/s of the card in the compute dtype
    compute_dtype: str
    mfu: float
    configured: Choice       # model.gradient_checkpointing as configured
    other: Choice | None     # the other setting (None: the model has no gradient_checkpointing key)
    val_batch_size: int
    validation: Memory       # one validation batch at val_batch_size
    val_fits: int | None     # the largest val_batch_size, halving, that fits (None: not even 1)

    @property
    def choices(self) -> list[Choice]:
        return [self.configured] + ([self.other] if self.other else [])

    @property
    def fits(self) -> bool:
        return self.configured.micro_batch is not None and self.val_fits == self.val_batch_size

    def step_seconds(self, choice: Choice) -> float | None:
        if choice.flops_per_token is None:
            return None
        return choice.flops_per_token * self.batch_size * self.seq_len / (self.peak_flops * self.mfu)

    def tokens_per_second(self, choice: Choice) -> float | None:
        time = self.step_seconds(choice)
        return None if time is None else self.batch_size * self.seq_len / time


@functools.lru_cache(maxsize=256)
def _measure_cached(key: str, micro_batch: int, micro_batches: int) -> Memory:
    cfg, tokenizer_state = json.loads(key)
    return measure_step(cfg, tokenizer_state, micro_batch, micro_batches)


def step_memory(cfg: dict[str, Any], tokenizer_state: dict[str, Any], micro_batch: int) -> Memory:
    """Peak memory of one optimizer step at this micro-batch: alone when it is the whole batch, else with the
    gradients of earlier micro-batches alive. Cached: presets that differ only in their cap share measurements."""
    micro_batches = 1 if micro_batch == cfg["data"]["batch_size"] else 2
    return _measure_cached(run_key(cfg, tokenizer_state), micro_batch, micro_batches)


def run_key(cfg: dict[str, Any], tokenizer_state: dict[str, Any]) -> str:
    """What a measurement depends on: everything but the preset's cap and where the run would write."""
    steady = {k: v for k, v in cfg.items() if k not in ("callbacks", "output_dir", "run_name")}
    return json.dumps([steady, tokenizer_state], sort_keys=True)


@functools.lru_cache(maxsize=256)
def _validation_cached(key: str, batch_size: int) -> Memory:
    cfg, tokenizer_state = json.loads(key)
    return measure_validation(cfg, tokenizer_state, batch_size)


def val_batch_size(cfg: dict[str, Any]) -> int:
    """A data module without its own validation batch size validates at its training one."""
    return cfg["data"].get("val_batch_size") or cfg["data"]["batch_size"]


def validation_batch(cfg: dict[str, Any], tokenizer_state: dict[str, Any], budget: int) -> tuple[int | None, Memory]:
    """(the largest of val_batch_size, /2, ... 1 whose validation batch fits, the memory at val_batch_size)."""
    key = run_key(cfg, tokenizer_state)
    size = val_batch_size(cfg)
    found = search_micro_batch(size, lambda b: _validation_cached(key, b).peak <= budget)
    return found, _validation_cached(key, size)


def choose(cfg: dict[str, Any], tokenizer_state: dict[str, Any], vocab_size: int, budget: int,
           states: Memory) -> Choice:
    """The preset's search (training/hardware.py): the largest of batch, batch/2, ... 1 whose step fits, then the
    largest divisor of the batch at most that, and the accumulation that keeps data.batch_size. `states`: the
    parameters, gradients and optimizer state every step holds; over the budget, no step is run (a model far
    over any card would take minutes of fake-tensor work to be refused)."""
    batch_size, seq_len = cfg["data"]["batch_size"], cfg["data"]["seq_len"]
    if states.peak > budget:
        return Choice(bool(cfg["model"].get("gradient_checkpointing")), None, None, states, None, step_run=False)
    from efficia.training.throughput import cached_flops_per_token

    flops = cached_flops_per_token(json.dumps(cfg["model"], sort_keys=True), vocab_size, seq_len)

    def fits(micro_batch: int) -> bool:
        return step_memory(cfg, tokenizer_state, micro_batch).peak <= budget

    # memory grows with the micro-batch: when the whole batch does not fit, try 1 before the halving
    hopeless = not fits(batch_size) and not fits(1)
    found = None if hopeless else search_micro_batch(batch_size, fits)
    micro, accumulate = plan_accumulation(batch_size, found) if found else (None, None)
    return Choice(bool(cfg["model"].get("gradient_checkpointing")), micro, accumulate,
                  step_memory(cfg, tokenizer_state, micro or 1), flops)


def tokenizer_state(cfg: DictConfig, plain: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer training would build: a char vocabulary comes from the corpus (read as training reads it),
    token ids (data=mqar) from the data's vocabulary size, the others need no data."""
    from hydra.utils import instantiate

    from efficia.checks import config_errors
    from efficia.data.tokenizers import build_tokenizer

    if plain["tokenizer"].get("kind") == "char":
        with config_errors("data"):
            datamodule = instantiate(cfg.data, tokenizer=plain["tokenizer"])
        datamodule.prepare()
        return datamodule.tokenizer.state()
    return build_tokenizer(plain["tokenizer"], vocab_size=plain["data"].get("vocab_size")).state()


def check_plan_options(mfu: float, context_gb: float) -> None:
    """The command's own numbers, before any planning: a fraction in (0, 1] and a context of no negative size."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu={mfu:g}: give the assumed model FLOPs utilisation as a fraction in (0, 1]")
    if context_gb < 0:
        raise ConfigError(f"context_gb={context_gb:g}: the CUDA context takes memory, it cannot give any; give "
                          f"GiB >= 0 (default {CUDA_CONTEXT_GB})")


def plan_run(cfg: DictConfig, mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> Plan:
    """The plan for one composed run config that has a GPU preset (callbacks.gpu_budget)."""
    from efficia.build import build_model
    from efficia.checks import check_fits, check_run_config, config_errors
    from efficia.data.tokenizers import tokenizer_from_state
    from efficia.training.module import TrainingModule
    from efficia.training.throughput import compute_dtype, gpu_peak

    with config_errors("config"):
        plain = OmegaConf.to_container(cfg, resolve=True)
    check_run_config(plain)
    check_fits(plain, TrainingModule.LOGGED)
    preset = (plain.get("callbacks") or {}).get("gpu_budget")
    if not preset:
        raise ConfigError("this run has no GPU preset to plan for; add trainer=rtx3060 or trainer=rtx4090")
    check_plan_options(mfu, context_gb)
    state = tokenizer_state(cfg, plain)
    vocab_size = tokenizer_from_state(state).vocab_size
    with config_errors("model"):
        params = build_model(plain["model"], vocab_size, device="meta").num_params()
    dtype = compute_dtype(plain["trainer"]["precision"], "cuda")
    peak = gpu_peak(preset["card"], dtype)
    if peak is None:
        raise ConfigError(f"callbacks.gpu_budget.card={preset['card']!r} is not in "
                          "efficia.training.throughput.GPU_PEAK_TFLOPS; "
                          "add its datasheet figures there")
    check_budget(preset["memory_gb"], preset["headroom"])
    usable = preset["memory_gb"] * (1 - preset["headroom"])
    if context_gb >= usable:
        raise ConfigError(f"context_gb={context_gb:g} leaves nothing of the {preset['card']} preset's "
                          f"{preset['memory_gb']:g} GB less its {preset['headroom']:.0%} headroom ({usable:.2f} GiB); "
                          f"give context_gb= in [0, {usable:.2f}) (default {CUDA_CONTEXT_GB})")
    budget = int(usable * GIB - context_gb * GIB)
    with config_errors("model"):
        states = measure_states(plain, state)
    choices = []
    settings = [plain["model"]["gradient_checkpointing"]] if "gradient_checkpointing" in plain["model"] else [None]
    if settings[0] is not None:
        settings.append(not settings[0])
    for checkpointing in settings:
        run = plain if checkpointing is None else {**plain, "model": {**plain["model"],
                                                                       "gradient_checkpointing": checkpointing}}
        with config_errors("model"):
            choices.append(choose(run, state, vocab_size, budget, states))
    if states.parameters + states.optimizer > budget:  # no gradients in validation, but still over: not run
        val_fits, validation = None, Memory(states.parameters, 0, states.optimizer, 0, 0)
    else:
        with config_errors("model"):
            val_fits, validation = validation_batch(plain, state, budget)
    return Plan(card=preset["card"], memory_gb=preset["memory_gb"], headroom=preset["headroom"],
                context_gb=context_gb, precision=str(plain["trainer"]["precision"]),
                optimizer=plain["optimizer"]["_target_"].rsplit(".", 1)[-1], model=plain["model"]["name"],
                params=params, vocab_size=vocab_size, seq_len=plain["data"]["seq_len"],
                batch_size=plain["data"]["batch_size"], budget=budget, peak_flops=peak, compute_dtype=dtype, mfu=mfu,
                configured=choices[0], other=choices[1] if len(choices) > 1 else None,
                val_batch_size=val_batch_size(plain), validation=validation, val_fits=val_fits)

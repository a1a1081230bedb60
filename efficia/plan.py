"""Plan a GPU run from a CPU: memory by part, the micro-batch a GPU preset would choose, and the step time.

    python -m efficia.plan <train.py overrides>         e.g. experiment=yinggem_shakespeare trainer=rtx3060
    python train.py <overrides> plan=true               the same function, through train.py
    python -m efficia.plan --table [docs/gpu-plan.md]   every seed recipe on both presets (markdown)

Memory is measured, not guessed: one training step of the real LanguageModule (forward and loss as training
computes them, backward, gradient clipping, optimizer step) runs on fake tensors (torch's FakeTensorMode: shapes
and dtypes, no storage, no CUDA) under the preset's precision, and torch's MemTracker follows every tensor that
lives during it. The parts at the step's peak add up to the peak: parameters (and buffers), gradients, optimizer
state, activations saved for backward, and the transient (what backward or the optimizer holds briefly: the
gradient of the logits, the foreach optimizer's temporaries). Whatever a model or the loss does (a fused loss,
a chunked mixer), the plan sees it, because it runs it.

The fit rule is the preset's (efficia/hardware.py): halve the micro-batch from data.batch_size until the step
fits, then accumulate so that micro-batch x accumulation == data.batch_size. "Fits" here means the step's peak
within the cap less the preset's headroom, less the CUDA context (CUDA_CONTEXT_GB), which on a real card lives
outside PyTorch's allocator. Step time: FLOPs per token counted on the meta device (efficia/throughput.py, with
the recomputation that gradient checkpointing adds) over the card's datasheet peak at an assumed MFU.

What the CPU cannot show: on CUDA the sliding-window model runs FlexAttention, which saves less than the
chunked path measured here (the plan is conservative for it); allocator fragmentation is the headroom's job.
Attention dropout is measured as CUDA's fused SDPA runs it (`fused_dropout_sdpa`), not as the CPU's math path.
bench/gpu_check.py prints a real card's peak next to the plan.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from efficia.config import CONF_DIR, compose_run
from efficia.errors import ConfigError
from efficia.hardware import plan_accumulation, search_micro_batch

CUDA_CONTEXT_GB = 0.5  # CUDA context + cuBLAS workspace + kernel images: about 0.3-0.5 GiB on Ampere/Ada
ASSUMED_MFU = 0.30     # eager PyTorch on small models; bench/gpu_check.py measures the real figure
GIB = 2**30
PARTS = ("parameters", "gradients", "optimizer", "activations", "transient")


@dataclass(frozen=True)
class Memory:
    """Bytes at the peak of one training step, by part; the parts add up to `peak`."""

    parameters: int   # parameters and buffers, in the precision's parameter dtype
    gradients: int    # parameter gradients alive at the peak (all of them while accumulating)
    optimizer: int    # optimizer state (AdamW: two moments; Adafactor: row and column factors)
    activations: int  # tensors the forward saved for backward, still alive at the peak
    transient: int    # backward's and the optimizer's temporaries at the peak (e.g. the logits' gradient)

    @property
    def peak(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


@dataclass(frozen=True)
class Choice:
    """What the preset would run for one gradient-checkpointing setting."""

    checkpointing: bool
    micro_batch: int | None  # None: even a micro-batch of 1 does not fit
    accumulate: int | None
    memory: Memory           # at micro_batch (at 1 when nothing fits)
    flops_per_token: float   # forward + backward (+ recomputation), counted on the meta device


@dataclass(frozen=True)
class Plan:
    card: str                # the preset's card, as in efficia.throughput.GPU_PEAK_TFLOPS
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

    def step_seconds(self, choice: Choice) -> float:
        return choice.flops_per_token * self.batch_size * self.seq_len / (self.peak_flops * self.mfu)

    def tokens_per_second(self, choice: Choice) -> float:
        return self.batch_size * self.seq_len / self.step_seconds(choice)


# -- one training step on fake tensors ------------------------------------------------------------------

def precision_plugin(precision: str):
    """Lightning's own precision plugin for a trainer.precision value (autocast, or converted weights)."""
    from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision

    precision = str(precision)
    if precision in ("bf16-mixed", "16-mixed"):
        return MixedPrecision(precision, device="cpu")  # CPU autocast stands in for CUDA's: same dtype
    if precision in ("bf16-true", "16-true"):
        return HalfPrecision(precision)
    if precision in ("32-true", "32"):
        return Precision()
    if precision in ("64-true", "64"):
        return DoublePrecision()
    raise ConfigError(f"trainer.precision={precision!r}: the plan knows 32-true, bf16-mixed, 16-mixed, bf16-true, "
                      "16-true and 64-true")


def cuda_optimizer(optimizer_cfg: dict[str, Any]) -> dict[str, Any]:
    """The optimizer as it runs on CUDA: torch picks the foreach implementation there (temporaries the size of
    every parameter at once) unless fused is asked for; on CPU it would pick the lighter per-tensor loop."""
    import inspect

    from hydra.utils import get_class

    cfg = dict(optimizer_cfg)
    accepted = inspect.signature(get_class(cfg["_target_"]).__init__).parameters
    if "foreach" in accepted and cfg.get("foreach") is None and not cfg.get("fused"):
        cfg["foreach"] = True
    return cfg


def clear_model_caches() -> None:
    """Drop what model code memoises (masks, tables): a fake tensor must never outlive the fake run, nor a real
    one enter it."""
    for name, module in list(sys.modules.items()):
        if name.startswith("efficia.models") and module is not None:
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()


def training_step(module, optimizer, plugin, batches: Sequence[torch.Tensor], clip: float | None,
                  phase: Callable[[str], None] = lambda part: None) -> None:
    """What Lightning does for one optimizer step: gradients freed, each micro-batch's forward (the module's
    own loss) and backward, gradient clipping, the optimizer step. `phase` hears which part new tensors are."""
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        phase("activations")
        with plugin.forward_context():
            losses, _ = module.token_losses((batch[:, :-1], batch[:, 1:]))
            loss = losses.mean() / len(batches)
        phase("transient")
        loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    optimizer.step()


class StepMemory(TorchDispatchMode):
    """Bytes of every tensor storage alive while it is active, by part, and the parts at the highest total.

    Storages that exist when it starts are parameters (with buffers) or optimizer state, or inputs (counted
    as activations: the embedding's backward keeps them). New ones take the current phase's part (forward:
    activations; backward and the optimizer: transient) until they become a parameter's `.grad`."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 inputs: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.live: dict[int, list] = {}  # id(storage) -> [bytes, part]
        self.parts = dict.fromkeys(PARTS, 0)
        self.peak, self.at_peak = 0, dict(self.parts)
        self.part = "activations"
        for t in (*module.parameters(), *module.buffers()):
            self.track(t, "parameters")
        for state in optimizer.state.values():
            for t in state.values():
                if torch.is_tensor(t):
                    self.track(t, "optimizer")
        for t in inputs:
            self.track(t, "activations")
        self.hooks = [p.register_post_accumulate_grad_hook(self.grad_made) for p in module.parameters()
                      if p.requires_grad]
        self.note_peak()

    def phase(self, part: str) -> None:
        self.part = part

    def track(self, t: torch.Tensor, part: str) -> None:
        storage = t.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        self.live[key] = [storage.nbytes(), part]
        self.parts[part] += storage.nbytes()
        weakref.finalize(storage, self.free, key)

    def free(self, key: int) -> None:
        nbytes, part = self.live.pop(key)
        self.parts[part] -= nbytes

    def grad_made(self, param: torch.Tensor) -> None:
        entry = self.live.get(id(param.grad.untyped_storage()))
        if entry is not None and entry[1] != "gradients":
            self.parts[entry[1]] -= entry[0]
            self.parts["gradients"] += entry[0]
            entry[1] = "gradients"

    def note_peak(self) -> None:
        total = sum(self.parts.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.parts)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.track(t, self.part)
        self.note_peak()
        return out

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()
        return super().__exit__(*exc)


class FakeScalars(TorchDispatchMode):
    """A fake tensor has no values, so `.item()` has none to give; Adafactor reads its step count and the
    parameters' norms that way. They steer learning rates, never sizes: read them as 1."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return True if dtype == torch.bool else 1.0 if dtype.is_floating_point else 1
        return func(*args, **(kwargs or {}))


def fused_dropout_sdpa(sdpa: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Attention dropout as CUDA runs it: inside SDPA's fused kernels, which keep a random seed, not [T, T]
    probabilities. On a CPU SDPA has no dropout kernel and would save the scores of its math path (gpt at seed
    scale, 1M tokens: 318,606 GiB instead of 109); the memory of the fused kernel is that of SDPA without dropout.
    The models' own dropout layers (residual, feed-forward) run as configured and keep their masks."""

    @functools.wraps(sdpa)
    def without_dropout(query, key, value, attn_mask=None, dropout_p=0.0, *args, **kwargs):
        return sdpa(query, key, value, attn_mask, 0.0, *args, **kwargs)

    return without_dropout


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Fake CPU tensors (shapes and dtypes, no storage) for everything made or run inside."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from efficia.models import blocks

    clear_model_caches()
    sdpa = F.scaled_dot_product_attention  # looked up by every model at call time, recomputation included
    blocks.SDPA_DROPOUT_ON_CPU, F.scaled_dot_product_attention = True, fused_dropout_sdpa(sdpa)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), FakeScalars(), warnings.catch_warnings():
            # CPU autocast hands RMSNorm bf16 input with fp32 weights: torch says it cannot fuse that (on CPU)
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            yield
    finally:
        blocks.SDPA_DROPOUT_ON_CPU, F.scaled_dot_product_attention = False, sdpa
        clear_model_caches()


@contextlib.contextmanager
def no_fake_tensors() -> Iterator[None]:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        yield


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """Meta tensors -> (fake) CPU tensors, with shared parameters (a tied head) still shared: `to_empty`
    gives each module its own new parameter across a device change."""
    first: dict[int, tuple[torch.nn.Module, str]] = {}
    ties = []
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False, remove_duplicate=False):
            if id(param) in first:
                ties.append((owner, name, first[id(param)]))
            else:
                first[id(param)] = (owner, name)
    module.to_empty(device="cpu")
    for owner, name, (source, source_name) in ties:
        setattr(owner, name, getattr(source, source_name))
    return module


def build_step(cfg: dict[str, Any], tokenizer_state: dict[str, Any], fake: bool):
    """(module, optimizer, plugin) exactly as training builds them. `fake`: the module is built on the meta device
    (no memory, no init time) and its tensors become fake CPU tensors; call it inside `fake_tensors()`."""
    from efficia.module import LanguageModule

    cfg = {**cfg, "optimizer": cuda_optimizer(cfg["optimizer"])}
    plugin = precision_plugin(cfg["trainer"]["precision"])
    if fake:
        with torch.device("meta"), no_fake_tensors():  # torchmetrics deep-copies its states: not on fake tensors
            module = LanguageModule(cfg, tokenizer_state)
        module = materialize(module.to("meta"))  # tensors loaded from files were real: meta too
    else:
        module = LanguageModule(cfg, tokenizer_state)
    module = plugin.convert_module(module)
    module.train()
    optimizer, _ = module.optimizer_and_schedule(max(1, cfg["trainer"]["max_steps"]))
    return module, optimizer, plugin


def step_batches(vocab_size: int, micro_batch: int, seq_len: int, micro_batches: int) -> list[torch.Tensor]:
    return [torch.randint(vocab_size, (micro_batch, seq_len + 1)) for _ in range(micro_batches)]


def measure_step(cfg: dict[str, Any], tokenizer_state: dict[str, Any], micro_batch: int,
                 micro_batches: int) -> Memory:
    """Memory by part at the peak of one optimizer step of `micro_batches` micro-batches (1, or 2: the second
    runs with the first's gradients alive, as every later one does), measured on fake tensors."""
    with fake_tensors():
        module, optimizer, plugin = build_step(cfg, tokenizer_state, fake=True)
        make_optimizer_state(module, optimizer)
        batches = step_batches(module.tokenizer.vocab_size, micro_batch, cfg["data"]["seq_len"], micro_batches)
        with StepMemory(module, optimizer, batches) as memory:
            training_step(module, optimizer, plugin, batches, cfg["trainer"].get("gradient_clip_val"), memory.phase)
    return Memory(**memory.at_peak)


def measure_validation(cfg: dict[str, Any], tokenizer_state: dict[str, Any], batch_size: int) -> Memory:
    """Memory at the peak of one validation batch during fit (no gradients; the optimizer state exists): a
    validation batch is not split by the preset, and its logits and loss are made all at once."""
    with fake_tensors():
        module, optimizer, plugin = build_step(cfg, tokenizer_state, fake=True)
        make_optimizer_state(module, optimizer)
        (batch,) = step_batches(module.tokenizer.vocab_size, batch_size, cfg["data"]["seq_len"], 1)
        module.eval()
        with StepMemory(module, optimizer, [batch]) as memory, torch.no_grad(), plugin.forward_context():
            memory.phase("transient")
            module.token_losses((batch[:, :-1], batch[:, 1:]))
    return Memory(**memory.at_peak)


def measure_step_on_cpu(cfg: dict[str, Any], tokenizer_state: dict[str, Any], micro_batch: int,
                        micro_batches: int) -> int:
    """The same step on real CPU tensors, its peak measured independently of the plan: the bytes alive before it
    (parameters, buffers, optimizer state, the batches) plus the highest running sum of the allocations and frees
    torch.profiler records during it (profile_memory)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    clear_model_caches()
    module, optimizer, plugin = build_step(cfg, tokenizer_state, fake=False)
    make_optimizer_state(module, optimizer)
    batches = step_batches(module.tokenizer.vocab_size, micro_batch, cfg["data"]["seq_len"], micro_batches)
    held = [*module.parameters(), *module.buffers(), *batches,
            *(t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t))]
    before = sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in held}.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        training_step(module, optimizer, plugin, batches, cfg["trainer"].get("gradient_clip_val"))
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    running = highest = 0
    for _, nbytes in events:
        running += nbytes
        highest = max(highest, running)
    clear_model_caches()
    return before + highest


def make_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: the state every later step carries (no forward needed)."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -- the preset's choice -------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=64)
def _flops_cached(model_json: str, vocab_size: int, seq_len: int) -> float:
    from efficia.throughput import training_flops_per_token

    return training_flops_per_token(json.loads(model_json), vocab_size, seq_len)


def choose(cfg: dict[str, Any], tokenizer_state: dict[str, Any], vocab_size: int, budget: int) -> Choice:
    """The preset's search (efficia/hardware.py): the largest of batch, batch/2, ... 1 whose step fits, then the
    largest divisor of the batch at most that, and the accumulation that keeps data.batch_size."""
    batch_size, seq_len = cfg["data"]["batch_size"], cfg["data"]["seq_len"]

    def fits(micro_batch: int) -> bool:
        return step_memory(cfg, tokenizer_state, micro_batch).peak <= budget

    # memory grows with the micro-batch: when the whole batch does not fit, try 1 before the halving
    hopeless = not fits(batch_size) and not fits(1)
    found = None if hopeless else search_micro_batch(batch_size, fits)
    micro, accumulate = plan_accumulation(batch_size, found) if found else (None, None)
    flops = _flops_cached(json.dumps(cfg["model"], sort_keys=True), vocab_size, seq_len)
    return Choice(bool(cfg["model"].get("gradient_checkpointing")), micro, accumulate,
                  step_memory(cfg, tokenizer_state, micro or 1), flops)


def tokenizer_state(cfg: DictConfig, plain: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer training would build: a char vocabulary comes from the corpus (read as training reads it),
    the others need no data."""
    from hydra.utils import instantiate

    from efficia.checks import config_errors
    from efficia.data.tokenizers import build_tokenizer

    if plain["tokenizer"].get("kind") == "char":
        with config_errors("data"):
            datamodule = instantiate(cfg.data, tokenizer=plain["tokenizer"])
        datamodule.prepare()
        return datamodule.tokenizer.state()
    return build_tokenizer(plain["tokenizer"]).state()


def plan_run(cfg: DictConfig, mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> Plan:
    """The plan for one composed run config that has a GPU preset (callbacks.gpu_budget)."""
    from efficia.checks import check_fits, check_run_config, config_errors
    from efficia.data.tokenizers import tokenizer_from_state
    from efficia.models import build_model
    from efficia.module import LanguageModule
    from efficia.throughput import compute_dtype, gpu_peak

    with config_errors("config"):
        plain = OmegaConf.to_container(cfg, resolve=True)
    check_run_config(plain)
    check_fits(plain, LanguageModule.LOGGED)
    preset = (plain.get("callbacks") or {}).get("gpu_budget")
    if not preset:
        raise ConfigError("this run has no GPU preset to plan for; add trainer=rtx3060 or trainer=rtx4090")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu}: give the assumed model FLOPs utilisation as a fraction in (0, 1]")
    state = tokenizer_state(cfg, plain)
    vocab_size = tokenizer_from_state(state).vocab_size
    with config_errors("model"), torch.device("meta"):
        params = build_model(plain["model"], vocab_size).num_params()
    dtype = compute_dtype(plain["trainer"]["precision"], "cuda")
    peak = gpu_peak(preset["card"], dtype)
    if peak is None:
        raise ConfigError(f"callbacks.gpu_budget.card={preset['card']!r} is not in efficia.throughput.GPU_PEAK_TFLOPS; "
                          "add its datasheet figures there")
    budget = int(preset["memory_gb"] * GIB * (1 - preset["headroom"]) - context_gb * GIB)
    choices = []
    settings = [plain["model"]["gradient_checkpointing"]] if "gradient_checkpointing" in plain["model"] else [None]
    if settings[0] is not None:
        settings.append(not settings[0])
    for checkpointing in settings:
        run = plain if checkpointing is None else {**plain, "model": {**plain["model"],
                                                                       "gradient_checkpointing": checkpointing}}
        with config_errors("model"):
            choices.append(choose(run, state, vocab_size, budget))
    with config_errors("model"):
        val_fits, validation = validation_batch(plain, state, budget)
    return Plan(card=preset["card"], memory_gb=preset["memory_gb"], headroom=preset["headroom"],
                context_gb=context_gb, precision=str(plain["trainer"]["precision"]),
                optimizer=plain["optimizer"]["_target_"].rsplit(".", 1)[-1], model=plain["model"]["name"],
                params=params, vocab_size=vocab_size, seq_len=plain["data"]["seq_len"],
                batch_size=plain["data"]["batch_size"], budget=budget, peak_flops=peak, compute_dtype=dtype, mfu=mfu,
                configured=choices[0], other=choices[1] if len(choices) > 1 else None,
                val_batch_size=val_batch_size(plain), validation=validation, val_fits=val_fits)


# -- what a person reads -------------------------------------------------------------------------------

PART_LABELS = {"parameters": "parameters (+ buffers)", "gradients": "gradients (alive at the peak)",
               "optimizer": "optimizer state", "activations": "activations saved for backward",
               "transient": "largest transient (at the peak)"}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def seconds(t: float) -> str:
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def format_plan(plan: Plan) -> str:
    """The plan as a small table: one column per gradient-checkpointing setting, the configured one first."""
    head = (f"{plan.model}: {plan.params / 1e6:.2f}M parameters, vocab {plan.vocab_size:,}; batch {plan.batch_size} "
            f"x {plan.seq_len:,} tokens; {plan.precision}; {plan.optimizer}")
    cap = (f"{plan.card} preset: {plan.memory_gb:g} GB cap - {plan.headroom:.0%} headroom - "
           f"{plan.context_gb:g} GiB CUDA context = {gib(plan.budget)} for one step's tensors")
    names = [("gradient checkpointing " + ("on" if c.checkpointing else "off")
              + (" (configured)" if c is plan.configured and plan.other else "")) if c.checkpointing is not None
             else "as configured" for c in plan.choices]
    rows: list[tuple[str, list[str]]] = [
        ("micro-batch x accumulation", [f"{c.micro_batch} x {c.accumulate}" if c.micro_batch else
                                        "does not fit at 1" for c in plan.choices])]
    for part, label in PART_LABELS.items():
        rows.append((f"  {label}", [gib(getattr(c.memory, part)) for c in plan.choices]))
    rows.append(("step peak (at that micro-batch)", [gib(c.memory.peak) for c in plan.choices]))
    rows.append((f"step time at {plan.mfu:.0%} MFU of {plan.peak_flops / 1e12:g} TFLOP/s {plan.compute_dtype}",
                 [seconds(plan.step_seconds(c)) for c in plan.choices]))
    rows.append(("tokens/s", [f"{plan.tokens_per_second(c):,.0f}" for c in plan.choices]))
    rows.append(("FLOPs per token (forward + backward)", [f"{c.flops_per_token / 1e6:,.1f} M" for c in plan.choices]))
    width = max(len(label) for label, _ in rows) + 2
    val = (f"validation batch {plan.val_batch_size} x {plan.seq_len:,} tokens (no gradients, not split): peak "
           f"{gib(plan.validation.peak)}, " + ("fits" if plan.val_fits == plan.val_batch_size else
                                                "does NOT fit"))
    columns = [max(len(names[i]), *(len(values[i]) for _, values in rows)) + 2 for i in range(len(names))]
    lines = [head, cap, " " * width + "".join(n.ljust(w) for n, w in zip(names, columns, strict=True))]
    lines += [label.ljust(width) + "".join(v.ljust(w) for v, w in zip(values, columns, strict=True))
              for label, values in rows]
    lines.append(val)
    return "\n".join(line.rstrip() for line in lines)


def what_to_change(plan: Plan) -> str:
    """One line for a run that does not fit (its step even at micro-batch 1, or its validation batch): what is
    over, and what would help."""
    c = plan.configured
    if c.micro_batch is not None:  # the step fits; the validation batch does not
        fix = (f"set data.val_batch_size={plan.val_fits}" if plan.val_fits else
               "lower data.seq_len or pick a smaller scale=")
        return (f"{plan.model} on the {plan.card} preset: a validation batch of {plan.val_batch_size} x "
                f"{plan.seq_len:,} tokens peaks at {gib(plan.validation.peak)}, over the {gib(plan.budget)} its "
                f"{plan.memory_gb:g} GB leave (the preset splits training batches, not validation ones); {fix}")
    fixes = []
    if plan.other is not None and plan.other.micro_batch is not None:
        fixes.append(f"set model.gradient_checkpointing=true (micro-batch {plan.other.micro_batch} then fits)")
    fixes.append(f"lower data.seq_len (now {plan.seq_len:,}; with model.max_seq_len)")
    fixes.append("pick a smaller scale=")
    if "32" in plan.precision or "64" in plan.precision:
        fixes.append("use trainer.precision=bf16-mixed")
    return (f"{plan.model} on the {plan.card} preset: even a micro-batch of 1 x {plan.seq_len:,} tokens peaks at "
            f"{gib(c.memory.peak)}, over the {gib(plan.budget)} its {plan.memory_gb:g} GB leave for one step; "
            + ", or ".join(fixes) + (", or use a bigger preset" if plan.memory_gb < 24 else ""))


# -- the two doors: python -m efficia.plan and python train.py plan=true ---------------------------------

def compose(overrides: Sequence[str], output_dir: str | Path | None = None) -> DictConfig:
    """The config `python train.py <overrides>` would get; a plan writes nothing, so by default its run dir is a
    path in the temp folder that is never made."""
    from hydra.errors import HydraException

    from efficia.checks import first_line

    try:
        return compose_run(list(overrides), output_dir or Path(tempfile.gettempdir()) / "efficia-plan")
    except HydraException as err:
        raise ConfigError(f"{first_line(err)}; check the overrides ({' '.join(overrides)})") from None


@functools.lru_cache(maxsize=1)
def gpu_presets() -> tuple[str, ...]:
    """conf/trainer/ presets with a GPU budget (a new card's yaml joins by existing)."""
    names = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))
    return tuple(n for n in names if (compose([f"trainer={n}"]).get("callbacks") or {}).get("gpu_budget"))


def preset_configs(overrides: Sequence[str]) -> list[DictConfig]:
    """The run as given if it has a GPU preset; otherwise the same run on every GPU preset."""
    cfg = compose(overrides)
    if (cfg.get("callbacks") or {}).get("gpu_budget"):
        return [cfg]
    rest = [o for o in overrides if not o.startswith("trainer=")]
    return [compose([*rest, f"trainer={preset}"]) for preset in gpu_presets()]


def plan_command(overrides: Sequence[str], mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> list[Plan]:
    """Print the plan of each preset; a run that does not fit even at micro-batch 1 ends in one ConfigError line."""
    plans = []
    for cfg in preset_configs(overrides):
        plans.append(plan_run(cfg, mfu, context_gb))
        print(format_plan(plans[-1]) + "\n", flush=True)
    failing = [p for p in plans if not p.fits]
    if failing:
        fitting = [p.card for p in plans if p.fits]
        also = f" (it fits the {', '.join(fitting)} preset)" if fitting else ""
        raise ConfigError(what_to_change(failing[0]) + also)
    return plans


def plan_from_hydra(cfg: DictConfig) -> list[Plan]:
    """`python train.py <overrides> plan=true`: the same plan, from the overrides Hydra was given."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0] != "plan"]
    return plan_command(overrides)


# -- the docs table: every seed recipe on every GPU preset ---------------------------------------------

def seed_recipes() -> list[list[str]]:
    """Each experiment that trains at scale=seed (the seeds' own recipes), then `model=X scale=seed` for every
    model: the runs the GPU presets exist for."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    recipes = []
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        GlobalHydra.instance().clear()
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = hydra_compose("train", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
        if cfg.hydra.runtime.choices.get("scale") == "seed":
            recipes.append([f"experiment={path.stem}"])
    recipes += [[f"model={p.stem}", "scale=seed"] for p in sorted((CONF_DIR / "model").glob("*.yaml"))]
    return recipes


def table(mfu: float = ASSUMED_MFU, context_gb: float = CUDA_CONTEXT_GB) -> str:
    """A markdown table of every seed recipe on every GPU preset (runs that do not fit say so; no error)."""
    header = ("| recipe | preset | params | precision, optimizer | batch x tokens | checkpointing off: "
              "micro x accum, peak | checkpointing on: micro x accum, peak | step time off / on | tokens/s off / on "
              "| validation batch, peak |")
    lines = [header, "|" + "---|" * 10]
    for recipe in seed_recipes():
        for preset in gpu_presets():
            plan = plan_run(compose([*recipe, f"trainer={preset}"]), mfu, context_gb)
            by_setting = {c.checkpointing: c for c in plan.choices}

            def cell(c: Choice | None) -> str:
                if c is None:
                    return "n/a"
                if c.micro_batch is None:
                    return f"does not fit ({gib(c.memory.peak)} at 1)"
                return f"{c.micro_batch} x {c.accumulate}, {gib(c.memory.peak)}"

            off, on = by_setting.get(False), by_setting.get(True)
            time = " / ".join(seconds(plan.step_seconds(c)) for c in (off, on) if c)
            rate = " / ".join(f"{plan.tokens_per_second(c):,.0f}" for c in (off, on) if c)
            lines.append(f"| `{' '.join(recipe)}` | {preset} | {plan.params / 1e6:.1f}M | {plan.precision}, "
                         f"{plan.optimizer} | {plan.batch_size} x {plan.seq_len:,} | {cell(off)} | {cell(on)} | "
                         f"{time} | {rate} | {plan.val_batch_size}, {gib(plan.validation.peak)}"
                         + ("" if plan.val_fits == plan.val_batch_size else
                            f": does not fit, {plan.val_fits or 'nothing'} does") + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return "\n".join(lines)


TABLE_START, TABLE_END = "<!-- plan-table:start -->", "<!-- plan-table:end -->"


def write_table(path: Path, text: str) -> None:
    """Replace what lies between the table markers in `path` (atomically: never a half-written page)."""
    page = path.read_text(encoding="utf-8")
    if TABLE_START not in page or TABLE_END not in page:
        raise ConfigError(f"{path} has no {TABLE_START} ... {TABLE_END} markers to put the table between")
    before, rest = page.split(TABLE_START, 1)
    after = rest.split(TABLE_END, 1)[1]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{before}{TABLE_START}\n{text}\n{TABLE_END}{after}", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m efficia.plan", description="Predict memory by part, the GPU preset's micro-batch and "
        "accumulation, and the step time of a train.py run, from a CPU (efficia/plan.py).")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. experiment=yinggem_shakespeare "
                        "trainer=rtx3060 (no trainer= preset: every GPU preset)")
    parser.add_argument("--table", nargs="?", const="-", metavar="PAGE", help="every seed recipe on every GPU "
                        "preset as markdown: printed, or written between the markers of PAGE (docs/gpu-plan.md)")
    parser.add_argument("--mfu", type=float, default=ASSUMED_MFU, help=f"assumed MFU (default {ASSUMED_MFU})")
    parser.add_argument("--context-gb", type=float, default=CUDA_CONTEXT_GB,
                        help=f"GiB a real card loses to the CUDA context (default {CUDA_CONTEXT_GB})")
    args = parser.parse_args(argv)

    def run(_: Any) -> None:
        if args.table is None:
            plan_command(args.overrides, args.mfu, args.context_gb)
            return
        if args.overrides:
            raise ConfigError("--table plans the seed recipes; give no overrides with it")
        text = table(args.mfu, args.context_gb)
        if args.table == "-":
            print(text)
        else:
            write_table(Path(args.table), text)

    from efficia.cli import run_cli

    run_cli(run, None)


if __name__ == "__main__":
    main()

"""One training step measured on fake tensors: the memory of each part at the step's peak.

Memory is measured, not guessed: one training step of the real TrainingModule (forward and loss as training
computes them, backward, gradient clipping, optimizer step) runs on fake tensors (torch's FakeTensorMode: shapes
and dtypes, no storage, no CUDA) under the preset's precision, and `StepMemory` (a TorchDispatchMode) follows
every tensor storage that lives during it. The parts at the step's peak add up to the peak: parameters (and
buffers), gradients, optimizer state, activations saved for backward, and the transient (what backward or the
optimizer holds briefly: the gradient of the logits, the foreach optimizer's temporaries). Whatever a model or
the loss does (a fused loss, a chunked mixer), the plan sees it, because it runs it.

What the CPU cannot show: on CUDA the sliding-window model runs FlexAttention, which saves less than the
chunked path measured here (the plan is conservative for it); allocator fragmentation is the headroom's job.
Attention dropout is measured as CUDA's fused SDPA runs it (`efficia.models.kernels.gpu_attention_on_cpu`), not as
the CPU's math path.
`measure_step_on_cpu` measures the same step on real CPU tensors (tests/test_plan.py holds the two together);
bench/gpu_check.py prints a real card's peak next to the plan.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from efficia.errors import ConfigError

PARTS = ("parameters", "gradients", "optimizer", "activations", "transient")


@dataclass(frozen=True)
class Memory:
    """Bytes at the peak of one training step, by part; the parts add up to `peak`."""

    parameters: int   # parameters and buffers, in the precision's parameter dtype
    gradients: int    # parameter gradients alive at the peak (all of them while accumulating)
    optimizer: int    # optimizer state (AdamW: two moments; Adafactor: row and column factors; Muon: one momentum)
    activations: int  # tensors the forward saved for backward, still alive at the peak
    transient: int    # backward's and the optimizer's temporaries at the peak (e.g. the logits' gradient)

    @property
    def peak(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


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


def training_step(module, optimizer, plugin, batches: Sequence[torch.Tensor], clip: float | None,
                  phase: Callable[[str], None] = lambda part: None) -> None:
    """What Lightning does for one optimizer step: gradients freed, each micro-batch's forward (the module's
    own loss) and backward, gradient clipping, the optimizer step. `phase` hears which part new tensors are."""
    optimizer.zero_grad(set_to_none=True)
    for batch in batches:
        phase("activations")
        with plugin.forward_context():
            loss = module.loss((batch[:, :-1], batch[:, 1:])) / len(batches)
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


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Fake CPU tensors (shapes and dtypes, no storage) for everything made or run inside, attention dropout taken
    as CUDA's fused SDPA takes it (`gpu_attention_on_cpu`): on a CPU SDPA has no dropout kernel and would save the
    scores of its math path (gpt at seed scale, 1M tokens: 318,606 GiB instead of 109). The models' own dropout
    layers (residual, feed-forward) run as configured and keep their masks. Memoised masks are dropped on the way
    in and out (`clear_caches`): a fake tensor must never outlive the fake run, nor a real one enter it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from efficia.models.kernels import clear_caches, gpu_attention_on_cpu

    clear_caches()
    try:
        with (gpu_attention_on_cpu(), FakeTensorMode(allow_non_fake_inputs=True), FakeScalars(),
              warnings.catch_warnings()):
            # CPU autocast hands RMSNorm bf16 input with fp32 weights: torch says it cannot fuse that (on CPU)
            warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")
            yield
    finally:
        clear_caches()


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


def build_step(cfg: dict[str, Any], tokenizer_state: dict[str, Any], fake: bool, plugin=None):
    """(module, optimizer, plugin) exactly as training builds them. `fake`: the module is built on the meta device
    (no memory, no init time) and its tensors become fake CPU tensors; call it inside `fake_tensors()`.
    `plugin`: a precision plugin other than `precision_plugin`'s."""
    from efficia.training.module import TrainingModule

    cfg = {**cfg, "optimizer": cuda_optimizer(cfg["optimizer"])}
    plugin = plugin or precision_plugin(cfg["trainer"]["precision"])
    if fake:
        with torch.device("meta"), no_fake_tensors():  # torchmetrics deep-copies its states: not on fake tensors
            module = TrainingModule(cfg, tokenizer_state)
        module = materialize(module.to("meta"))  # tensors loaded from files were real: meta too
    else:
        module = TrainingModule(cfg, tokenizer_state)
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


def measure_states(cfg: dict[str, Any], tokenizer_state: dict[str, Any]) -> Memory:
    """What every step holds whatever its micro-batch: parameters (+ buffers), one gradient per trainable
    parameter and the optimizer state, counted on fake tensors in seconds (no forward is run)."""
    with fake_tensors():
        module, optimizer, _ = build_step(cfg, tokenizer_state, fake=True)
        make_optimizer_state(module, optimizer)

        def nbytes(tensors) -> int:
            return sum({id(t.untyped_storage()): t.untyped_storage().nbytes() for t in tensors}.values())

        trainable = [p for p in module.parameters() if p.requires_grad]
        return Memory(parameters=nbytes([*module.parameters(), *module.buffers()]), gradients=nbytes(trainable),
                      optimizer=nbytes(t for state in optimizer.state.values() for t in state.values()
                                       if torch.is_tensor(t)), activations=0, transient=0)


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
    torch.profiler records during it (profile_memory). The precision is the one a real Trainer picks for
    trainer.precision, not `precision_plugin`'s reading of it."""
    import lightning as L
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from efficia.models.kernels import clear_caches

    clear_caches()  # no mask memoised on fake tensors, and none left behind
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=cfg["trainer"]["precision"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module, optimizer, plugin = build_step(cfg, tokenizer_state, fake=False, plugin=trainer.precision_plugin)
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
    clear_caches()
    return before + highest


def make_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: the state every later step carries (no forward needed)."""
    for p in module.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

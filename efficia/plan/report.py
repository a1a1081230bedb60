"""What a person reads: a plan as a small table, and the one line that says what to change when a run does not
fit."""

from __future__ import annotations

from efficia.plan.choose import GIB, Plan

PART_LABELS = {"parameters": "parameters (+ buffers)", "gradients": "gradients (alive at the peak)",
               "optimizer": "optimizer state", "activations": "activations saved for backward",
               "transient": "largest transient (at the peak)"}


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.1f} MiB"


def seconds(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.3g} s" if t >= 1 else f"{t * 1e3:.3g} ms"


def rate(tokens_per_second: float | None) -> str:
    return "-" if tokens_per_second is None else f"{tokens_per_second:,.0f}"


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
                                        "does not fit at 1" if c.step_run else "states alone over"
                                        for c in plan.choices])]
    for part, label in PART_LABELS.items():
        rows.append((f"  {label}", [gib(getattr(c.memory, part)) for c in plan.choices]))
    rows.append(("step peak (at that micro-batch)", [gib(c.memory.peak) for c in plan.choices]))
    rows.append((f"step time at {plan.mfu:.0%} MFU of {plan.peak_flops / 1e12:g} TFLOP/s {plan.compute_dtype}",
                 [seconds(plan.step_seconds(c)) for c in plan.choices]))
    rows.append(("tokens/s", [rate(plan.tokens_per_second(c)) for c in plan.choices]))
    rows.append(("FLOPs per token (forward + backward)", [f"{c.flops_per_token / 1e6:,.1f} M" if c.flops_per_token
                                                          else "-" for c in plan.choices]))
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
    if not c.step_run:
        return (f"{plan.model} on the {plan.card} preset: its {plan.params / 1e6:,.0f}M parameters, their gradients "
                f"and {plan.optimizer} state alone take {gib(c.memory.peak)}, over the {gib(plan.budget)} its "
                f"{plan.memory_gb:g} GB leave for one step, before any activation; pick a smaller scale= (or fewer "
                "model.n_layer, a smaller model.d_model)" + (", or use a bigger preset" if plan.memory_gb < 24 else ""))
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

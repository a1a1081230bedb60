"""python -m efficia.plan: memory measured on fake tensors against the same step measured on this CPU, the preset's
micro-batch rule, both doors (the module and train.py plan=true), one-line errors, and bench/gpu_check.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from efficia.build import build_model
from efficia.plan.__main__ import main
from efficia.plan.choose import GIB, step_memory, tokenizer_state
from efficia.plan.command import compose, plan_command
from efficia.plan.measure import PARTS, Memory, measure_step, measure_step_on_cpu
from efficia.plan.table import TABLE_END, TABLE_START, seed_recipes, write_table
from tests.conftest import CONF, ROOT

# Three sizes, each leaning on different parts, so that leaving any part out of the sum misses the measured peak
# by more than 15% somewhere: (overrides, micro-batch, micro-batches per step).
SIZES = {
    # model states: AdamW's two moments, fp32 weights and the gradients the first micro-batch leaves alive
    "states": (["model=gpt", "scale=small", "tokenizer=byte", "optimizer=adamw", "model.d_model=256",
                "model.max_seq_len=128", "data.batch_size=2"], 1, 2),
    # activations: sliding-window attention (chunked path) under bf16 autocast, Adafactor
    "activations": (["model=yinggem", "scale=tiny", "tokenizer=byte", "optimizer=adafactor",
                     "trainer.precision=bf16-mixed", "model.max_seq_len=128", "model.window=32",
                     "data.batch_size=8"], 8, 1),
    # the transient: a 50,257-token vocabulary on a tiny model (the logits' gradient), a tied head
    "transient": (["model=gpt", "scale=tiny", "tokenizer=gpt2", "model.max_seq_len=64", "data.batch_size=4"], 4, 1),
}


def run_config(overrides: list[str]) -> tuple[dict, dict]:
    composed = compose(overrides)
    cfg = OmegaConf.to_container(composed, resolve=True)
    return cfg, tokenizer_state(composed, cfg)


@pytest.fixture(scope="module")
def predicted_and_measured() -> dict[str, tuple[Memory, int]]:
    """The plan's side through `step_memory` (as the preset's search asks it: how many micro-batches, its choice),
    the CPU's under the precision a real Trainer picks: neither side shares the other's accounting."""
    out = {}
    for name, (overrides, micro_batch, micro_batches) in SIZES.items():
        cfg, tokenizer = run_config(overrides)
        assert cfg["data"]["batch_size"] // micro_batch == micro_batches or micro_batches == 2
        out[name] = (step_memory(cfg, tokenizer, micro_batch),
                     measure_step_on_cpu(cfg, tokenizer, micro_batch, micro_batches))
    return out


def test_the_plan_predicts_the_peak_measured_on_this_cpu(predicted_and_measured) -> None:
    """Fake tensors (no storage) against real ones under torch.profiler: the same step, within 15%."""
    for name, (memory, measured) in predicted_and_measured.items():
        assert memory.peak == sum(getattr(memory, part) for part in PARTS)
        assert abs(memory.peak / measured - 1) <= 0.15, (name, memory, measured)


def test_every_part_of_the_sum_is_needed(predicted_and_measured) -> None:
    """The check above has teeth: without any one part, some size misses its measured peak by more than 15%."""
    for part in PARTS:
        misses = [name for name, (memory, measured) in predicted_and_measured.items()
                  if abs((memory.peak - getattr(memory, part)) / measured - 1) > 0.15]
        assert misses, f"leaving out {part} still passes at every size: the sizes do not test it"


def test_the_model_states_are_counted_as_the_step_counts_them() -> None:
    """The check that refuses a model over the card before any step (`measure_states`) counts what the step holds:
    the same parameters and optimizer state, and every gradient (alive during accumulation)."""
    from efficia.plan.measure import measure_states

    cfg, tokenizer = run_config(SIZES["states"][0])
    states, step = measure_states(cfg, tokenizer), measure_step(cfg, tokenizer, 1, 2)
    assert (states.parameters, states.gradients, states.optimizer) == (step.parameters, step.gradients,
                                                                       step.optimizer)
    assert states.gradients == sum(p.numel() * 4 for p in build_model(cfg["model"], 257).parameters())
    assert 2 * states.gradients <= states.optimizer < 2.001 * states.gradients  # AdamW's two moments (and steps)


def test_muons_state_is_its_momentum_and_adamws_two_moments() -> None:
    """optimizer=muon: one momentum buffer per hidden matrix (fp32), AdamW's two moments and step for the rest."""
    from efficia.plan.measure import measure_states
    from efficia.training.muon import split_for_muon

    cfg, tokenizer = run_config(["model=gpt", "scale=tiny", "tokenizer=byte", "optimizer=muon"])
    states, step = measure_states(cfg, tokenizer), measure_step(cfg, tokenizer, 2, 2)
    net = build_model(cfg["model"], 257)
    hidden, other = split_for_muon(net)
    numel = {name: p.numel() for name, p in net.named_parameters()}
    assert states.optimizer == step.optimizer == (4 * sum(numel[n] for n in hidden) + 8 * sum(numel[n] for n in other)
                                                  + 4 * len(other))


def test_a_tied_head_is_counted_once() -> None:
    """The model is built on the meta device and made fake: the tied embedding/head stays one tensor."""
    from efficia.training.module import TrainingModule

    cfg, tokenizer = run_config(SIZES["transient"][0])
    module = TrainingModule(cfg, tokenizer)
    real = sum({id(t): t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())}.values())
    assert module.net.lm_head.weight is module.net.tok_emb.weight
    assert measure_step(cfg, tokenizer, 1, 1).parameters == real


def test_attention_dropout_is_planned_as_cudas_fused_kernel() -> None:
    """On a CPU, attention with dropout saves [T, T] probabilities; CUDA's fused SDPA keeps a seed. The plan measures
    CUDA's way: dropout adds its layers' masks, not T-squared scores (which the real CPU step does hold)."""
    import torch
    import torch.nn.functional as F

    from efficia.models.kernels import attend

    sdpa = F.scaled_dot_product_attention
    base = ["model=gpt", "scale=tiny", "tokenizer=byte", "model.max_seq_len=512", "data.batch_size=1"]
    plain, tokenizer = run_config([*base, "model.dropout=0.0"])
    dropped, _ = run_config([*base, "model.dropout=0.2"])
    without, with_dropout = measure_step(plain, tokenizer, 1, 1), measure_step(dropped, tokenizer, 1, 1)
    assert without.activations < with_dropout.activations < 1.5 * without.activations
    assert measure_step_on_cpu(dropped, tokenizer, 1, 1) > 2 * with_dropout.peak  # the CPU's own math path
    assert F.scaled_dot_product_attention is sdpa  # torch itself is never patched
    q = torch.randn(1, 2, 8, 4)
    assert not torch.equal(attend(q, q, q, 0.5), attend(q, q, q))  # after the plan, attention drops weights again


def test_gpu_attention_on_cpu_keeps_dropout_inside_sdpa() -> None:
    """Inside the switch, attention dropout is SDPA's own (the fused CUDA kernel's memory: nothing dropped on a CPU)
    along every path (`attend`, `sdpa`, the sliding-window kernels); outside, and after it nests, a CPU drops."""
    import torch

    from efficia.models.kernels import attend, gpu_attention_on_cpu, sdpa, sliding_window_attention

    q = torch.randn(1, 2, 24, 4)
    exact = (attend(q, q, q), sdpa(q, q, q, is_causal=True), sliding_window_attention(q, q, q, 5))
    with gpu_attention_on_cpu():
        with gpu_attention_on_cpu():
            pass
        dropped = (attend(q, q, q, 0.5), sdpa(q, q, q, is_causal=True, dropout_p=0.5),
                   sliding_window_attention(q, q, q, 5, 0.5))
    for got, want in zip(dropped, exact, strict=True):
        torch.testing.assert_close(got, want)
    assert not torch.equal(attend(q, q, q, 0.5), exact[0])


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_plans_through_the_cli(model: str, capsys) -> None:
    main([f"model={model}", "scale=tiny", "trainer=rtx3060"])
    out = capsys.readouterr().out
    assert "rtx 3060 preset: 12 GB cap - 10% headroom - 0.5 GiB CUDA context = 10.30 GiB" in out
    assert "gradient checkpointing off (configured)" in out and "gradient checkpointing on" in out
    rows = {line[:43].strip(): line[43:].split() for line in out.splitlines()}
    assert rows["micro-batch x accumulation"] == ["24", "x", "1", "24", "x", "1"]  # a tiny model fits whole
    for label in ("parameters (+ buffers)", "optimizer state", "activations saved for backward", "step peak (at "
                  "that micro-batch)", "tokens/s", "FLOPs per token (forward + backward)"):
        assert label in rows, label
    off, on = (float(rows["activations saved for backward"][i]) for i in (0, 2))
    assert on < off  # checkpointing keeps only the blocks' inputs


@pytest.mark.parametrize("model", ["gpt", "lumenspark"])
def test_a_tight_card_gets_the_presets_micro_batch_and_accumulation(model: str, capsys) -> None:
    """A budget just under the whole batch's step: the plan halves like the preset and accumulates the rest."""
    overrides = [f"model={model}", "scale=tiny", "trainer=rtx3060", "data.batch_size=12", "data.val_batch_size=1"]
    cfg, tokenizer = run_config(overrides)
    whole = step_memory(cfg, tokenizer, 12).peak
    context = (12 * 0.9 * GIB - whole + 1) / GIB  # the budget is one byte short of the whole batch
    (plan,) = plan_command(overrides, context_gb=context)
    chosen = plan.configured
    assert chosen.micro_batch < 12 and chosen.micro_batch * chosen.accumulate == 12
    assert chosen.memory.peak <= plan.budget < whole
    bigger = next(b for b in (12, 6, 3) if b > chosen.micro_batch and b // 2 <= chosen.micro_batch)
    assert step_memory(cfg, tokenizer, bigger).peak > plan.budget  # the candidate above it did not fit
    assert f"{chosen.micro_batch} x {chosen.accumulate}" in capsys.readouterr().out


def test_without_a_preset_every_gpu_preset_is_planned(capsys) -> None:
    plans = plan_command(["model=gpt", "scale=tiny"])
    assert [p.card for p in plans] == ["rtx 3060", "rtx 4090"] and [p.memory_gb for p in plans] == [12, 24]
    assert plans[1].peak_flops > plans[0].peak_flops
    assert plans[0].step_seconds(plans[0].configured) > plans[1].step_seconds(plans[1].configured)


def test_an_impossible_run_is_one_line_and_a_non_zero_exit() -> None:
    """The door users hit: a model whose weights, gradients and AdamW state alone outgrow a 12 GB card (a 1.8B gpt),
    through `python -m efficia.plan`: refused from those states, without running a step on fake tensors.
    (A context longer than the data is refused earlier, by train's checks.)"""
    proc = subprocess.run([sys.executable, "-m", "efficia.plan", "model=gpt", "scale=seed", "model.d_model=8192",
                           "model.n_head=64", "trainer=rtx3060", "optimizer=adamw"], cwd=ROOT, capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: gpt on the rtx 3060 preset: its 1,762M parameters, their gradients and AdamW "
                           "state alone take 26.26 GiB, over the 10.30 GiB") and "scale=" in line
    assert "states alone over" in proc.stdout  # the plan itself is printed before the error


def test_mqar_is_planned_with_its_vocabulary(capsys) -> None:
    """data=mqar is token ids: the plan takes the data's vocabulary as training does (it used to refuse every
    MQAR run)."""
    main(["experiment=recall", "scale=tiny", "trainer=rtx3060", "data.vocab_size=512"])
    assert "vocab 512;" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "expected"), [
    (["model=nonexistent"], "error: "),
    (["model=gpt", "scale=tiny", "trainer=rtx3060", "trainer.precision=8-weird"], "error: trainer.precision="),
    (["model=gpt", "scale=tiny", "trainer=rtx3060", "data.seq_len=64"], "error: data.seq_len=64 is longer"),
    (["model=gpt", "scale=tiny", "mfu=2"], "error: mfu=2: give"),
    (["model=gpt", "scale=tiny", "context_gb=-5"], "error: context_gb=-5: the CUDA context takes memory"),
    (["model=gpt", "scale=tiny", "trainer=rtx3060", "context_gb=20"], "error: context_gb=20 leaves nothing of the"),
    (["model=gpt", "scale=tiny", "trainer=rtx3060", "callbacks.gpu_budget.memory_gb=-12"],
     "error: callbacks.gpu_budget.memory_gb=-12: give the card's memory"),
    (["model=gpt", "scale=tiny", "trainer=rtx3060", "callbacks.gpu_budget.headroom=1.5"],
     "error: callbacks.gpu_budget.headroom=1.5: give the share"),
    (["table=model=gpt"], "error: table=model=gpt: give the path of a markdown page"),
    (["table="], "error: table=: give the path of a markdown page"),
    (["table=true"], "error: table=true: give the path"),
    (["model=gpt", "scale=tiny", "mfu=lots"], "error: mfu='lots' is not a number"),
    (["model=gpt", "scale=tiny", "--mfu", "0.3"], "error: '--mfu' is not a key=value option"),
    (["table=-", "model=gpt"], "error: table= plans the seed recipes"),
    (["table=no/such/page.md"], "error: table=no/such/page.md: no such page"),
])
def test_bad_input_is_one_line(argv: list[str], expected: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(expected), err


def test_the_commands_own_options_are_key_value(tmp_path: Path, monkeypatch, capsys) -> None:
    """mfu=, context_gb= and table= are the command's; every other key=value goes to train.py's config. The table
    itself (minutes) is stood in for: what is checked is that table=- prints it and table=PAGE writes it."""
    from efficia.plan import __main__ as command
    from efficia.plan.choose import ASSUMED_MFU, CUDA_CONTEXT_GB

    assert f"mfu={ASSUMED_MFU:g} " in command.__doc__ and f"context_gb={CUDA_CONTEXT_GB:g} " in command.__doc__
    main(["model=gpt", "mfu=0.5", "scale=tiny", "context_gb=1", "trainer=rtx3060"])
    out = capsys.readouterr().out
    assert "- 1 GiB CUDA context = 9.80 GiB" in out and "step time at 50% MFU" in out
    made = []
    monkeypatch.setattr(command, "table", lambda mfu, context_gb: made.append((mfu, context_gb)) or "| table |")
    main(["table=-", "mfu=0.4", "context_gb=1"])
    assert made == [(0.4, 1.0)] and capsys.readouterr().out == "| table |\n"
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{TABLE_START}\nold\n{TABLE_END}\n")
    main([f"table={page}"])
    assert made[-1] == (0.3, 0.5) and page.read_text() == f"intro\n{TABLE_START}\n| table |\n{TABLE_END}\n"


def test_an_external_table_is_planned(tmp_path: Path, capsys) -> None:
    """efficientlm's frozen external table, read from model.external.source by the one model factory: the plan
    builds the model as training does (the table a buffer), and the fake-tensor step runs with it."""
    import torch
    from safetensors.torch import save_file

    source = tmp_path / "table.safetensors"
    save_file({"table": torch.randn(65, 24)}, str(source))  # tokenizer=char on tiny Shakespeare: 65 ids
    main(["model=efficientlm", f"model.external.source={source}", "scale=tiny", "trainer=rtx3060"])
    out = capsys.readouterr().out
    assert out.startswith("efficientlm: ") and "vocab 65" in out and "micro-batch x accumulation" in out
    cfg, tokenizer = run_config(["model=efficientlm", f"model.external.source={source}", "scale=tiny"])
    without, _ = run_config(["model=efficientlm", "scale=tiny"])
    assert (measure_step(cfg, tokenizer, 1, 1).parameters - measure_step(without, tokenizer, 1, 1).parameters
            >= 65 * 24 * 4)  # the table (fp32) is counted with the parameters and buffers


def test_train_py_plan_true_is_the_same_plan(tmp_path: Path, capsys) -> None:
    """Two doors, one function: the same text from train.py plan=true (a real process) as from python -m efficia.plan
    (its main, here; the module's own process: test_an_impossible_run_is_one_line_and_a_non_zero_exit)."""
    args = ["model=yinggem", "scale=tiny", "trainer=rtx4090"]
    main(args)
    by_module = capsys.readouterr().out
    by_train = subprocess.run([sys.executable, "train.py", *args, "plan=true", f"hydra.run.dir={tmp_path}/run"],
                              cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "rtx 4090 preset" in by_module and by_train == by_module
    assert not list(tmp_path.glob("run/checkpoints")) and not list(tmp_path.glob("run/*.csv"))  # nothing trained


def test_the_table_covers_every_seed_recipe_and_every_model() -> None:
    recipes = seed_recipes()
    for model in (p.stem for p in (CONF / "model").glob("*.yaml")):
        assert [f"model={model}", "scale=seed"] in recipes
    assert ["experiment=yinggem_shakespeare"] in recipes and ["experiment=efficientlm_seed"] in recipes
    assert ["experiment=quickstart"] not in recipes  # scale=small: a CPU recipe


def test_the_docs_table_is_regenerated_between_its_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{TABLE_START}\nold\n{TABLE_END}\noutro\n")
    write_table(page, "| new |")
    assert page.read_text() == f"intro\n{TABLE_START}\n| new |\n{TABLE_END}\noutro\n"
    docs = (ROOT / "docs" / "gpu-plan.md").read_text()
    assert TABLE_START in docs and TABLE_END in docs and "python -m efficia.plan table=docs/gpu-plan.md" in docs
    body = docs.split(TABLE_START)[1].split(TABLE_END)[0]
    assert all(f"`{' '.join(r)}`" in body for r in seed_recipes()), "docs/gpu-plan.md is stale: regenerate it"
    page.write_text("no markers")
    with pytest.raises(Exception, match="markers"):
        write_table(page, "| new |")
    assert page.read_text() == "no markers"


def test_gpu_check_without_cuda_says_so_and_exits_0() -> None:
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "gpu_check: no CUDA device on this machine; nothing to check (run it where a GPU is)"]


def test_gpu_check_runs_a_recipe_through_the_real_trainer(tmp_path: Path) -> None:
    """Its CUDA-free plumbing: the short run's overrides compose, train through Lightning and report the plan."""
    sys.path.insert(0, str(ROOT))
    from bench.gpu_check import check_recipe, row

    found = check_recipe(["model=gpt", "scale=tiny"], "rtx3060", 2, tmp_path / "run")
    assert found["steps"] == 2 and found["peak"] is None  # no CUDA: nothing to measure
    assert found["plan"].configured.micro_batch == 24
    assert row(["model=gpt", "scale=tiny"], "rtx3060", found).startswith("| `model=gpt scale=tiny` | rtx3060 | 24 x 1")


"""`python -m efficia.evaluate`: a checkpoint's own held-out split reproduces the run's final val/loss (and MQAR's
val/recall_acc); a text file's loss, perplexity and bits per byte equal an independent token-by-token pass; a data
config evaluates with the model's tokenizer; several checkpoints give one table; bad input is one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import efficia
from efficia.config import compose_run
from efficia.errors import EfficiaError
from efficia.evaluation.command import main as evaluate_main
from efficia.training.run import train
from tests.conftest import require_data
from tests.test_mqar import TINY as MQAR

pytestmark = pytest.mark.usefixtures("one_thread")
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory) -> str:
    require_data()
    out = tmp_path_factory.mktemp("evaluate") / "run"
    return train(compose_run(["debug=limit", "logger=csv", "trainer.max_steps=4", "optimizer.lr=3e-2",
                              "callbacks.loss_curve=null"], out))["last_ckpt"]


def run_json(capsys, *args: str) -> list[dict]:
    evaluate_main(list(args))
    out = capsys.readouterr().out.strip().splitlines()
    return [json.loads(line) for line in out if line.startswith("{")]


def brute_force_nats(model: efficia.LoadedModel, ids: list[int], context: int) -> torch.Tensor:
    """Each token from the second on, predicted from at most `context` tokens before it, one forward each."""
    out = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            x = torch.tensor([ids[max(0, t - context):t]])
            out.append(-F.log_softmax(model.net(x)[0, -1].double(), -1)[ids[t]])
    return torch.stack(out)


def test_own_split_reproduces_the_runs_final_val_loss_and_recall(make_cfg, capsys) -> None:
    require_data()
    result = train(make_cfg(*MQAR, "trainer.max_steps=3", "trainer.val_check_interval=3"))
    (row,) = run_json(capsys, f"ckpt={result['last_ckpt']}")
    assert row["loss"] == pytest.approx(result["metrics"]["val/loss"], rel=1e-6)
    assert row["recall_acc"] == pytest.approx(result["metrics"]["val/recall_acc"], abs=1e-9)


def test_text_file_equals_an_independent_token_by_token_pass(char_ckpt: str, tmp_path: Path, capsys) -> None:
    text = tmp_path / "speech.txt"
    text.write_text(TEXT * 2)  # 146 characters: longer than the 32-token context
    model = efficia.load(char_ckpt)
    ids = model.tokenizer.encode(TEXT * 2)
    (row,) = run_json(capsys, f"ckpt={char_ckpt}", f"data={text}", "window=8", "stride=1", "batch_size=5")
    nats = brute_force_nats(model, ids, context=8)
    assert row["tokens"] == len(ids) - 1
    assert row["loss"] == pytest.approx(nats.mean().item(), rel=1e-5)
    assert row["ppl"] == pytest.approx(math.exp(nats.mean().item()), rel=1e-5)
    target_bytes = len((TEXT * 2).encode()) - 1  # every character but the first ("F", one byte)
    assert row["bpb"] == pytest.approx(nats.sum().item() / target_bytes / math.log(2), rel=1e-5)
    # a stride of several tokens: every token is still scored once, with at least window - stride of context
    (strided,) = run_json(capsys, f"ckpt={char_ckpt}", f"data={text}", "window=32", "stride=8")
    assert strided["tokens"] == len(ids) - 1 and strided["loss"] != row["loss"]
    (whole,) = run_json(capsys, f"ckpt={char_ckpt}", f"data={text}", "window=32", "stride=32")
    assert abs(whole["loss"] - strided["loss"]) < 0.5


def test_a_data_config_and_a_comparison_table(char_ckpt: str, tmp_path: Path, capsys) -> None:
    folder = efficia.save_pretrained(char_ckpt, tmp_path / "export")
    evaluate_main([f"ckpt=[{char_ckpt},{folder}]", "data=shakespeare"])
    out = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    table = [line for line in out if line.startswith("|")]
    assert len(rows) == 2 and rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-6)
    assert len(table) == 4 and table[0].startswith("| ckpt | model | params | data | loss | ppl | bpb |")
    assert re.search(rf"\| {re.escape(str(folder))} \| gpt \| \d+ \| shakespeare \| {rows[1]['loss']:.4f} \|",
                     table[3])


@pytest.mark.parametrize(("args", "message"), [
    (["data=nope"], "data=nope is neither a file nor a data config"),
    (["window=1000", "data={text}"], "window=1000: give a whole number of tokens between 1 and the model's context"),
    (["data={bad}"], "outside this model's"),
    (["stride=0", "data={text}"], "stride=0: give a whole number >= 1"),
])
def test_bad_input_is_one_line(char_ckpt: str, tmp_path: Path, capsys, args: list[str], message: str) -> None:
    (tmp_path / "t.txt").write_text(TEXT)
    (tmp_path / "bad.txt").write_text("naïve ☃")
    args = [a.format(text=tmp_path / "t.txt", bad=tmp_path / "bad.txt") for a in args]
    with pytest.raises(SystemExit) as code:
        evaluate_main([f"ckpt={char_ckpt}", *args])
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and message in err and "\n" not in err


def test_an_export_needs_data(char_ckpt: str, tmp_path: Path) -> None:
    from efficia.evaluation.command import OPTIONS, evaluate

    folder = efficia.save_pretrained(char_ckpt, tmp_path / "export")
    with pytest.raises(EfficiaError, match="holds no data config; give data="):
        evaluate({**OPTIONS, "ckpt": str(folder)})

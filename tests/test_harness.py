"""lm-evaluation-harness: `python -m efficia.harness` runs the model `efficia`, found through the harness's registry,
on local task yamls over a local jsonl (no network); the loglikelihoods, rolling loglikelihoods and generations it
reports equal a direct computation with the model, and the accuracy follows from them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import efficia
from efficia.data.tokenizers import ByteTokenizer
from efficia.harness import main as harness_main
from tests.conftest import build_tiny
from tests.trained_like import randomise

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_thread")

DOCS = [{"question": "ROMEO: I", "choices": [" am", " zq", "\nx"], "answer": 0, "text": "JULIET:\nO Romeo, Romeo!"},
        {"question": "To be, or not", "choices": [" to be", " xx be"], "answer": 0, "text": "Now is the winter"},
        {"question": "KING:", "choices": ["\n", " 9"], "answer": 1, "text": "My lord."}]
TASKS = {  # three tasks over the same jsonl, one per request type
    "efficia_choice": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
                      "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n",
    "efficia_rolling": "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
                       "metric_list:\n  - metric: bits_per_byte\n",
    "efficia_generate": "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{text}}'\n"
                        "generation_kwargs:\n  until: [STOP]\n  max_gen_toks: 8\n  do_sample: false\n"
                        "metric_list:\n  - metric: exact_match\n",
}


def random_byte_model(make_cfg, folder: Path) -> efficia.LoadedModel:
    """A tiny byte-level gpt with every weight random (its greedy text varies, unlike a briefly trained one's),
    exported as a folder: the harness loads it like any checkpoint."""
    cfg = OmegaConf.to_container(make_cfg("model=gpt", "scale=tiny", "tokenizer=byte"), resolve=True)
    net = randomise(build_tiny("gpt", vocab_size=ByteTokenizer().vocab_size), gain=3.0).eval()
    efficia.save_pretrained(efficia.LoadedModel(net, ByteTokenizer(), cfg), folder)
    return efficia.from_pretrained(folder)


def write_tasks(folder: Path, stop: str) -> None:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        body = body.replace("STOP", json.dumps(stop))
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {data}\ntest_split: test\n{body}")


def direct_logprob(model: efficia.LoadedModel, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = F.log_softmax(model.net(ids[:, :-1])[0].double(), -1)
    return sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation))


def test_harness_tasks_equal_a_direct_computation(make_cfg, tmp_path: Path) -> None:
    model = random_byte_model(make_cfg, tmp_path / "model")
    enc = model.tokenizer.encode
    greedy = {d["question"]: model.generate(d["question"], max_new_tokens=8, temperature=0)[0][len(d["question"]):]
              for d in DOCS}
    first = greedy[DOCS[0]["question"]]
    cut = next(i for i in range(1, len(first)) if first[i] not in first[:i])
    stop = first[cut]  # the first document's generation stops at its first new character after the first
    write_tasks(tmp_path, stop)
    out = harness_main([f"ckpt={tmp_path / 'model'}", f"tasks={','.join(TASKS)}", f"include_path={tmp_path}",
                        "builtin_tasks=false", "batch_size=2", f"output={tmp_path / 'results.json'}"])
    samples = out["samples"]
    assert all(len(samples[name]) == len(DOCS) for name in TASKS)
    correct = 0
    for s in samples["efficia_choice"]:
        doc, requests = DOCS[s["doc_id"]], s["arguments"]
        # each request is the harness's (context, " " + choice)
        expected = [direct_logprob(model, enc(a[0]), enc(a[1])) for a in requests]
        assert [float(r[0][0]) for r in s["resps"]] == pytest.approx(expected, rel=1e-5)
        correct += max(range(len(expected)), key=expected.__getitem__) == doc["answer"]
    for s in samples["efficia_rolling"]:
        text = DOCS[s["doc_id"]]["text"]
        assert float(s["resps"][0][0]) == pytest.approx(direct_logprob(model, [model.tokenizer.eot], enc(text)),
                                                        rel=1e-5)
    for s in samples["efficia_generate"]:
        assert s["resps"][0][0] == greedy[DOCS[s["doc_id"]]["question"]].split(stop)[0]
    assert len(first.split(stop)[0]) == cut
    results = out["results"]
    assert results["efficia_choice"]["acc,none"] == pytest.approx(correct / len(DOCS))
    assert math.isfinite(results["efficia_rolling"]["bits_per_byte,none"])
    assert json.loads((tmp_path / "results.json").read_text())["results"]["efficia_choice"]["acc,none"] == \
        results["efficia_choice"]["acc,none"]


def test_unknown_task_is_one_line(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        harness_main([f"ckpt={tmp_path}", "tasks=nope", f"include_path={tmp_path}", "builtin_tasks=false"])
    assert "unknown task(s) nope" in capsys.readouterr().err

"""`sample.py quantize=int8`: dynamic int8 Linear layers for every registered model, through the real CLI path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from efficia.errors import ConfigError
from efficia.inference.quantize import check_mode, quantize_int8
from efficia.inference.sampling_cli import sample
from efficia.models.construction import keeps_float
from efficia.training.run import train
from tests.conftest import EXTERNAL_TABLE, TINY_VOCAB, build_tiny, require_data

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("gpt",), ("yinggem",), ("efficia",), ("optimus",), ("optimus", "model.decode=expanded"),
         ("efficientlm",), ("efficientlm", f"model.external.source={EXTERNAL_TABLE}"), ("lumenspark",)]


def float_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear]


@pytest.mark.parametrize("case", CASES, ids=" ".join)
def test_int8_model_stays_close_and_decodes_like_itself(case: tuple[str, ...]) -> None:
    model = build_tiny(*case).eval()
    idx = torch.randint(TINY_VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(idx)
        quantize_int8(model)
        logits = model(idx)
        cache = model.new_cache(2)
        cached = torch.cat([model(idx[:, :12], cache=cache)]
                           + [model(idx[:, i:i + 1], cache=cache) for i in range(12, 20)], dim=1)
    # every Linear is int8 except those a model reads as matrices (marked keep_float)
    assert all(keeps_float(m) for m in float_linears(model))
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    assert (logits - reference).norm() / reference.norm() < 0.05  # int8 rounding, not a different model
    # activations are quantized per call, so a cached token and the full forward round slightly differently
    torch.testing.assert_close(cached, logits, atol=0.05, rtol=0)
    assert (cached.argmax(-1) == logits.argmax(-1)).float().mean() > 0.95


def test_quantize_values_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"quantize='int4': give int8"):
        check_mode("int4", torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"quantize=int8 runs on a CPU only"):
        check_mode("int8", torch.device("cuda"))
    check_mode(None, torch.device("cuda"))


def test_sample_cli_quantize_int8(make_cfg, capsys) -> None:
    require_data()
    run = train(make_cfg("debug=limit", "logger=csv", "trainer.max_steps=5"))
    capsys.readouterr()  # the training run's own output
    out = sample(make_cfg(f"ckpt={run['last_ckpt']}", "prompt=ROMEO:", "max_new_tokens=20", "seed=0",
                          "quantize=int8", config_name="sample"))
    assert out[0].startswith("ROMEO:") and len(out[0]) == 26
    assert capsys.readouterr().out.strip() == out[0].strip()
    with pytest.raises(ConfigError, match="give int8"):
        sample(make_cfg(f"ckpt={run['last_ckpt']}", "quantize=int4", config_name="sample"))

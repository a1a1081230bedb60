"""experiment=compare_long: every model on the same long byte sequences, each for the same wall-clock budget."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from efficia.training.run import train
from tests.conftest import CONF, require_data


def test_compare_long_is_every_model_at_the_same_long_context(make_cfg) -> None:
    sweep = OmegaConf.load(CONF / "experiment" / "compare_long.yaml").hydra
    assert sweep.mode == "MULTIRUN" and sweep.sweeper.params.model == "glob(*)"  # a new model joins by its yaml
    assert "/hydra/sweeper" in str(OmegaConf.load(CONF / "experiment" / "compare_long.yaml").defaults)  # the protocol
    cfg = make_cfg("experiment=compare_long")
    assert cfg.model.max_seq_len == cfg.data.seq_len == 1024
    assert cfg.tokenizer.kind == "byte" and cfg.data._target_.endswith("WikipediaDataModule")
    assert cfg.trainer.max_time and cfg.scheduler.min_lr_ratio == 1.0  # no cosine to finish under a time budget
    for model in sorted(p.stem for p in (CONF / "model").glob("*.yaml")):
        assert make_cfg("experiment=compare_long", f"model={model}").model.max_seq_len == 1024


def test_a_time_budget_ends_with_a_validation_of_the_final_weights(make_cfg) -> None:
    """max_time stops the run mid-schedule: its last record is still a validation at the final step, so the
    equal-time comparison reports the weights each model reached, not an earlier checkpoint's."""
    require_data()
    cfg = make_cfg("experiment=compare_long", "scale=tiny", "model.max_seq_len=64", "data.val_bytes=4000",
                   "trainer.max_time=00:00:00:04", "trainer.val_check_interval=100000", "logger=csv")
    result = train(cfg)
    assert 0 < result["global_step"] < cfg.trainer.max_steps
    record = json.loads((Path(cfg.output_dir) / "run_record.json").read_text())
    assert record["val"][-1]["step"] == result["global_step"]

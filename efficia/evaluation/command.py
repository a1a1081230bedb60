"""python -m efficia.evaluate ckpt=<.ckpt or folder> [data=<data config or text file>] [window=N] [stride=N]

Loss (nats/token), perplexity and bits per byte of a trained model, plus val/recall_acc on recall data (MQAR).
ckpt: a .ckpt, an export folder or a GPT-2 transformers folder; several, ckpt=[a,b,c], give a comparison table.
data (default: the checkpoint's own data config): evaluated on its whole held-out split with the training code's
  validation (without data=, this reproduces the run's final val/loss); data=<name> (conf/data/<name>.yaml, e.g.
  shakespeare, wikipedia, mqar) evaluates on that data's held-out split, with the model's tokenizer;
  data=<path to a text file> scores every token of the file with a sliding window (Hugging Face's perplexity
  guide): windows of `window` tokens (default: the model's context) every `stride` tokens (default: window / 2).
batch_size: windows per forward for a text file (default 8). device: cpu (default), cuda, auto.
Prints one JSON line per checkpoint, then a Markdown table.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf, open_dict

from efficia.cli import command_options, run_cli
from efficia.errors import ConfigError

if TYPE_CHECKING:  # torch and the models load only once there is something to evaluate (--help stays quick)
    import torch

    from efficia.inference.loading import LoadedModel

OPTIONS = {"ckpt": None, "data": None, "window": None, "stride": None, "batch_size": 8, "device": "cpu"}
METRICS = ("loss", "ppl", "bpb", "recall_acc")


def text_file_metrics(model: LoadedModel, path: Path, window: int | None, stride: int | None,
                      batch_size: int) -> dict[str, Any]:
    import torch

    from efficia.evaluation.sliding import token_nats

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"data={path} is not UTF-8 text; give a plain-text file or a data config name") from None
    context = model.net.max_seq_len
    window = window or context
    if not 1 <= window <= context:
        raise ConfigError(f"window={window}: give a whole number of tokens between 1 and the model's context "
                          f"{context}")
    stride = stride or max(1, window // 2)
    ids = torch.tensor(model.tokenizer.encode(text), dtype=torch.long)
    nats = token_nats(model.net, ids, window, stride, batch_size).double()
    n_bytes = model.tokenizer.token_byte_lengths()[ids[1:]].double().sum().item()
    loss = nats.mean().item()
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nats.sum().item() / n_bytes / math.log(2),
            "tokens": int(nats.numel()), "window": window, "stride": stride}


def data_config(model: LoadedModel, data: str | None, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The data config to evaluate on and the run config it belongs to: the checkpoint's own, or conf/data/<name>
    with the model's context and tokenizer."""
    from efficia.config import CONF_DIR, compose_run

    run = OmegaConf.to_container(model.cfg, resolve=True) if OmegaConf.is_config(model.cfg) else dict(model.cfg)
    if data is None:
        if "data" not in run:
            raise ConfigError(f"{where} is an exported folder and holds no data config; give data=<name> or "
                              "data=<text file>")
        return run["data"], run
    names = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
    if data not in names:
        raise ConfigError(f"data={data} is neither a file nor a data config; give a text file or one of "
                          f"{', '.join(names)}")
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        cfg = compose_run([f"data={data}", "scale=seed"], out)
        with open_dict(cfg):
            cfg.model = run["model"]  # ${model.max_seq_len}: the data's windows fit the model's context
    composed = OmegaConf.to_container(cfg, resolve=True)
    return composed["data"], {**composed, **{k: v for k, v in run.items() if k != "data"}}


def held_out_metrics(model: LoadedModel, data: str | None, where: str, device: torch.device) -> dict[str, Any]:
    """The training code's validation (the same loaders, loss and metrics) on a data config's held-out split."""
    import lightning as L
    from hydra.utils import instantiate

    from efficia.config import train_defaults
    from efficia.training.init_from import check_tokenizer
    from efficia.training.module import TrainingModule
    from efficia.training.run import quiet_lightning

    data_cfg, run = data_config(model, data, where)
    defaults = train_defaults()
    run = {"loss": defaults["loss"], "nonfinite_loss": defaults["nonfinite_loss"], **run, "data": data_cfg}
    datamodule = instantiate(OmegaConf.create(data_cfg), tokenizer=run.get("tokenizer") or model.cfg["tokenizer"])
    datamodule.prepare()
    check_tokenizer(model, datamodule.tokenizer, where)
    module = TrainingModule(run, model.tokenizer.state())
    module.net.load_state_dict(model.net.state_dict())
    trainer_cfg = run.get("trainer") or {}
    quiet_lightning()
    lightning_log = logging.getLogger("lightning.pytorch")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # no "GPU available" lines around the JSON; the caller's level after
    try:
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            precision=trainer_cfg.get("precision", "32-true") if data is None else "32-true",
                            limit_val_batches=trainer_cfg.get("limit_val_batches", 1.0) if data is None else 1.0)
        (metrics,) = trainer.validate(module, datamodule=datamodule, verbose=False)[:1]
    finally:
        lightning_log.setLevel(level)
    return {k.removeprefix("val/"): float(v) for k, v in metrics.items() if k.removeprefix("val/") in METRICS}


def evaluate_one(path: str, data: str | None, options: dict[str, Any]) -> dict[str, Any]:
    from efficia.inference.loading import pick_device
    from efficia.inference.pretrained import load_any

    device = pick_device(options["device"])
    model = load_any(path, device=str(device))
    if data is not None and Path(data).expanduser().is_file():
        metrics = text_file_metrics(model, Path(data).expanduser(), options["window"], options["stride"],
                                    options["batch_size"])
    else:
        metrics = held_out_metrics(model, data, path, device)
    return {"ckpt": path, "model": model.cfg["model"]["name"], "params": model.net.num_params(),
            "data": data or "its own held-out split", **metrics}


def markdown(rows: list[dict[str, Any]]) -> str:
    columns = ["ckpt", "model", "params", "data", *(m for m in METRICS if any(m in r for r in rows))]
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def evaluate(options: dict[str, Any]) -> list[dict[str, Any]]:
    ckpts = options["ckpt"] if isinstance(options["ckpt"], list) else [options["ckpt"]]
    for key in ("window", "stride", "batch_size"):
        value = options[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{key}={value!r}: give a whole number >= 1")
    data = None if options["data"] is None else str(options["data"])
    rows = [evaluate_one(str(path), data, options) for path in ckpts]
    for row in rows:
        print(json.dumps(row))
    print(markdown(rows))
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = sys.argv[1:] if argv is None else argv

    def run(_: None) -> list[dict[str, Any]]:
        options, _rest = command_options(args, __doc__, OPTIONS, required=("ckpt",))
        return evaluate(options)

    return run_cli(run, None)

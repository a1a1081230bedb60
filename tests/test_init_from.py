"""`init_from=`: a new run starts from trained weights of every source kind (a .ckpt, an export folder, a format=hf
folder, a GPT-2 transformers folder): its first training loss is the source model's loss on the same batch; a key
that changes a weight's shape, another architecture or another tokenizer is refused in one line; `train_only`
trains the chosen parameters only. GPT-2 folders load with logits equal to transformers' own GPT2LMHeadModel."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

import efficia
from efficia.build import read_checkpoint
from efficia.config import compose_run
from efficia.errors import CheckpointError, ConfigError
from efficia.training.run import train
from tests.conftest import require_data
from tests.trained_like import randomise

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ("logger=csv", "scale=tiny", "trainer.log_every_n_steps=1", "trainer.num_sanity_val_steps=0",
       "trainer.limit_val_batches=1", "data.batch_size=4", "callbacks.loss_curve=null")


@pytest.fixture(scope="module")
def source_ckpt(tmp_path_factory) -> str:
    """A tiny char gpt trained a few steps (its weights are off their init)."""
    require_data()
    out = tmp_path_factory.mktemp("source")
    return train(compose_run([*RUN, "trainer.max_steps=3", "optimizer.lr=3e-2"], out / "run"))["last_ckpt"]


def first_batch_loss(ckpt: str, model: efficia.LoadedModel) -> float:
    """The source model's loss on the first training batch of the run that wrote `ckpt` (an independent forward)."""
    run = read_checkpoint(ckpt)["hyper_parameters"]["cfg"]
    datamodule = instantiate(OmegaConf.create(run["data"]), tokenizer=run["tokenizer"])
    datamodule.prepare()
    datamodule.setup("fit")
    x, y = next(iter(datamodule.train_dataloader()))
    with torch.no_grad():
        logits = model.net.eval()(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def gpt2_folder(out: Path, **sizes) -> Path:
    """A GPT-2-shaped transformers folder with every tensor random (biases and LayerNorms included)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(**{"n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 32, **sizes})
    torch.manual_seed(0)
    model = randomise(transformers.GPT2LMHeadModel(config), gain=1.0).eval()
    model.save_pretrained(str(out))
    return out


@pytest.mark.parametrize("kind", ["ckpt", "export", "hf"])
def test_first_step_loss_is_the_source_models_loss(kind: str, source_ckpt: str, make_cfg, tmp_path: Path) -> None:
    source = {"ckpt": source_ckpt,
              "export": lambda: efficia.save_pretrained(source_ckpt, tmp_path / "export"),
              "hf": lambda: efficia.save_pretrained(source_ckpt, tmp_path / "hf", format="hf")}[kind]
    source = str(source if isinstance(source, str) else source())
    # the model comes from the source (scale=small's sizes are not used); a model key that keeps the math applies
    cfg = make_cfg(*RUN, f"init_from={source}", "trainer.max_steps=1", "scale=small",
                   "model.gradient_checkpointing=true")
    result = train(cfg)
    expected = first_batch_loss(result["last_ckpt"], efficia.load(source_ckpt))
    assert result["metrics"]["train/loss"] == pytest.approx(expected, rel=1e-5)
    assert result["global_step"] == 1
    saved = read_checkpoint(result["last_ckpt"])["hyper_parameters"]["cfg"]
    there = read_checkpoint(source_ckpt)["hyper_parameters"]["cfg"]["model"]
    assert saved["model"] == {**there, "gradient_checkpointing": True} and saved["data"]["seq_len"] == 32


def test_gpt2_folder_loads_every_tensor_with_transformers_logits(tmp_path: Path) -> None:
    """Both layouts: what GPT2LMHeadModel.save_pretrained writes, and the hub's (no `transformer.` prefix, the
    causal-mask buffers stored): logits equal transformers' own to 1e-4, and it samples."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    folder = gpt2_folder(tmp_path / "gpt2", activation_function="gelu_new")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "config.json").write_text((folder / "config.json").read_text())
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(str(folder / "model.safetensors")).items()}
    tensors.update({f"h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)) for i in range(2)})
    save_file(tensors, str(hub / "model.safetensors"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(str(folder)).eval()
    idx = torch.randint(50257, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=idx).logits
    for path in (folder, hub):
        model = efficia.from_pretrained(path)
        assert model.cfg["model"]["gelu"] == "tanh" and model.cfg["model"]["pos_emb"] == "learned"
        with torch.no_grad():
            assert (model.net(idx) - expected).abs().max().item() < 1e-4
    text = model.generate("Hello", max_new_tokens=5, temperature=0)[0]
    with torch.no_grad():  # greedy: the first new token is transformers' argmax after the prompt
        prompt = torch.tensor([model.tokenizer.encode("Hello")])
        first = theirs(input_ids=prompt).logits[0, -1].argmax().item()
    assert text.startswith("Hello" + model.tokenizer.decode([first]))


def test_gpt2_folder_as_init_from(tmp_path: Path, make_cfg) -> None:
    folder = gpt2_folder(tmp_path / "gpt2")
    cfg = make_cfg(*RUN, f"init_from={folder}", "tokenizer=gpt2", "trainer.max_steps=1", "model.dropout=0.0",
                   "data.batch_size=2")
    result = train(cfg)
    assert result["metrics"]["train/loss"] == pytest.approx(first_batch_loss(result["last_ckpt"],
                                                                                efficia.from_pretrained(folder)),
                                                            rel=1e-5)


@pytest.mark.parametrize(("override", "message"), [
    ("model.d_model=64", "model.d_model=64 changes its weights' shapes"),
    ("model.ffn_hidden=100", "model.ffn_hidden=100 changes its weights' shapes"),
    ("model.gelu=tanh", "model.gelu='tanh' changes what its weights compute"),
    ("model=optimus", "drop model=optimus"),
    ("tokenizer=byte", "was trained with tokenizer char65, this run's tokenizer= and data give byte"),
    ("train_only=[nothing*]", "train_only=['nothing*'] matches no parameter"),
])
def test_refused_in_one_line(override: str, message: str, source_ckpt: str, make_cfg) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        train(make_cfg(*RUN, f"init_from={source_ckpt}", override))
    assert "\n" not in str(info.value)


def test_refused_sources(tmp_path: Path, make_cfg) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        train(make_cfg(*RUN, f"init_from={tmp_path / 'nope.ckpt'}"))
    with pytest.raises(ConfigError, match="give init_from"):
        train(make_cfg(*RUN, "train_only=[lm_head.*]"))
    folder = gpt2_folder(tmp_path / "small-vocab", vocab_size=300)
    with pytest.raises(CheckpointError, match="vocab_size=300 is not GPT-2's 50257"):
        efficia.from_pretrained(folder)


def test_train_only_moves_the_chosen_parameters_only(source_ckpt: str, make_cfg) -> None:
    result = train(make_cfg(*RUN, f"init_from={source_ckpt}", "trainer.max_steps=2", "train_only=['*norm*']"))
    before, after = (efficia.load(p).net.state_dict() for p in (source_ckpt, result["last_ckpt"]))
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all("norm" in k for k in moved)
    assert {k for k in before if "norm" in k} == moved

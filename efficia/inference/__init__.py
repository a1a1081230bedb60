"""Inference: everything done with a trained model. `loading` rebuilds a model from a checkpoint
(`efficia.load`); `generate` is cached decoding with the sampling processors; `quantize` int8 Linear layers;
`sampling_cli` what `python sample.py` does; `pretrained` export folders (`save_pretrained`, `from_pretrained`);
`export` the `python -m efficia.export` command; `hf/` Hugging Face transformers folders."""

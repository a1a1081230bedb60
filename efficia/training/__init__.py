"""Training: everything a `python train.py` run is made of. `run.train` composes data, model and Trainer from the
config; `module.TrainingModule` is the LightningModule (loss, validation metrics, optimizer and schedule);
`callbacks` the loss curve, tokens/s + MFU and progress lines; `checkpointing` atomic checkpoint writing, signals
and NaN handling; `resume` where a run lives and what it may resume from; `hardware` the GPU presets' memory
budget and micro-batch search; `throughput` FLOPs per token and hardware peaks; `sweep` each job's record and a
multirun's comparison report."""

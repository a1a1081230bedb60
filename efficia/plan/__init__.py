"""The GPU plan, from a CPU: will a train.py run fit a GPU preset, at which micro-batch, how fast. measure.py runs
one training step on fake tensors and counts its memory by part at the peak; choose.py applies the preset's fit
rule to those measurements (micro-batch, accumulation, gradient checkpointing, validation batch) and adds the step
time (`plan_run`, the `Plan`); report.py prints a plan and what to change when it does not fit; command.py holds
the two doors (`python -m efficia.plan`, `python train.py plan=true`); table.py the docs table of every seed recipe
(docs/gpu-plan.md); __main__.py the command line. Imports go one way, in that order."""

"""Measuring a trained model anywhere: `python -m efficia.evaluate` (a checkpoint's own held-out split, any data
config, or a text file with a sliding window) and the lm-evaluation-harness model `efficia` (harness.py)."""

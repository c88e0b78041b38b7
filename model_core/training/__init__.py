"""Two-stage training of CTMLLM (``python -m model_core.train``): config, data, stages, checkpoints.

See ``model_core.train`` for the loop and docs/TRAINING.md for how to run it.
"""

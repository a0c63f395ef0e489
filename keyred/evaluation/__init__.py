"""Evaluation: lm-eval tasks and runner, length extrapolation."""

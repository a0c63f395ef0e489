"""Evaluation: its settings, the local lm-eval tasks (tasks), lm-eval on the in-process model
(runner), and length extrapolation (extrapolation)."""

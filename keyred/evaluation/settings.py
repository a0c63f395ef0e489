"""What to evaluate: the frozen settings of the `evaluate` config section (light: no torch)."""

from __future__ import annotations

import dataclasses

from keyred.config import require, section_settings
from keyred.evaluation.tasks import RECALL_KEY_LETTERS

SECTION = "evaluate"


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
    """What to evaluate (the schema states every default and range; build with evaluate_settings).

    tasks: local (offline) tasks, hub_tasks: tasks that need network access; each is run once,
    in the order given. max_documents: held-out documents scored by heldout_perplexity (the
    first ones). max_length: lm-eval's context window in tokens (rolling windows, left-truncated
    contexts). extrapolation_factor, extrapolation_sequences: windows of factor x training context;
    extrapolation_sources: hub datasets cut into longer chunks (empty: none).
    bootstrap_iters: resamples of the seeded bootstrap of standard errors (keyred.evaluation.uncertainty).
    """

    tasks: tuple[str, ...]
    hub_tasks: tuple[str, ...]
    max_documents: int
    last_word_samples: int
    recall_samples: int
    recall_pairs: int
    batch_size: int
    max_length: int
    extrapolation_factor: int
    extrapolation_sequences: int
    extrapolation_sources: dict        # name -> hub source (keyred.evaluation.extrapolation.extrapolation_sources)
    seed: int
    bootstrap_iters: int

    def __post_init__(self):
        for name in ("tasks", "hub_tasks"):
            object.__setattr__(self, name, tuple(dict.fromkeys(getattr(self, name))))  # each task once, in order
        require(self.recall_pairs <= 26 ** RECALL_KEY_LETTERS, f"{SECTION}.recall_pairs",
                f"at most {26 ** RECALL_KEY_LETTERS}, got {self.recall_pairs}")


def evaluate_settings(values: dict | None) -> EvaluateSettings:
    """EvaluateSettings from a mapping of `evaluate` keys (e.g. the --spec; the others take the
    schema's defaults); ConfigError naming an unknown or out-of-range key."""
    return section_settings(EvaluateSettings, SECTION, values)

"""Accuracy vs length per group, and the group x configuration outcome grid."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred.figures.tracking import plot_accuracy_vs_length, plot_outcome_grid  # noqa: E402

curves = pd.read_csv(snakemake.input.curves)
summary = pd.read_csv(snakemake.input.summary)
for group, figure in zip(snakemake.params.groups, snakemake.output.per_group):
    plot_accuracy_vs_length(curves, group, figure)
plot_outcome_grid(summary, snakemake.output.grid)

"""Recall (MQAR) tables and figures: training curves, capacity curves, the reduction table, its
summary over seeds, and the two figures (keyred.figures.recall)."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402
from keyred.figures.recall import (capacity_table, plot_recall_capacity, plot_recall_reduction,  # noqa: E402
                                   recall_summary)

reduction = combine_tables(snakemake.input.reduction)
capacity = capacity_table(combine_tables(snakemake.input.capacity), reduction)
io.write_csv(snakemake.output.training, combine_tables(snakemake.input.history))
io.write_csv(snakemake.output.capacity, capacity)
io.write_csv(snakemake.output.reduction, reduction)
io.write_csv(snakemake.output.summary, recall_summary(reduction, snakemake.params.pairs))
plot_recall_reduction(reduction, snakemake.params.pairs, snakemake.output.fig_reduction)
plot_recall_capacity(capacity, snakemake.output.fig_capacity)

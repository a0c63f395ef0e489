"""Combine the per-model training-loss tables into one table and draw the loss curves."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred.figures.common import combine_tables  # noqa: E402
from keyred.figures.training import plot_training_loss  # noqa: E402

table = combine_tables(snakemake.input)
plot_training_loss(table, table_path=snakemake.output.table, figure_path=snakemake.output.figure)

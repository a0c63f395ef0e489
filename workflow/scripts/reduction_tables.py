"""The key-reduction comparison: unpruned baselines and every (model, method, ratio) before and
after LoRA in one table, and quality vs ratio per method."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred import io  # noqa: E402
from keyred.figures.reduction import plot_reduction, reduction_table  # noqa: E402

table = reduction_table(snakemake.input.baselines, snakemake.input.reduced)
io.write_csv(snakemake.output.table, table)
plot_reduction(table, snakemake.output.figure)

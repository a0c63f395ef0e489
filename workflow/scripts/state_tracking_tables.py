"""Concatenate the state-tracking runs' curves and summaries into two tidy tables."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402

io.write_csv(snakemake.output.curves, combine_tables(snakemake.input.curves))
io.write_csv(snakemake.output.summary, combine_tables(snakemake.input.summaries))

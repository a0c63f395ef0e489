"""Combine the per-model evaluation and length-extrapolation tables; draw loss vs position."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402
from keyred.figures.training import extrapolation_blocks, plot_length_extrapolation  # noqa: E402

io.write_csv(snakemake.output.results, combine_tables(snakemake.input.results))
extrapolation = combine_tables(snakemake.input.extrapolation)
io.write_csv(snakemake.output.extrapolation, extrapolation)
io.write_csv(snakemake.output.blocks, extrapolation_blocks(extrapolation, snakemake.params.context))
plot_length_extrapolation(extrapolation, snakemake.params.context, snakemake.output.figure)

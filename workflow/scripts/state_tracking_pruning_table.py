"""Concatenate the key-pruning tables of the state-tracking runs into one tidy table."""
import sys

sys.stderr = open(snakemake.log[0], "w")

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402

io.write_csv(snakemake.output[0], combine_tables(snakemake.input))

"""Effective rank of the state over a word problem, every state-tracking run."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred.figures.tracking import plot_effective_rank_over_time  # noqa: E402

plot_effective_rank_over_time(pd.read_csv(snakemake.input[0]), snakemake.output[0])

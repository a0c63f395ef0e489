"""The grid of longest lengths solved by the state trackers unpruned, pruned and recovered."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred.figures.tracking_pruning import plot_pruning_grid  # noqa: E402

plot_pruning_grid(pd.read_csv(snakemake.input[0]), snakemake.output[0])

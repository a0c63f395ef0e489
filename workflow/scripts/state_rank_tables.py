"""State-rank tables and figures of the language models: the full per-token table, its mean per
checkpoint, layer and head, utilisation over time and per layer/head (the unpruned model and
every method at analysis.ratio), and utilisation vs perplexity over every method and ratio."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402
from keyred.figures.ranks import (plot_utilisation_heatmap, plot_utilisation_over_time,  # noqa: E402
                            plot_utilisation_vs_perplexity, rank_summary)

ranks = combine_tables(snakemake.input.ranks)
io.write_csv(snakemake.output.full, ranks)
io.write_csv(snakemake.output.summary, rank_summary(ranks))
shown = ranks[(ranks["method"] == "none") | (ranks["ratio"].round(6) == round(snakemake.params.ratio, 6))]
plot_utilisation_over_time(shown, snakemake.output.over_time)
plot_utilisation_heatmap(shown, snakemake.output.heatmap)
rho = plot_utilisation_vs_perplexity(ranks, pd.read_csv(snakemake.input.reduction[0]), snakemake.output.scatter)
print(f"Spearman rho of utilisation vs word perplexity: {rho:.3f}", file=sys.stderr)

"""State-rank tables and figures of the language models: the full per-token table, its mean per
checkpoint, layer and head, utilisation over time and per layer/head (the unpruned model and
every method at analysis.ratio), standardised utilisation vs perplexity over every method and
ratio with Spearman's rho per model (and its table), and the effective rank by token position of
every unpruned model."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred import io  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402
from keyred.figures.ranks import (plot_effective_rank_by_model, plot_utilisation_heatmap,  # noqa: E402
                                  plot_utilisation_over_time, plot_utilisation_vs_perplexity, rank_summary)

ranks = combine_tables(snakemake.input.ranks)
io.write_csv(snakemake.output.full, ranks)
io.write_csv(snakemake.output.summary, rank_summary(ranks))
shown = ranks[(ranks["method"] == "none") | (ranks["ratio"].round(6) == round(snakemake.params.ratio, 6))]
plot_utilisation_over_time(shown, snakemake.output.over_time)
plot_utilisation_heatmap(shown, snakemake.output.heatmap)
correlations = plot_utilisation_vs_perplexity(ranks, pd.read_csv(snakemake.input.reduction[0]),
                                              snakemake.output.scatter)
io.write_csv(snakemake.output.correlation, correlations)
print(f"Spearman rho of utilisation vs word perplexity:\n{correlations.to_string(index=False)}", file=sys.stderr)
plot_effective_rank_by_model(ranks, snakemake.output.effective_rank)

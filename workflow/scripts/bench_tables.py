"""Benchmark tables and figures: speed-up and memory ratio vs d_k (mixer and decoding), and,
when models were reduced, the whole-model table and the quality vs speed Pareto plot."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred import io  # noqa: E402
from keyred.figures.bench import plot_key_dim_scaling, plot_quality_vs_speed  # noqa: E402
from keyred.figures.common import combine_tables  # noqa: E402

mixer = pd.read_csv(snakemake.input.mixer)
decode = pd.read_csv(snakemake.input.decode)
io.write_csv(snakemake.output.mixer, mixer)
io.write_csv(snakemake.output.decode, decode)
plot_key_dim_scaling(mixer, decode, snakemake.output.scaling, snakemake.params.reference_key_dim)
if snakemake.input.models:  # models were reduced (these inputs and outputs are lists, empty otherwise)
    models = combine_tables(snakemake.input.models)
    io.write_csv(snakemake.output.models[0], models)
    plot_quality_vs_speed(models, pd.read_csv(snakemake.input.reduction[0]), snakemake.output.pareto[0])

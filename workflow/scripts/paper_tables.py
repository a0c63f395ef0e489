"""The KeyReduction paper's table of each model family, as CSV and Markdown, from the reduction table."""
import sys

sys.stderr = open(snakemake.log[0], "w")

import pandas as pd  # noqa: E402

from keyred import io  # noqa: E402
from keyred.figures.paper import family_tables, markdown_table  # noqa: E402

tables = family_tables(pd.read_csv(snakemake.input.table), snakemake.params.families)
for family, (csv_path, markdown_path) in snakemake.params.outputs.items():
    io.write_csv(csv_path, tables[family])
    io.write_text(markdown_path, markdown_table(tables[family]))

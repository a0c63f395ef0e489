"""Tables and figures drawn from the stages' tidy CSV outputs (no torch), one module per
experiment: training, reduction, ranks, tracking, bench; common holds the shared helpers."""

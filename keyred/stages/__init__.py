"""Entry points: one module per stage, each holding its command line (`main(argv) -> int`) and
nothing else; `keyred <stage> ...` (keyred.cli) and the workflow rules (`python -m
keyred.stages.<stage>`) call them. No library module imports this package."""

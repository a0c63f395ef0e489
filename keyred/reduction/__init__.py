"""Key reduction: pruning methods, strong RRQR, the per-model sweep."""

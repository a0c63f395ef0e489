"""keyred's launch choices for fla's CUDA kernels."""

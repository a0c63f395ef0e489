"""keyred's launch choices for fla's CUDA kernels (chunk size at small d_k, an autotuned decode launch)."""

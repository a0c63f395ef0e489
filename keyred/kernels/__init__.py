"""Pure-torch kernels that stand in for fla's Triton kernels on CPU.

`delta_rule` holds the chunked (WY-form) delta rule, gated delta rule and delta product;
`layers` holds norms, short convolutions, SwiGLU and cross-entropy. `keyred.fla.backend` routes
fla's call sites here when the tensors are not on a GPU.
"""

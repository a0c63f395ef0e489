"""Every name inside fla that keyred replaces, in one table (read in fla 0.6.0).

fla's modules look their kernels up by name in their own namespace at call time, so a name
replaced there changes what the next call runs. Each row of SITES names one such place and what
keyred does with it; every use of a site derives from this table:

- `cpu`: off the GPU (no CUDA tensor among the arguments) the function "package.module:function"
  runs instead of fla's Triton kernel (keyred.fla.backend, the CPU seam); `refuse` instead names
  a feature keyred has no torch code for (NotImplementedError off the GPU, naming `refused_in`).
- `family`: a delta-rule op that family's layer calls; keyred.bench records which of them ran and
  keyred.analysis.recording captures their inputs.
- `chunk_launch` / `decode_launch`: where keyred.fla.launch puts its launch choices.

How the replacements stack. keyred.fla.patching makes every replacement, and each one wraps
whatever the site holds at that moment, so they nest in the order they are made, innermost first:

1. the CPU seam (keyred.fla.backend.use_torch_kernels_off_gpu), installed at import of
   keyred.fla.models and never removed: a dispatcher around fla's own function;
2. launch choices (keyred.fla.launch.chunk_launch / decode_launch), for a `with` block: they
   wrap the dispatcher (chunk_launch) or stand in for fla's launcher (decode_launch);
3. recorders and spies (keyred.bench's kernel record, keyred.analysis.recording), for a `with`
   block, outermost: they wrap the launch choice.

A call therefore passes recorder -> launch choice -> seam dispatcher -> fla's Triton kernel (CUDA
tensors) or keyred's torch code (anything else). Each block puts back exactly the object it found
when it ends, so blocks opened in this order unwind in reverse; a block opened in another order
still restores correctly, it only wraps in that other order.

Importing this module is cheap (no torch, no fla).
"""

from __future__ import annotations

import dataclasses

SUPPORTED_FLA_VERSION = "0.6.0"  # flash-linear-attention + fla-core; every row below was read in it


@dataclasses.dataclass(frozen=True)
class Site:
    """fla reads `attribute` ("name" or "Class.method") from `module` at call time."""

    module: str
    attribute: str
    cpu: str | None = None         # "package.module:function" run instead off the GPU
    refuse: str | None = None      # the feature a NotImplementedError names off the GPU ...
    refused_in: str | None = None  # ... and the fla class whose code makes that call
    family: str | None = None      # the family whose layer calls this delta-rule op
    chunk_launch: bool = False     # a chunked op that takes chunk_size (keyred.fla.launch.chunk_launch)
    decode_launch: bool = False    # fla's fused-recurrent forward launcher (keyred.fla.launch.decode_launch)

    @property
    def where(self) -> str:
        return f"{self.module}.{self.attribute}"


_LAYERS = "keyred.kernels.layers"
_OPS = "keyred.fla.torch_ops"
_ATTNRES = "attnres (config.attnres_block_size)"

SITES: tuple[Site, ...] = (
    # RMSNorm.forward: attn_norm, mlp_norm and the final norm (fuse_norm=True), and the layers'
    # o_norm without an output gate (use_gate=False / use_output_gate=False).
    Site("fla.modules.norm.layernorm", "rms_norm", cpu=f"{_LAYERS}:rms_norm"),
    # FusedRMSNormGated.forward: the layers' o_norm with an output gate.
    Site("fla.modules.norm.fused_norm_gate", "rms_norm_gated", cpu=f"{_LAYERS}:rms_norm_gated"),
    # ShortConvolution.forward: the q/k/v short convolutions (any T with autograd, T > 1 without).
    Site("fla.modules.causal_conv1d.ops", "causal_conv1d", cpu=f"{_LAYERS}:causal_conv1d"),
    # ShortConvolution.step: one token per sequence without autograd (cached decoding); updates
    # the conv cache in place.
    Site("fla.modules.causal_conv1d.ops", "causal_conv1d_update", cpu=f"{_LAYERS}:causal_conv1d_update"),
    # GatedDeltaNet.forward: one convolution over concatenated q/k/v when there is no cache.
    Site("fla.layers.gated_deltanet", "causal_conv1d", cpu=f"{_LAYERS}:causal_conv1d"),
    # GatedMLP.forward with fuse_swiglu=False (down_proj applied after it by nn.Linear).
    Site("fla.modules.mlp", "swiglu", cpu=f"{_LAYERS}:swiglu"),
    # SwiGLULinear.forward: GatedMLP with fuse_swiglu=True.
    Site("fla.modules.mlp", "swiglu_linear", cpu=f"{_LAYERS}:swiglu_linear"),
    # GatedMLP.forward with hidden_act='powlu', fuse_swiglu=False / True.
    Site("fla.modules.mlp", "powglu", cpu=f"{_LAYERS}:powglu"),
    Site("fla.modules.mlp", "powglu_linear", cpu=f"{_LAYERS}:powglu_linear"),
    # FLAForCausalLM loss with fuse_cross_entropy=True (the method also asserts CUDA tensors).
    Site("fla.modules.fused_cross_entropy.ops", "FusedCrossEntropyLoss.forward",
         cpu=f"{_LAYERS}:fused_cross_entropy_forward"),
    # FLAForCausalLM loss with fuse_linear_cross_entropy=True (optionally with use_l2warp).
    Site("fla.modules.fused_linear_cross_entropy.ops", "FusedLinearCrossEntropyLoss.forward",
         cpu=f"{_LAYERS}:fused_linear_cross_entropy_forward"),
    # DeltaNet.forward: chunk mode for q_len > 64; fused_recurrent for q_len <= 64, also in training.
    Site("fla.layers.delta_net", "chunk_delta_rule", cpu=f"{_OPS}:chunk_delta_rule", family="delta_net",
         chunk_launch=True),
    Site("fla.layers.delta_net", "fused_recurrent_delta_rule", cpu=f"{_OPS}:fused_recurrent_delta_rule",
         family="delta_net"),
    # GatedDeltaNet.forward: chunk with autograd or q_len > 64, fused_recurrent otherwise.
    Site("fla.layers.gated_deltanet", "chunk_gated_delta_rule", cpu=f"{_OPS}:chunk_gated_delta_rule",
         family="gated_deltanet"),
    Site("fla.layers.gated_deltanet", "fused_recurrent_gated_delta_rule",
         cpu=f"{_OPS}:fused_recurrent_gated_delta_rule", family="gated_deltanet"),
    # GatedDeltaProduct.forward: chunk with autograd or q_len > 64; otherwise the gated delta rule
    # over T * n sub-steps with the queries on every n-th one.
    Site("fla.layers.gated_deltaproduct", "chunk_gated_delta_product", cpu=f"{_OPS}:chunk_gated_delta_product",
         family="gated_deltaproduct"),
    Site("fla.layers.gated_deltaproduct", "fused_recurrent_gated_delta_rule",
         cpu=f"{_OPS}:fused_recurrent_gated_delta_rule", family="gated_deltaproduct"),
    # The blocks' and FLAModel's attention residuals: Triton-only in fla, not provided by keyred.
    Site("fla.models.delta_net.modeling_delta_net", "fused_attnres", refuse=_ATTNRES, refused_in="DeltaNet"),
    Site("fla.models.gated_deltanet.modeling_gated_deltanet", "fused_attnres", refuse=_ATTNRES,
         refused_in="GatedDeltaNet"),
    Site("fla.models.gated_deltaproduct.modeling_gated_deltaproduct", "fused_attnres", refuse=_ATTNRES,
         refused_in="GatedDeltaProduct"),
    Site("fla.models.modeling_utils", "fused_attnres", refuse=_ATTNRES, refused_in="FLAModel"),
    # The launcher DeltaNet's fused-recurrent autograd function calls for its forward (decoding).
    Site("fla.ops.delta_rule.fused_recurrent", "fused_recurrent_delta_rule_fwd", decode_launch=True),
)

CPU_SITES = tuple(site for site in SITES if site.cpu or site.refuse)        # the seam (keyred.fla.backend)
DELTA_RULE_OPS = tuple(site for site in SITES if site.family)              # recorded by bench and analysis
CHUNK_LAUNCH_SITES = tuple(site for site in SITES if site.chunk_launch)    # keyred.fla.launch.chunk_launch
(DECODE_LAUNCH_SITE,) = (site for site in SITES if site.decode_launch)     # keyred.fla.launch.decode_launch

# The launch choices keyred.fla.launch offers: keyred's, or fla's own (to compare against).
LAUNCHES = ("keyred", "fla")

"""Stage: speed and memory of fla models and mixers at reduced key dims (DESIGN.md 2.4).

    python -m keyred.bench.run model --out model.csv --name deltanet_small \
        --checkpoints results/models/deltanet_small/checkpoint \
        --reductions results/reduction/deltanet_small/drrqr --batch 8 --seq-len 2048
    python -m keyred.bench.run model --out shapes.csv --families delta_net --size 1.3B \
        --key-dims 128 64 32 --batch 8 --seq-len 2048
    python -m keyred.bench.run mixer --out mixer.csv --families delta_net gated_deltanet --hidden 2048 \
        --heads 16 --value-dim 128 --key-dims 128 64 32 --batch 8 --seq-len 2048
    python -m keyred.bench.run decode --out decode.csv --families delta_net --size 1.3B \
        --key-dims 128 64 32 --batches 1 16 64 256 --prompt-len 16 --steps 128

Three kinds, each writing one tidy CSV with the columns COLUMNS (a column that does not apply to
a kind is empty):
- model: the whole causal LM's forward (no grad, logits of every position) at one batch x length,
  for every model given, one after the other in one process: checkpoints (--checkpoints), the
  ratio*/pruned checkpoints of keyred.reduction.sweep outputs (--reductions), and random-weight shapes.
- mixer: one linear-attention layer (the family's block builds it, as in the model) on random
  hidden states [B, T, D], 'forward' (no grad) and 'forward+backward' (gradients of the layer's
  parameters and input) timed separately.
- decode: prefill a random prompt with use_cache=True, then generate `steps` tokens one at a time
  (greedy) from the cache; only the decode steps are timed. seq_len is the number of steps,
  latency is per decode step and tokens/s counts batch x steps. The state bytes per sequence are
  summed from the cache's tensors
  after decoding: the recurrent states [B, H, d_k, d_v] (float32 in fla and keyred), the short-conv
  caches [B, C, conv_size] and anything else the cache holds.

Shapes: a random-weight model or mixer is ModelShape(family, hidden, layers, heads, d_k, d_v).
--size takes a family's named architecture (keyred.checkpoints.ARCHITECTURES, e.g. 1.3B) as the base;
--hidden, --layers, --heads, --value-dim override it and --key-dims lists the d_k to measure at a
fixed d_v. Without --size every shape option must be given. DeltaNet sets
expand_k = H d_k / hidden and expand_v = H d_v / hidden, the gated families head_dim = d_k and
expand_v = d_v / d_k (keyred.reduction.prune.exact_ratio, as pruned checkpoints do).

Timing: every repeat first runs an untimed preparation (for decode, the prefill), synchronises,
then times the call: CUDA events on the GPU, perf_counter on the CPU. `warmup` calls come first
and are excluded (fla compiles and autotunes its Triton kernels in the first calls of a shape);
latency is the median (with min and max) of `repeats` timed calls, tokens/s = tokens of one call
/ median latency; warmup_s is the wall time of the warm-up calls (on a fresh Triton cache mostly
compilation and autotuning, minutes per new shape). dtype 'auto' is bfloat16 on CUDA (fla's chunk
kernels reject float32) and float32 on the CPU.

Memory: peak_mem_bytes over the timed repeats (their preparation included); peak_mem_kind says
what it is: 'cuda_max_allocated' (torch.cuda.max_memory_allocated, weights included),
'cpu_rss_peak_delta' (growth of the process's peak resident set over the resident set at the start,
Linux, weights excluded), or 'unavailable' (NaN). estimated_mem_bytes is the rough estimate made
before any work (weights, activations of one layer, logits, caches); a request whose estimate is
above the free GPU memory (torch.cuda.mem_get_info) or the available RAM (MemAvailable) is refused
with the numbers, and an out-of-memory error during a run is re-raised naming the shape. So is
a gated backward that fla 0.6.0 itself refuses on Hopper GPUs with triton < 3.7.1.

Kernels: the last warm-up call runs with record_kernels(), which spies on the delta-rule ops the
fla layer modules call (LAYER_OPS). `kernel` names the ops the layers requested (fla switches
DeltaNet to fused_recurrent_delta_rule for q_len <= 64, and the gated layers without autograd),
`kernel_backend` the code that ran them: 'triton' (fla's kernels, CUDA tensors) or 'keyred-torch'
(keyred.fla.backend's torch kernels off the GPU).

Launch (--kernel-launch, CUDA only): 'keyred' (the default) runs fla's kernels with keyred's
choices, 'fla' with fla's own, so the two can be compared: DeltaNet's fused-recurrent forward
through keyred.kernels.cuda.decode_launch (an autotuned launch) and DeltaNet's chunked op without
autograd through keyred.kernels.cuda.chunk_launch (chunks of 32 tokens for d_k <= 64). --cuda-graph
(mixer forward, decoding) captures the timed call in a CUDA graph and replays it: GPU time
without Python and launch overhead, which otherwise dominates at these layer sizes. The `launch`
column says which, e.g. 'cuda-graph, keyred, chunk 32'.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from keyred.console import add_torch_options, bad_input, progress, torch_device
from keyred.config import ConfigError
from keyred.kernels.cuda.chunk_launch import chunk_launch, chunk_size_for
from keyred.kernels.cuda.decode_launch import LAUNCHES, decode_launch
from keyred.checkpoints import CheckpointError
from keyred.fla.families import DEFAULT_VOCAB_SIZE, FAMILIES, SIZES

KINDS = ("model", "mixer", "decode")
PASSES = ("forward", "forward+backward")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
MAX_CUDA_KEY_DIM = 256  # fla's chunk kernels assert K <= 256
REDUCED_STAGE = "pruned"  # the checkpoint of a keyred.reduction.sweep ratio folder that --reductions benchmarks
STATE_BYTES = 4  # fla and keyred keep recurrent states in float32

# The delta-rule ops each fla layer module looks up at call time (and keyred.fla.backend routes off the GPU).
LAYER_OPS: dict[str, tuple[str, ...]] = {
    "fla.layers.delta_net": ("chunk_delta_rule", "fused_recurrent_delta_rule"),
    "fla.layers.gated_deltanet": ("chunk_gated_delta_rule", "fused_recurrent_gated_delta_rule"),
    "fla.layers.gated_deltaproduct": ("chunk_gated_delta_product", "fused_recurrent_gated_delta_rule"),
}
# The block (one model layer) of each family; its `attn` is the mixer.
BLOCKS = {
    "delta_net": "fla.models.delta_net.modeling_delta_net:DeltaNetBlock",
    "gated_deltanet": "fla.models.gated_deltanet.modeling_gated_deltanet:GatedDeltaNetBlock",
    "gated_deltaproduct": "fla.models.gated_deltaproduct.modeling_gated_deltaproduct:GatedDeltaProductBlock",
}

COLUMNS = (
    "kind", "model", "label", "family", "method", "ratio", "stage", "checkpoint",
    "d_k", "d_v", "hidden_size", "num_layers", "num_heads", "parameters",
    "batch", "seq_len", "prompt_len", "pass", "launch", "dtype", "device", "device_name",
    "kernel", "kernel_backend", "warmup", "warmup_s", "repeats",
    "latency_ms_median", "latency_ms_min", "latency_ms_max", "tokens_per_s",
    "peak_mem_bytes", "peak_mem_kind", "estimated_mem_bytes",
    "state_bytes_per_seq", "recurrent_state_bytes_per_seq", "conv_state_bytes_per_seq",
    "seed", "torch_version", "fla_version", "triton_version",
)


class BenchmarkError(ValueError):
    """A benchmark request that cannot run as asked (refused before any work)."""


class InsufficientMemoryError(BenchmarkError):
    """A shape that does not fit in the device's memory (estimated before, or out of memory during a run)."""


# ------------------------------------------------------------------------------------ shapes

@dataclasses.dataclass(frozen=True)
class ModelShape:
    """A random-weight fla causal LM: d_k and d_v per head. Settings other than these (gates,
    Householder steps, MLP ratio, short convs) come from the family's `template` size."""

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    key_dim: int
    value_dim: int
    vocab_size: int = DEFAULT_VOCAB_SIZE
    template: str = "tiny"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise BenchmarkError(f"unknown family {self.family!r}; allowed families: {', '.join(FAMILIES)}")
        if self.template not in SIZES:
            raise BenchmarkError(f"unknown size {self.template!r}; allowed sizes: {', '.join(SIZES)}")
        for name in ("hidden_size", "num_layers", "num_heads", "key_dim", "value_dim", "vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchmarkError(f"{name} must be an integer >= 1, got {value!r}")


def value_head_dim(config) -> int:
    """d_v of an fla config (object or namespace): DeltaNet from expand_v, the gated families
    head_dim * expand_v (truncated, as fla does)."""
    if config.model_type == "delta_net":
        return int(config.hidden_size * config.expand_v) // config.num_heads
    return int(config.head_dim * config.expand_v)


def base_shape(family: str, size: str, vocab_size: int = DEFAULT_VOCAB_SIZE) -> ModelShape:
    """The shape of a family at a named size (keyred.checkpoints.ARCHITECTURES)."""
    from keyred.fla.families import architecture, key_head_dim

    keys = SimpleNamespace(model_type=family, **architecture(family, size))
    return ModelShape(family=family, hidden_size=keys.hidden_size, num_layers=keys.num_hidden_layers,
                      num_heads=keys.num_heads, key_dim=key_head_dim(keys), value_dim=value_head_dim(keys),
                      vocab_size=vocab_size, template=size)


def shape_config(shape: ModelShape):
    """The fla config of a shape (imports fla)."""
    from keyred.fla.families import architecture, key_head_dim
    from keyred.reduction.prune import exact_ratio

    config_class = _fla_config_classes()[shape.family]
    keys = {**architecture(shape.family, shape.template), "hidden_size": shape.hidden_size,
            "num_hidden_layers": shape.num_layers, "num_heads": shape.num_heads}
    if shape.family == "delta_net":
        keys["expand_k"] = exact_ratio(shape.num_heads * shape.key_dim, shape.hidden_size)
        keys["expand_v"] = exact_ratio(shape.num_heads * shape.value_dim, shape.hidden_size)
    else:
        keys["head_dim"] = shape.key_dim
        keys["expand_v"] = exact_ratio(shape.value_dim, shape.key_dim)
    config = config_class(**keys, vocab_size=shape.vocab_size)
    if (key_head_dim(config), value_head_dim(config)) != (shape.key_dim, shape.value_dim):
        raise BenchmarkError(f"{shape} gives d_k {key_head_dim(config)}, d_v {value_head_dim(config)} in fla")
    return config


def shape_of(config) -> ModelShape:
    """The ModelShape of an fla config (template 'tiny': only the shape fields are read back)."""
    from keyred.fla.families import key_head_dim

    return ModelShape(family=config.model_type, hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                      num_heads=config.num_heads, key_dim=key_head_dim(config), value_dim=value_head_dim(config),
                      vocab_size=config.vocab_size)


def _fla():
    """Import fla's models (~8 s; registers them with transformers) and route its call sites to
    keyred's torch kernels off the GPU."""
    import fla.models

    from keyred.fla.backend import use_torch_kernels_off_gpu

    use_torch_kernels_off_gpu()
    return fla.models


def _fla_config_classes() -> dict:
    fla_models = _fla()
    return {"delta_net": fla_models.DeltaNetConfig, "gated_deltanet": fla_models.GatedDeltaNetConfig,
            "gated_deltaproduct": fla_models.GatedDeltaProductConfig}


# ----------------------------------------------------------------------------------- sources

@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model of a model or decode benchmark: a checkpoint folder, or (checkpoint None) random
    weights of `config`. method, ratio, stage: the key reduction it descends from ('none', 0.0 for
    an unreduced model; ratio NaN for a random shape)."""

    label: str
    config: Any
    checkpoint: Path | None
    method: str
    ratio: float
    stage: str


def checkpoint_source(path: str | Path) -> ModelSource:
    """A checkpoint to benchmark, read from its config.json and keyred.json (no weights loaded);
    CheckpointError naming the problem when it is not a readable fla checkpoint."""
    from transformers import AutoConfig

    from keyred.checkpoints import METADATA_FILE, read_info
    from keyred.reduction.prune import earlier_pruning

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CheckpointError(f"checkpoint {path} is not a checkpoint folder (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"checkpoint {path} has no weights (*.safetensors)")
    _fla()
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path}: unreadable config.json ({error})") from None
    if config.model_type not in FAMILIES:
        raise CheckpointError(f"checkpoint {path} is a {config.model_type!r} model; keyred benchmarks "
                              f"{', '.join(FAMILIES)}")
    info = read_info(path) if (path / METADATA_FILE).is_file() else None
    pruning = earlier_pruning(info.extra) if info is not None else None
    method, ratio = (pruning["method"], float(pruning["ratio"])) if pruning else ("none", 0.0)
    label = "baseline" if pruning is None else f"{method} {ratio:g}"
    return ModelSource(label=label, config=config, checkpoint=path, method=method, ratio=ratio,
                       stage=info.stage if info is not None else "external")


def reduction_checkpoints(folder: str | Path) -> list[Path]:
    """The ratio*/pruned checkpoints of a keyred.reduction.sweep output folder, by ratio."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"reduction folder {folder} does not exist")
    found = []
    for ratio_folder in folder.glob("ratio*"):
        try:
            ratio = float(ratio_folder.name.removeprefix("ratio"))
        except ValueError:
            continue
        found.append((ratio, ratio_folder / REDUCED_STAGE))
    if not found:
        raise CheckpointError(f"reduction folder {folder} holds no ratio*/{REDUCED_STAGE} checkpoints "
                              f"(not a keyred.reduction.sweep output?)")
    return [path for _, path in sorted(found)]


def shape_source(shape: ModelShape) -> ModelSource:
    """Random weights of a shape."""
    label = f"{shape.family} d_k {shape.key_dim}"
    return ModelSource(label=label, config=shape_config(shape), checkpoint=None, method="none",
                       ratio=math.nan, stage="random")


def instantiate(source: ModelSource, device: str, dtype: str, seed: int):
    """The model of a source on `device` in `dtype`, in eval mode (random weights seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from keyred.checkpoints import load_checkpoint

    if source.checkpoint is not None:
        model, _ = load_checkpoint(source.checkpoint, device=device, dtype=_torch_dtype(dtype))
        return model.eval()
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(source.config)
    return model.to(_torch_dtype(dtype)).eval()


def parameter_count(config) -> int:
    """Parameters of the causal LM of an fla config, counted on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def mixer_layer(config, device: str | None = None, seed: int = 0):
    """The family's linear-attention layer, as the model's first block builds it (block.attn), on
    `device` ('meta' counts parameters without memory), float32, eval mode."""
    import torch

    module, _, name = BLOCKS[config.model_type].partition(":")
    _fla()
    block_class = getattr(importlib.import_module(module), name)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        layer = block_class(config, layer_idx=0).attn
    return layer.eval()


# ------------------------------------------------------------------------------------ memory

def _intermediate_size(config) -> int:
    return getattr(config, "intermediate_size", None) or int(config.hidden_size * (config.hidden_ratio or 4))


def layer_bytes_per_token(config, element: int) -> int:
    """Rough transient bytes per token of one layer's forward (an upper bound: torch frees most of
    them at once): projections and short-conv outputs of q, k (n keys for n Householder steps) and
    v, the output and its gate, residual stream, MLP, and the chunk kernels' float32 intermediates
    (per-chunk states of 64 tokens, WY factors)."""
    shape = shape_of(config)
    heads, d_k, d_v, hidden = shape.num_heads, shape.key_dim, shape.value_dim, shape.hidden_size
    steps = getattr(config, "num_householder", 1)
    qkv = heads * d_k + steps * heads * (d_k + d_v)
    activations = element * (2 * hidden + 2 * qkv + heads * d_v + 2 * _intermediate_size(config))
    kernels = 4 * (heads * 64 + steps * heads * (d_k + d_v) + heads * d_k * d_v // 64 + 1)
    return activations + kernels


def state_bytes_per_sequence(config, element: int) -> tuple[int, int]:
    """(recurrent, conv) cache bytes of one sequence: layers x heads x d_k x d_v float32 states,
    and the q, k (n keys), v short-conv caches of conv_size positions in the model dtype."""
    shape = shape_of(config)
    steps = getattr(config, "num_householder", 1)
    recurrent = shape.num_layers * shape.num_heads * shape.key_dim * shape.value_dim * STATE_BYTES
    channels = shape.num_heads * shape.key_dim + steps * shape.num_heads * (shape.key_dim + shape.value_dim)
    conv = shape.num_layers * channels * config.conv_size * element if config.use_short_conv else 0
    return recurrent, conv


def estimate_forward_bytes(config, parameters: int, batch: int, seq_len: int, element: int,
                           logits_per_sequence: int | None = None) -> int:
    """Estimated peak bytes of a causal LM forward without grad: weights, residual stream, one
    layer's transients and the logits in the model dtype (all positions unless `logits_per_sequence`)."""
    tokens = batch * seq_len
    logits = batch * (seq_len if logits_per_sequence is None else logits_per_sequence) * config.vocab_size
    return (parameters * element + tokens * (2 * config.hidden_size * element + layer_bytes_per_token(config, element))
            + logits * element)


def estimate_mixer_bytes(config, parameters: int, batch: int, seq_len: int, element: int, backward: bool) -> int:
    """Estimated peak bytes of one layer: weights, input/output, the layer's transients; with
    backward, weight gradients and three times the activations (saved, gradients, recomputation)."""
    activations = batch * seq_len * (2 * config.hidden_size * element + layer_bytes_per_token(config, element))
    if backward:
        return 2 * parameters * element + 3 * activations
    return parameters * element + activations


def estimate_decode_bytes(config, parameters: int, batch: int, prompt_len: int, element: int) -> int:
    """Estimated peak bytes of decoding: the prefill forward (last logits only) and the cache, its
    recurrent states twice (a step writes new states before the cache lets go of the old ones)."""
    recurrent, conv = state_bytes_per_sequence(config, element)
    return (estimate_forward_bytes(config, parameters, batch, prompt_len, element, logits_per_sequence=1)
            + batch * (2 * recurrent + conv))


def available_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, where): torch.cuda.mem_get_info on CUDA, MemAvailable on Linux CPUs; None when unknown."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return free, f"on {torch.cuda.get_device_name()} ({_gib(total)} in all)"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "of RAM (MemAvailable)"
    except OSError:
        pass
    return None, "of RAM (unknown)"


def check_memory(estimate: int, device: str, what: str) -> None:
    """InsufficientMemoryError naming the numbers when `estimate` bytes exceed the free memory."""
    free, where = available_memory(device)
    if free is not None and estimate > free:
        raise InsufficientMemoryError(f"{what} needs an estimated {_gib(estimate)} but only {_gib(free)} is free "
                                      f"{where}; use a smaller batch or length")


@contextlib.contextmanager
def out_of_memory_as_error(what: str) -> Iterator[None]:
    """Turn an out-of-memory error of torch (CUDA) or of the CPU allocator into an
    InsufficientMemoryError naming `what` (the model and shape)."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as error:
        raise InsufficientMemoryError(f"out of memory while running {what}: {str(error).splitlines()[0]}; "
                                      f"use a smaller batch or length") from None
    except RuntimeError as error:
        if "can't allocate memory" not in str(error):
            raise
        raise InsufficientMemoryError(f"out of memory while running {what}: {str(error).splitlines()[0]}; "
                                      f"use a smaller batch or length") from None


class PeakMemory:
    """Peak memory over a region (see the module docstring for the kinds): start(), then stop()
    returns (bytes, kind)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = "unavailable"
        self.start_rss = 0

    def start(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda_max_allocated"
            return
        try:  # writing 5 resets the peak resident set size (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.start_rss = _proc_status_bytes("VmRSS")
            self.kind = "cpu_rss_peak_delta"
        except (OSError, KeyError, ValueError):
            self.kind = "unavailable"

    def stop(self) -> tuple[float, str]:
        import torch

        if self.kind == "cuda_max_allocated":
            torch.cuda.synchronize()
            return float(torch.cuda.max_memory_allocated()), self.kind
        if self.kind == "cpu_rss_peak_delta":
            return float(max(0, _proc_status_bytes("VmHWM") - self.start_rss)), self.kind
        return math.nan, self.kind


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _gib(size: float) -> str:
    return f"{size / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------------- kernels

@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One delta-rule op call of an fla layer: the op name fla's layer requested (e.g.
    'chunk_delta_rule') and the backend that ran it ('triton', 'keyred-torch')."""

    op: str
    backend: str


@contextlib.contextmanager
def record_kernels() -> Iterator[list[KernelCall]]:
    """Spy on the ops of LAYER_OPS in the fla layer modules' namespaces; yield the list of calls
    made inside the block (the previous functions are restored after it)."""
    _fla()
    calls: list[KernelCall] = []
    saved = []
    try:
        for module_name, ops in LAYER_OPS.items():
            module = importlib.import_module(module_name)
            for op in ops:
                function = getattr(module, op)
                saved.append((module, op, function))
                setattr(module, op, _spy(op, function, calls))
        yield calls
    finally:
        for module, op, function in reversed(saved):
            setattr(module, op, function)


def _spy(op: str, function: Callable, calls: list[KernelCall]) -> Callable:
    @functools.wraps(function)
    def spy(*args, **kwargs):
        calls.append(KernelCall(op, _backend(function, args, kwargs)))
        return function(*args, **kwargs)

    return spy


def _backend(function: Callable, args: tuple, kwargs: dict) -> str:
    """'triton' for CUDA tensors (keyred.fla.backend's dispatchers call fla's original there),
    'keyred-torch' where keyred's dispatcher runs its torch kernel, else 'fla'."""
    import torch

    if any(isinstance(value, torch.Tensor) and value.is_cuda for value in (*args, *kwargs.values())):
        return "triton"
    return "keyred-torch" if hasattr(function, "keyred_call_site") else "fla"


def kernel_columns(calls: list[KernelCall]) -> dict[str, str]:
    """kernel and kernel_backend: the distinct ops and backends, '+'-joined in call order."""
    return {"kernel": "+".join(dict.fromkeys(call.op for call in calls)),
            "kernel_backend": "+".join(dict.fromkeys(call.backend for call in calls))}


# ------------------------------------------------------------------------------------ timing

@dataclasses.dataclass(frozen=True)
class Timing:
    """Untimed warm-up calls (at least one: the kernel record is taken in the last) and timed repeats."""

    warmup: int = 3
    repeats: int = 10

    def __post_init__(self):
        for name in ("warmup", "repeats"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BenchmarkError(f"--{name} must be an integer >= 1, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """Seconds of each timed call, wall seconds of all warm-up calls (compilation and autotuning
    included), the kernels of the last warm-up call, the peak memory."""

    seconds: tuple[float, ...]
    warmup_seconds: float
    kernels: tuple[KernelCall, ...]
    peak_mem_bytes: float
    peak_mem_kind: str

    def columns(self, tokens: int) -> dict[str, Any]:
        """Latency (ms) and tokens/s columns for calls that each process `tokens` tokens."""
        median = statistics.median(self.seconds)
        return {"latency_ms_median": 1e3 * median, "latency_ms_min": 1e3 * min(self.seconds),
                "latency_ms_max": 1e3 * max(self.seconds), "tokens_per_s": tokens / median,
                "warmup_s": self.warmup_seconds,
                "peak_mem_bytes": self.peak_mem_bytes, "peak_mem_kind": self.peak_mem_kind,
                **kernel_columns(list(self.kernels))}


def _synchronize(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _time_call(call: Callable[[], object], device: str) -> float:
    """Seconds of one call: CUDA events around it on the GPU, perf_counter on the CPU."""
    import torch

    _synchronize(device)
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start_time = time.perf_counter()
    call()
    return time.perf_counter() - start_time


def measure(prepare: Callable[[], Callable[[], object]], timing: Timing, device: str) -> Measurement:
    """prepare() sets up one repeat (untimed) and returns the call to time; warm-up calls first
    (the last one with record_kernels), then the timed repeats under PeakMemory."""
    start = time.perf_counter()
    for index in range(timing.warmup):
        call = prepare()
        if index == timing.warmup - 1:
            with record_kernels() as calls:
                call()
        else:
            call()
        del call
    _synchronize(device)
    warmup_seconds = time.perf_counter() - start
    gc.collect()
    peak = PeakMemory(device)
    peak.start()
    seconds = []
    for _ in range(timing.repeats):
        call = prepare()
        seconds.append(_time_call(call, device))
        del call
    peak_bytes, kind = peak.stop()
    return Measurement(seconds=tuple(seconds), warmup_seconds=warmup_seconds, kernels=tuple(calls),
                       peak_mem_bytes=peak_bytes, peak_mem_kind=kind)


# ---------------------------------------------------------------------------------- the rows

def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU; float32 on CUDA is refused (fla's chunk kernels reject it)."""
    if dtype not in DTYPES:
        raise BenchmarkError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    if dtype == "float32" and device == "cuda":
        raise BenchmarkError("float32 on CUDA is not supported: fla's chunk kernels reject float32 inputs; "
                             "use bfloat16 or float16")
    return dtype


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, dtype)


def environment(device: str) -> dict[str, str]:
    """device, device_name and package versions for every row."""
    import torch

    from keyred.checkpoints import package_versions

    versions = package_versions()
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")]
            name = models[0] if models else name
    return {"device": device, "device_name": name, "torch_version": versions["torch"],
            "fla_version": versions["flash-linear-attention"], "triton_version": versions["triton"]}


def _shape_columns(config, parameters: int) -> dict[str, Any]:
    shape = shape_of(config)
    return {"family": shape.family, "d_k": shape.key_dim, "d_v": shape.value_dim, "hidden_size": shape.hidden_size,
            "num_layers": shape.num_layers, "num_heads": shape.num_heads, "parameters": parameters}


def _source_columns(source: ModelSource, name: str) -> dict[str, Any]:
    return {"model": name, "label": source.label, "method": source.method, "ratio": source.ratio,
            "stage": source.stage, "checkpoint": "" if source.checkpoint is None else str(source.checkpoint)}


def table(rows: list[dict]):
    """A DataFrame with exactly COLUMNS (absent values NaN)."""
    import pandas as pd

    unknown = {key for row in rows for key in row} - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown benchmark columns {sorted(unknown)}")
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _random_tokens(vocab_size: int, batch: int, length: int, seed: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, length), generator=generator).to(device)


def _release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _check_key_dim(config, device: str, what: str) -> None:
    key_dim = shape_of(config).key_dim
    if device == "cuda" and key_dim > MAX_CUDA_KEY_DIM:
        raise BenchmarkError(f"{what}: d_k {key_dim} > {MAX_CUDA_KEY_DIM}, which fla's kernels do not support")


def _check_gated_backward(config, device: str, what: str) -> None:
    """fla 0.6.0 refuses the backward of a gated delta rule on Hopper GPUs with triton < 3.7.1
    (chunk_bwd_dqkwg gives wrong results there); refuse before any work instead of mid-run."""
    gated = config.model_type == "gated_deltanet" or getattr(config, "use_forget_gate", False)
    if device != "cuda" or not gated:
        return
    from fla.utils import IS_NVIDIA_HOPPER, TRITON_ABOVE_3_4_0, TRITON_ABOVE_3_7_1

    if IS_NVIDIA_HOPPER and TRITON_ABOVE_3_4_0 and not TRITON_ABOVE_3_7_1:
        import triton

        raise BenchmarkError(f"{what}: fla refuses the gated backward on Hopper GPUs with triton {triton.__version__} "
                             f"(< 3.7.1); install triton >= 3.7.1 or measure --passes forward")


def _check_launch(kind: str) -> None:
    if kind not in LAUNCHES:
        raise BenchmarkError(f"unknown --kernel-launch {kind!r}; allowed: {', '.join(LAUNCHES)}")


def _check_size(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchmarkError(f"--{name} must be an integer >= 1, got {value!r}")


# ------------------------------------------------------------------------------- benchmarks

def measure_forward(model, tokens, timing: Timing, device: str) -> Measurement:
    """The causal LM's forward without grad (logits of every position) on token ids [B, T]."""
    import torch

    def prepare():
        def forward():
            with torch.no_grad():
                model(input_ids=tokens, use_cache=False)
        return forward

    return measure(prepare, timing, device)


def measure_mixer(layer, hidden, which: str, timing: Timing, device: str, seed: int = 0,
                  cuda_graph: bool = False) -> Measurement:
    """One layer on hidden states [B, T, D]: 'forward' without grad (with cuda_graph replayed from
    a CUDA graph), or 'forward+backward' (the output's backward with a fixed random gradient,
    into the parameters and the input)."""
    import torch

    if which == "forward":
        def forward():
            with torch.no_grad():
                layer(hidden)
        if not cuda_graph:
            return measure(lambda: forward, timing, device)
        start = time.perf_counter()
        with record_kernels() as calls:
            graph = capture_cuda_graph(forward)  # its eager calls compile and autotune: part of the warm-up
        capture_seconds = time.perf_counter() - start
        result = measure(lambda: graph.replay, timing, device)
        # the replays call no Python op: the kernels are those recorded while capturing
        return dataclasses.replace(result, kernels=tuple(calls), warmup_seconds=result.warmup_seconds + capture_seconds)
    hidden = hidden.detach().requires_grad_(True)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device, hidden.dtype)

    def prepare_backward():
        hidden.grad = None
        for parameter in layer.parameters():
            parameter.grad = None

        def forward_backward():
            layer(hidden)[0].backward(grad)
        return forward_backward

    return measure(prepare_backward, timing, device)


def measure_decoding(model, prompt, steps: int, timing: Timing, device: str,
                     cuda_graph: bool = False) -> tuple[Measurement, StateBytes]:
    """Prefill prompt [B, P] with use_cache=True (untimed), then time `steps` greedy decode steps
    from the cache; the state bytes are summed from the last repeat's cache after decoding.

    With cuda_graph, one decode step (forward, argmax, next ids) is captured in a CUDA graph after
    three eager steps and replayed `steps` times, so the time is the GPU's alone, without Python
    and kernel-launch overhead. The replays chain because the state is updated in place
    (keyred.kernels.cuda.decode_launch, in_place=True) and the conv caches are updated in place by fla.
    """
    import torch

    last = {}

    def prepare():
        if "replay" in last:  # graph mode: one prefill and capture, the same graph every repeat
            return last["replay"]
        last.pop("cache", None)  # the previous repeat's cache goes before the next prefill
        with torch.no_grad():
            out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, ids = out.past_key_values, out.logits[:, -1:].argmax(-1)
        last["cache"] = cache

        def step():
            ids.copy_(model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1))

        if not cuda_graph:
            def decode():
                with torch.no_grad():
                    for _ in range(steps):
                        step()
            return decode
        with torch.no_grad(), record_kernels() as calls:
            graph = capture_cuda_graph(step)
        last["kernels"] = tuple(calls)

        def replay():
            for _ in range(steps):
                graph.replay()
        last["replay"] = replay
        return replay

    result = measure(prepare, timing, device)
    if cuda_graph:  # the replays call no Python op: the kernels are those recorded while capturing
        result = dataclasses.replace(result, kernels=last["kernels"])
    return result, cache_state_bytes(last["cache"])


@contextlib.contextmanager
def launch_kernels(kind: str, device: str, in_place: bool = False) -> Iterator[None]:
    """Within the block, fla's kernels launch with `kind`'s choices on CUDA (LAUNCHES: keyred's
    decode_launch and chunk_launch, or fla's own); nothing changes off the GPU. in_place: the
    fused-recurrent DeltaNet forward updates the state tensor in place (inference only)."""
    _check_launch(kind)
    if device != "cuda":
        yield
        return
    with decode_launch(kind, in_place=in_place), chunk_launch(kind):
        yield


def launch_label(cuda_graph: bool, kind: str, device: str, result: Measurement, key_dim: int,
                 training: bool = False) -> str:
    """The `launch` column: eager or cuda-graph, keyred / fla (keyred-torch off the GPU), and the
    chunk size when a chunked op ran on CUDA."""
    label = f"{'cuda-graph' if cuda_graph else 'eager'}, {kind if device == 'cuda' else 'keyred-torch'}"
    chunked = [call.op for call in result.kernels if call.op.startswith("chunk_")]
    if device == "cuda" and chunked:
        label += f", chunk {chunk_size_for(chunked[0], key_dim, kind, training)}"
    return label


def capture_cuda_graph(call: Callable[[], object]):
    """call() captured in a CUDA graph, after three eager calls on a side stream (as torch asks)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph


def benchmark_models(sources: list[ModelSource], batch: int, seq_len: int, timing: Timing, device: str,
                     dtype: str = "auto", name: str = "", seed: int = 0, kernel_launch: str = "keyred", log=progress):
    """Whole-model forward (no grad, all logits) of each source at batch x seq_len, in one process,
    with fla's kernels launched as `kernel_launch` on CUDA (see the module docstring).

    Every source's memory is estimated and checked before the first model is built.
    Returns the table (COLUMNS), one row per source.
    """
    _check_size("batch", batch)
    _check_size("seq-len", seq_len)
    _check_launch(kernel_launch)
    if not sources:
        raise BenchmarkError("no models to benchmark: give --checkpoints, --reductions or --families")
    dtype = resolve_dtype(dtype, device)
    element = ELEMENT_BYTES[dtype]
    plans = []
    for source in sources:
        what = f"the forward of {source.label} at batch {batch} x length {seq_len} ({dtype})"
        _check_key_dim(source.config, device, what)
        parameters = parameter_count(source.config)
        estimate = estimate_forward_bytes(source.config, parameters, batch, seq_len, element)
        check_memory(estimate, device, what)
        plans.append((source, parameters, estimate, what))
    env = environment(device)
    rows = []
    for index, (source, parameters, estimate, what) in enumerate(plans, 1):
        log(f"[bench] model {index}/{len(plans)}: {what}, {parameters:,} parameters; warm-up {timing.warmup} "
            f"(the first calls of a shape compile and autotune fla's kernels)")
        with out_of_memory_as_error(what):
            model = instantiate(source, device, dtype, seed)
            tokens = _random_tokens(source.config.vocab_size, batch, seq_len, seed, device)
            with launch_kernels(kernel_launch, device):
                result = measure_forward(model, tokens, timing, device)
        del model, tokens
        _release(device)
        launch = launch_label(False, kernel_launch, device, result, shape_of(source.config).key_dim)
        row = {"kind": "model", **_source_columns(source, name), **_shape_columns(source.config, parameters),
               "batch": batch, "seq_len": seq_len, "pass": "forward", "launch": launch, "dtype": dtype, **env,
               "warmup": timing.warmup, "repeats": timing.repeats, **result.columns(batch * seq_len),
               "estimated_mem_bytes": estimate, "seed": seed}
        rows.append(row)
        log(f"[bench] model {source.label} ({launch}): {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['latency_ms_median']:.2f} ms, kernel {row['kernel']} ({row['kernel_backend']}), peak memory {row['peak_mem_bytes']:.4g} B "
            f"({row['peak_mem_kind']}), warm-up {row['warmup_s']:.1f}s")
    return table(rows)


def benchmark_mixers(shapes: list[ModelShape], batch: int, seq_len: int, timing: Timing, device: str,
                     dtype: str = "auto", passes: tuple[str, ...] = PASSES, seed: int = 0, cuda_graph: bool = False,
                     kernel_launch: str = "keyred", log=progress):
    """One linear-attention layer per shape (its num_layers is ignored) on random hidden states
    [batch, seq_len, hidden], each pass of `passes` timed separately, with fla's kernels launched
    as `kernel_launch` on CUDA; cuda_graph replays the forward pass from a CUDA graph (CUDA only;
    forward+backward stays eager). Returns the table (COLUMNS)."""
    import torch

    _check_size("batch", batch)
    _check_size("seq-len", seq_len)
    _check_launch(kernel_launch)
    if cuda_graph and device != "cuda":
        raise BenchmarkError(f"--cuda-graph needs a CUDA device, but this benchmark runs on {device}; "
                             f"drop --cuda-graph or use --device cuda")
    if not shapes:
        raise BenchmarkError("no mixer shapes: give --families and the shape options")
    unknown = sorted(set(passes) - set(PASSES))
    if unknown or not passes:
        raise BenchmarkError(f"unknown passes {unknown or 'none'}; allowed: {', '.join(PASSES)}")
    dtype = resolve_dtype(dtype, device)
    element = ELEMENT_BYTES[dtype]
    plans = []
    for shape in shapes:
        config = shape_config(dataclasses.replace(shape, num_layers=1))
        parameters = sum(p.numel() for p in mixer_layer(config, "meta").parameters())
        for which in passes:
            what = (f"the {shape.family} mixer (d_k {shape.key_dim}, d_v {shape.value_dim}) {which} at batch "
                    f"{batch} x length {seq_len} ({dtype})")
            _check_key_dim(config, device, what)
            if which != "forward":
                _check_gated_backward(config, device, what)
            estimate = estimate_mixer_bytes(config, parameters, batch, seq_len, element, which != "forward")
            check_memory(estimate, device, what)
            plans.append((shape, config, parameters, which, estimate, what))
    env = environment(device)
    rows = []
    for index, (shape, config, parameters, which, estimate, what) in enumerate(plans, 1):
        log(f"[bench] mixer {index}/{len(plans)}: {what}; warm-up {timing.warmup}")
        with out_of_memory_as_error(what):
            layer = mixer_layer(config, device, seed).to(_torch_dtype(dtype))
            generator = torch.Generator().manual_seed(seed)
            hidden = torch.randn(batch, seq_len, shape.hidden_size, generator=generator)
            graph = cuda_graph and which == "forward"
            with launch_kernels(kernel_launch, device):
                result = measure_mixer(layer, hidden.to(device, _torch_dtype(dtype)), which, timing, device, seed,
                                       graph)
        del layer, hidden
        _release(device)
        launch = launch_label(graph, kernel_launch, device, result, shape.key_dim, training=which != "forward")
        row = {"kind": "mixer", "label": f"{shape.family} d_k {shape.key_dim}", **_shape_columns(config, parameters),
               "batch": batch, "seq_len": seq_len, "pass": which, "launch": launch, "dtype": dtype, **env,
               "warmup": timing.warmup, "repeats": timing.repeats, **result.columns(batch * seq_len), "estimated_mem_bytes": estimate,
               "seed": seed}
        rows.append(row)
        log(f"[bench] mixer {row['label']} {which} ({launch}): {row['tokens_per_s']:,.0f} tok/s, "
            f"{row['latency_ms_median']:.3f} ms, kernel {row['kernel']} ({row['kernel_backend']}), "
            f"warm-up {row['warmup_s']:.1f}s")
    return table(rows)


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes held by a cache over the whole batch: recurrent states, short-conv caches, the rest."""

    recurrent: int
    conv: int
    other: int

    @property
    def total(self) -> int:
        return self.recurrent + self.conv + self.other


def cache_state_bytes(cache) -> StateBytes:
    """Sum the tensors of an fla Cache layer by layer: 'recurrent_state', 'conv_state', any other entry."""
    totals = {"recurrent_state": 0, "conv_state": 0, "other": 0}
    for index in range(len(cache)):
        for key, value in cache[index].items():
            totals[key if key in totals else "other"] += sum(t.numel() * t.element_size() for t in _tensors(value))
    return StateBytes(recurrent=totals["recurrent_state"], conv=totals["conv_state"], other=totals["other"])


def _tensors(value) -> Iterator:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def benchmark_decoding(sources: list[ModelSource], batches: tuple[int, ...], prompt_len: int, steps: int,
                       timing: Timing, device: str, dtype: str = "auto", name: str = "", seed: int = 0,
                       cuda_graph: bool = False, kernel_launch: str = "keyred", log=progress):
    """Greedy cached decoding of `steps` tokens after a random prompt of `prompt_len` tokens, for
    each source and batch size; only the decode steps are timed. Returns the table (COLUMNS):
    latency per decode step, tokens/s = batch x steps / decode time, state bytes per sequence.

    On CUDA, fla's kernels launch as `kernel_launch` (launch_kernels); cuda_graph replays a
    captured decode step (see measure_decoding) and needs CUDA, DeltaNet and the keyred launch
    (its in-place state update)."""
    _check_launch(kernel_launch)
    if cuda_graph:
        refusal = ("it needs a CUDA device" if device != "cuda" else
                   "it needs --kernel-launch keyred (fla's launch writes each step's state to a new tensor)"
                   if kernel_launch != "keyred" else None)
        others = sorted({source.config.model_type for source in sources} - {"delta_net"})
        refusal = refusal or (f"it needs DeltaNet models (the in-place state update exists for DeltaNet's "
                              f"kernel only), not {', '.join(others)}" if others else None)
        if refusal:
            raise BenchmarkError(f"--cuda-graph decoding is not possible here: {refusal}")
    for batch in batches:
        _check_size("batches", batch)
    _check_size("prompt-len", prompt_len)
    _check_size("steps", steps)
    if not sources or not batches:
        raise BenchmarkError("no models or no batch sizes to benchmark")
    dtype = resolve_dtype(dtype, device)
    element = ELEMENT_BYTES[dtype]
    plans = []
    for source in sources:
        parameters = parameter_count(source.config)
        for batch in batches:
            what = f"decoding {source.label} at batch {batch} (prompt {prompt_len}, {steps} steps, {dtype})"
            _check_key_dim(source.config, device, what)
            estimate = estimate_decode_bytes(source.config, parameters, batch, prompt_len, element)
            check_memory(estimate, device, what)
            plans.append((source, parameters, batch, estimate, what))
    env = environment(device)
    rows = []
    for source in sources:
        model = None
        for plan_source, parameters, batch, estimate, what in plans:
            if plan_source is not source:
                continue
            log(f"[bench] decode {len(rows) + 1}/{len(plans)}: {what}; warm-up {timing.warmup}")
            with out_of_memory_as_error(what):
                if model is None:
                    model = instantiate(source, device, dtype, seed)
                prompt = _random_tokens(source.config.vocab_size, batch, prompt_len, seed, device)
                with launch_kernels(kernel_launch, device, in_place=cuda_graph):
                    result, state = measure_decoding(model, prompt, steps, timing, device, cuda_graph)
            launch = launch_label(cuda_graph, kernel_launch, device, result, shape_of(source.config).key_dim)
            if state.total % batch:
                raise BenchmarkError(f"{what}: the cache holds {state.total} bytes, not a multiple of the batch")
            columns = result.columns(batch * steps)
            for key in ("latency_ms_median", "latency_ms_min", "latency_ms_max"):
                columns[key] /= steps
            row = {"kind": "decode", **_source_columns(source, name), **_shape_columns(source.config, parameters),
                   "batch": batch, "seq_len": steps, "prompt_len": prompt_len, "pass": "decode", "launch": launch,
                   "dtype": dtype, **env, "warmup": timing.warmup, "repeats": timing.repeats, **columns,
                   "estimated_mem_bytes": estimate, "state_bytes_per_seq": state.total // batch,
                   "recurrent_state_bytes_per_seq": state.recurrent // batch,
                   "conv_state_bytes_per_seq": state.conv // batch, "seed": seed}
            rows.append(row)
            log(f"[bench] decode {source.label} batch {batch} ({launch}): {row['tokens_per_s']:,.0f} tok/s, "
                f"{row['latency_ms_median']:.3f} ms/step, state {row['state_bytes_per_seq']:,} B/seq, "
                f"kernel {row['kernel']} ({row['kernel_backend']}), warm-up {row['warmup_s']:.1f}s")
        del model
        _release(device)
    return table(rows)


# ----------------------------------------------------------------------------------- the CLI

def shapes_from_options(families: list[str] | None, size: str | None, hidden: int | None, layers: int | None,
                        heads: int | None, key_dims: list[int] | None, value_dim: int | None,
                        vocab_size: int = DEFAULT_VOCAB_SIZE, need_layers: bool = True) -> list[ModelShape]:
    """One ModelShape per family and d_k: the family's `size` (if given) overridden by the explicit
    options; without a size every option must be given (layers only when `need_layers`)."""
    explicit = {"--hidden": hidden, "--layers": layers, "--heads": heads, "--key-dims": key_dims,
                "--value-dim": value_dim}
    if not families:
        given = [option for option, value in explicit.items() if value is not None] + (["--size"] if size else [])
        if given:
            raise BenchmarkError(f"{', '.join(given)} describe random-weight shapes and need --families")
        return []
    if size is None:
        missing = [option for option, value in explicit.items()
                   if value is None and (need_layers or option != "--layers")]
        if missing:
            raise BenchmarkError(f"without --size, random-weight shapes need {', '.join(missing)}")
    shapes = []
    for family in families:
        base = base_shape(family, size, vocab_size) if size else None
        for key_dim in key_dims or [base.key_dim]:
            shapes.append(ModelShape(
                family=family, hidden_size=hidden or base.hidden_size,
                num_layers=layers or (base.num_layers if base else 1), num_heads=heads or base.num_heads,
                key_dim=key_dim, value_dim=value_dim or base.value_dim, vocab_size=vocab_size,
                template=size or "tiny"))
    return shapes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keyred.bench.run", description=__doc__.split("\n\n")[0])
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{model,mixer,decode}")
    helps = {"model": "whole-model forward of checkpoints and shapes at one batch x length",
             "mixer": "one DeltaNet / GatedDeltaNet layer at several d_k, forward and forward+backward",
             "decode": "cached greedy decoding: tokens/s and state bytes per sequence at several batch sizes"}
    for kind in KINDS:
        sub = kinds.add_parser(kind, help=helps[kind], description=helps[kind])
        sub.add_argument("--out", required=True, help="CSV to write")
        if kind != "mixer":
            sub.add_argument("--name", default="", help="model name for the tables (as keyred.reduction.sweep's --name)")
            sub.add_argument("--checkpoints", nargs="+", default=[], help="checkpoint folders")
            sub.add_argument("--reductions", nargs="+", default=[],
                             help=f"keyred.reduction.sweep output folders: each ratio*/{REDUCED_STAGE} checkpoint")
        sub.add_argument("--families", nargs="+", choices=FAMILIES, help="random-weight shapes of these families")
        sub.add_argument("--size", choices=SIZES, help="base shape: the family's named architecture")
        sub.add_argument("--hidden", type=int, help="hidden size")
        if kind != "mixer":
            sub.add_argument("--layers", type=int, help="number of layers")
        sub.add_argument("--heads", type=int, help="number of heads")
        sub.add_argument("--key-dims", type=int, nargs="+", help="d_k per head, one shape each")
        sub.add_argument("--value-dim", type=int, help="d_v per head (fixed)")
        sub.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="vocabulary of random shapes")
        if kind == "decode":
            sub.add_argument("--batches", type=int, nargs="+", required=True, help="batch sizes")
            sub.add_argument("--prompt-len", type=int, default=16, help="prompt tokens (prefill, untimed)")
            sub.add_argument("--steps", type=int, default=128, help="decode steps timed per repeat")
            sub.add_argument("--cuda-graph", action="store_true",
                             help="replay a CUDA graph of one decode step: GPU time without launch overhead "
                                  "(CUDA, DeltaNet)")
        else:
            sub.add_argument("--batch", type=int, required=True)
            sub.add_argument("--seq-len", type=int, required=True)
        if kind == "mixer":
            sub.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES))
            sub.add_argument("--cuda-graph", action="store_true",
                             help="replay the forward pass from a CUDA graph: GPU time without launch overhead (CUDA)")
        sub.add_argument("--kernel-launch", choices=LAUNCHES, default="keyred",
                         help="on CUDA, fla's kernels with keyred's launch choices (DeltaNet: autotuned "
                              "fused-recurrent launch, chunks of 32 for d_k <= 64 without grad) or fla's own")
        sub.add_argument("--warmup", type=int, default=3, help="untimed calls first (kernel autotuning)")
        sub.add_argument("--repeats", type=int, default=10, help="timed calls (the median is reported)")
        sub.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
        sub.add_argument("--seed", type=int, default=0)
        add_torch_options(sub)
    return parser


def run(args: argparse.Namespace, log=progress):
    """The table of one parsed command line (see _parser)."""
    timing = Timing(warmup=args.warmup, repeats=args.repeats)
    shapes = shapes_from_options(args.families, args.size, args.hidden, getattr(args, "layers", None), args.heads,
                                 args.key_dims, args.value_dim, args.vocab_size, need_layers=args.kind != "mixer")
    device = torch_device(args.device, args.threads)
    resolve_dtype(args.dtype, device)
    if args.kind == "mixer":
        return benchmark_mixers(shapes, args.batch, args.seq_len, timing, device, args.dtype, tuple(args.passes),
                                args.seed, args.cuda_graph, args.kernel_launch, log)
    paths = [Path(p) for p in args.checkpoints]
    for folder in args.reductions:
        paths += reduction_checkpoints(folder)
    for path in paths:  # every checkpoint is checked before fla is imported or anything is built
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                                  else f"checkpoint {path} is not a checkpoint folder (no config.json)")
    sources = [checkpoint_source(path) for path in paths] + [shape_source(shape) for shape in shapes]
    if args.kind == "model":
        return benchmark_models(sources, args.batch, args.seq_len, timing, device, args.dtype, args.name, args.seed,
                                args.kernel_launch, log)
    return benchmark_decoding(sources, tuple(args.batches), args.prompt_len, args.steps, timing, device, args.dtype,
                              args.name, args.seed, args.cuda_graph, args.kernel_launch, log)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from keyred import io

    try:
        frame = run(args)
    except (BenchmarkError, CheckpointError, ConfigError) as error:
        return bad_input(error)
    io.write_csv(args.out, frame)
    progress(f"[bench] wrote {len(frame)} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage: state-rank analysis of the recurrent states of trained models (DESIGN 2.5).

    python -m keyred.analysis.stage --checkpoint results/models/deltanet_tiny/checkpoint \
        --checkpoint results/reduction/deltanet_tiny/l1/ratio0.5/lora \
        --packed results/data/packed --seq-len 2048 --out results/analysis/deltanet_tiny.csv

    python -m keyred.analysis.stage --checkpoint results/state_tracking/S3/nh2_neg_L1_seed0 --out s3.csv

For one held-out sequence per checkpoint, the real fla layers run a forward pass (fla's Triton
kernels on CUDA, bf16; keyred's torch kernels on the CPU, float32) while every delta-rule op they
call is wrapped, for the duration of the pass only, by a recorder: it keeps what the layer fed the
op, in the recurrence's own terms (keyred.analysis.measures): q and k L2-normalised where fla normalises
them in kernel, beta after the sigmoid (and the x2 of allow_neg_eigval) wherever the layer or the
kernel applies it, the log decay g = -exp(A_log) softplus(a + dt_bias) of the gated families, the
scale, and the op's output o (before o_norm and o_proj). Both of fla's paths are covered: chunk
and fused-recurrent (which fla takes for <= 64 tokens; Gated DeltaProduct then runs T * n_h
sub-steps with zero queries in between, which the recorder folds back into tokens).

keyred.analysis.measures replays all layers and heads as one float32 batch, reproducing o, and measures
the stable-rank utilisation sr(S) / min(d_k, d_v) and the effective rank exp(H(sigma / sum sigma))
of every state every `--stride` tokens. Unlike the reference implementation, which ignored it,
the replay applies Gated DeltaNet's (and Gated DeltaProduct's) forget gate: S_t = exp(g_t)
S_{t-1} (I - beta k k^T) + beta v k^T; without it the states of the gated families are not the
model's states.

Inputs: language models read the first `--seq-len` tokens of a packed split (`--packed`,
`--split`, default test), or a window at a seeded random offset (`--window-seed`). State-tracking
checkpoints (stage 'state_tracking', or their run folder holding checkpoint/) read one seeded
word problem of their own group (`--seed`): BOS then `--seq-len` elements (default: the run's
test length). The step of a state counts the tokens read, BOS included.

Output: one tidy CSV (`--out`), one row per checkpoint x layer x head x step, columns COLUMNS:
model (`--name`, default the training run's name, or group and configuration for state tracking),
checkpoint, family, stage (unpruned | pruned | lora | state_tracking, as in the evaluation
tables), method and ratio of the key reduction ('none', 0 unpruned), input, layer, head, step,
stable_rank, utilisation, effective_rank, d_k, d_v.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from keyred.console import add_torch_options, bad_input, progress, torch_device
from keyred.config import ConfigError

if TYPE_CHECKING:
    from torch import Tensor

COLUMNS = ("model", "checkpoint", "family", "stage", "method", "ratio", "input", "layer", "head", "step",
           "stable_rank", "utilisation", "effective_rank", "d_k", "d_v")
DEFAULT_SEQ_LEN = 2048        # language-model tokens per analysed sequence (the reference's context)
SVD_DRIVERS = ("gesvd", "gesvdj", "gesvda")
# keyred.json stage -> the stage names of the evaluation tables
STAGES = {"train": "unpruned", "pretrained": "unpruned", "external": "unpruned", "hub": "unpruned",
          "prune": "pruned", "finetune": "lora", "state_tracking": "state_tracking"}
# Where fla's layers look up their delta-rule op at call time: (module, name). The same name in two
# modules is two call sites.
OP_SITES = (
    ("fla.layers.delta_net", "chunk_delta_rule"),
    ("fla.layers.delta_net", "fused_recurrent_delta_rule"),
    ("fla.layers.gated_deltanet", "chunk_gated_delta_rule"),
    ("fla.layers.gated_deltanet", "fused_recurrent_gated_delta_rule"),
    ("fla.layers.gated_deltaproduct", "chunk_gated_delta_product"),
    ("fla.layers.gated_deltaproduct", "fused_recurrent_gated_delta_rule"),
)


class AnalysisError(ValueError):
    """The model or its forward pass is not one the state-rank analysis can record."""


# ---------------------------------------------------------------------------------- recording

@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """What one linear-attention layer fed its delta-rule op for one sequence, float32.

    q [T, H, K] (L2-normalised as the op uses it, before `scale`); k [T*n, H, K]; v [T*n, H, V];
    beta [T*n, H] (activated); g [T, H] log decay per token or None; o [T, H, V]: the op's output.
    Sub-step j of token t at index t*n + j, n = num_householder. Grouped value heads (H_v > H_k)
    appear with q and k repeated per value head, as the kernels use them.
    """

    layer: int
    op: str
    q: Tensor
    k: Tensor
    v: Tensor
    beta: Tensor
    g: Tensor | None
    o: Tensor
    scale: float
    num_householder: int

    @property
    def heads(self) -> int:
        return self.q.shape[1]


def check_family(family: str) -> None:
    """ModelSpecError unless the analysis knows `family` (one of keyred.checkpoints.FAMILIES)."""
    from keyred.fla.families import FAMILIES, ModelSpecError

    if family not in FAMILIES:
        raise ModelSpecError(f"the state-rank analysis does not know the model family {family!r}; "
                             f"allowed families: {', '.join(FAMILIES)}")


def _arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The op's arguments by name, defaults filled in and **kwargs flattened."""
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(arguments.pop(name, {}))
    return arguments


def _layer_record(index: int, op: str, layer, a: dict[str, Any], o) -> LayerRecord:
    """A LayerRecord from the arguments `a` and output o of one op call by `layer`."""
    import torch

    from fla.layers import GatedDeltaProduct

    from keyred.fla.backend import gdn_log_decay
    from keyred.kernels.layers import l2norm

    q, k, v = a["q"], a["k"], a["v"]
    if q.shape[0] != 1:
        raise AnalysisError(f"{op}: the analysis records one sequence at a time, got a batch of {q.shape[0]}")
    if a.get("cu_seqlens") is not None or a.get("initial_state") is not None:
        raise AnalysisError(f"{op}: packed sequences (cu_seqlens) and initial states (a cache) are not recorded; "
                            f"call the model on one unpadded sequence without a cache")
    if a.get("gk") is not None or a.get("gv") is not None:
        raise AnalysisError(f"{op}: per-key / per-value decays (gk, gv) are not part of the delta rule analysed here")
    n = int(a.get("num_householder", 1))
    beta, g = a.get("beta"), a.get("g")
    beta = v.new_ones(v.shape[:3], dtype=torch.float32) if beta is None else beta.float()
    if beta.dim() == v.dim():
        raise AnalysisError(f"{op}: per-value-channel beta [B, T, H, V] is not supported")
    if a.get("use_beta_sigmoid_in_kernel"):
        beta = torch.sigmoid(beta) * (2.0 if a.get("allow_neg_eigval") else 1.0)
    if g is not None:
        g = gdn_log_decay(g, a["A_log"], a.get("dt_bias")) if a.get("use_gate_in_kernel") else g.float()
    if isinstance(layer, GatedDeltaProduct) and op.startswith("fused_recurrent"):
        # T * n sub-steps, the query on the last of each token's, the decay on the first: back to tokens
        n = layer.num_householder
        q, o = q[:, n - 1::n], o[:, n - 1::n]
        g = None if g is None else g[:, ::n]
    if a.get("use_qk_l2norm_in_kernel"):
        q, k = l2norm(q.float()), l2norm(k.float())
    heads, value_heads = q.shape[2], v.shape[2]
    if value_heads > heads:  # grouped value heads: value head j reads q/k head j // (H_v / H)
        q, k = (x.repeat_interleave(value_heads // heads, dim=2) for x in (q, k))
    scale = a.get("scale")
    return LayerRecord(layer=index, op=op, q=q[0].float(), k=k[0].float(), v=v[0].float(), beta=beta[0],
                       g=None if g is None else g[0].float(), o=o[0].float(),
                       scale=float(q.shape[-1] ** -0.5 if scale is None else scale), num_householder=n)


def _recorder(original: Callable, op: str, layers: list, current: list[int], records: list[LayerRecord]):
    """`original` (an op as the layer module sees it), recording each call into `records`."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def record(*args, **kwargs):
        result = original(*args, **kwargs)
        if not current:
            raise AnalysisError(f"{op} was called outside the model's linear-attention layers")
        position = current[-1]
        index = getattr(layers[position], "layer_idx", None)
        records.append(_layer_record(position if index is None else index, op, layers[position],
                                     _arguments(signature, args, kwargs), result[0]))
        return result

    return record


@contextlib.contextmanager
def recording(layers: list, records: list[LayerRecord]) -> Iterator[None]:
    """Within the block, every delta-rule op call made by one of `layers` appends a LayerRecord.

    Forward pre-/post-hooks say which layer is running; the op names in OP_SITES are wrapped in
    fla's layer modules and restored afterwards, whatever happens.
    """
    current: list[int] = []
    handles, patched = [], []

    def leave(module, args, output) -> None:   # returns None: the layer's output is kept
        current.pop()

    try:
        for position, layer in enumerate(layers):
            handles.append(layer.register_forward_pre_hook(lambda module, args, p=position: current.append(p)))
            handles.append(layer.register_forward_hook(leave))
        for module_name, name in OP_SITES:
            module = importlib.import_module(module_name)
            original = getattr(module, name)
            setattr(module, name, _recorder(original, name, layers, current, records))
            patched.append((module, name, original))
        yield
    finally:
        for module, name, original in reversed(patched):
            setattr(module, name, original)
        for handle in handles:
            handle.remove()


def collect_recurrence(model, input_ids) -> list[LayerRecord]:
    """Run `model` (an fla causal LM or its decoder) on input_ids [1, T]; one LayerRecord per
    linear-attention layer, in layer order. ModelSpecError for a family the analysis does not know."""
    import torch

    from keyred.reduction.prune import key_layers

    check_family(getattr(model.config, "model_type", None))
    input_ids = torch.as_tensor(input_ids)
    if input_ids.ndim != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
        raise AnalysisError(f"input_ids must be one sequence [1, T] with T >= 1, got shape {tuple(input_ids.shape)}")
    layers = [layer for _, layer in key_layers(model)]
    if not layers:
        raise AnalysisError(f"{type(model).__name__} has no DeltaNet / GatedDeltaNet / GatedDeltaProduct layers")
    records: list[LayerRecord] = []
    decoder = getattr(model, "model", model)           # the LM head is not needed
    device = next(model.parameters()).device
    with recording(layers, records), torch.no_grad():
        decoder(input_ids=input_ids.to(device), use_cache=False)
    seen = [record.layer for record in records]
    if len(records) != len(layers) or len(set(seen)) != len(seen):
        raise AnalysisError(f"expected one delta-rule op call per layer ({len(layers)} layers), recorded the "
                            f"layers {seen}")
    return sorted(records, key=lambda record: record.layer)


def stack_records(records: list[LayerRecord]):
    """keyred.analysis.measures.DeltaInputs of all layers and heads, batch index = layer position * H + head."""
    import torch

    from keyred.analysis.measures import DeltaInputs

    first = records[0]
    for record in records[1:]:
        if (record.q.shape, record.v.shape, record.num_householder, record.scale, record.g is None) != \
                (first.q.shape, first.v.shape, first.num_householder, first.scale, first.g is None):
            raise AnalysisError(f"layer {record.layer} differs from layer {first.layer} in shape, sub-steps, scale "
                                f"or gating; the layers of one model must agree to be replayed as one batch")

    def heads_first(name: str):
        return torch.cat([getattr(record, name).transpose(0, 1) for record in records])

    return DeltaInputs(q=heads_first("q"), k=heads_first("k"), v=heads_first("v"), beta=heads_first("beta"),
                       g=None if first.g is None else heads_first("g"), num_householder=first.num_householder,
                       scale=first.scale)


def stacked_outputs(records: list[LayerRecord]):
    """The ops' outputs o in the batch order of stack_records: [L * H, T, V]."""
    import torch

    return torch.cat([record.o.transpose(0, 1) for record in records])


# ---------------------------------------------------------------------------------- analysis

def rank_table(trace, records: list[LayerRecord]):
    """Tidy DataFrame of a keyred.analysis.measures.RankTrace over stack_records(records): layer, head,
    step, stable_rank, utilisation, effective_rank, d_k, d_v (one row per layer x head x step)."""
    import pandas as pd

    heads, steps = records[0].heads, trace.steps.numpy()
    batch = len(records) * heads
    return pd.DataFrame({
        "layer": np.repeat([record.layer for record in records], heads * len(steps)),
        "head": np.tile(np.repeat(np.arange(heads), len(steps)), len(records)),
        "step": np.tile(steps, batch),
        "stable_rank": trace.stable_rank.numpy().reshape(-1),
        "utilisation": trace.utilisation.numpy().reshape(-1),
        "effective_rank": trace.effective_rank.numpy().reshape(-1),
        "d_k": trace.key_dim,
        "d_v": trace.value_dim,
    })


def analyse_model(model, input_ids, stride: int = 1, svd_driver: str | None = None, log=None):
    """Collect, replay and measure one sequence input_ids [1, T]: rank_table's DataFrame."""
    from keyred.analysis.measures import replay

    log = log or (lambda message: None)
    start = time.perf_counter()
    records = collect_recurrence(model, input_ids)
    inputs = stack_records(records)
    collected = time.perf_counter() - start
    log(f"[analysis] recorded {len(records)} layers x {records[0].heads} heads (d_k {inputs.key_dim}, d_v "
        f"{inputs.value_dim}, n_h {inputs.num_householder}, {'gated' if inputs.g is not None else 'no gate'}) over "
        f"{inputs.tokens} tokens in {collected:.1f}s")
    trace = replay(inputs, stride=stride, svd_driver=svd_driver, log=log)
    exact = f"; {trace.recomputed} rechecked with the exact SVD" if trace.recomputed else ""
    log(f"[analysis] replay and ranks of {inputs.batch} states x {len(trace.steps)} steps in "
        f"{time.perf_counter() - start - collected:.1f}s{exact}")
    return rank_table(trace, records)


# -------------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass(frozen=True)
class Source:
    """A checkpoint to analyse and the columns that identify it in the tables."""

    path: Path
    name: str
    family: str
    stage: str
    method: str
    ratio: float
    info: Any       # keyred.checkpoints.CheckpointInfo
    vocab_size: int

    @property
    def state_tracking(self) -> bool:
        return self.info.stage == "state_tracking"


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder at `path` (a state-tracking run folder means its checkpoint/).

    CheckpointError when it does not exist or has no config.json; ModelSpecError for a model
    family the analysis does not know.
    """
    from keyred.checkpoints import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not (path / "config.json").is_file() and (path / "checkpoint" / "config.json").is_file():
        path = path / "checkpoint"
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointError(f"checkpoint {path} has no config.json (not a checkpoint folder?)")
    try:
        check_family(json.loads(config.read_text()).get("model_type"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {path}: config.json is not valid JSON ({error})") from None
    return path


def default_name(path: Path, info) -> str:
    """The model column: the group and configuration of a state-tracking run, else the `name` of the
    training run it descends from (following parent checkpoints), else family_size or the folder."""
    from keyred.checkpoints import METADATA_FILE, read_info

    if info.stage == "state_tracking":
        from keyred.tracking.run import StateTrackingModel

        return f"{info.extra['train']['group']} {StateTrackingModel(**info.extra['model']).label}"
    current = info
    for _ in range(16):
        if "name" in current.extra:
            return str(current.extra["name"])
        if not current.parent or not (Path(current.parent) / METADATA_FILE).is_file():
            break
        current = read_info(current.parent)
    return f"{info.family}_{info.size}" if info.size else path.name


def describe_checkpoint(path: str | Path, name: str | None = None) -> Source:
    """Resolve a checkpoint and read what identifies it (no torch, no model loading)."""
    from keyred.checkpoints import METADATA_FILE, new_info, read_info
    from keyred.reduction.prune import earlier_pruning

    path = resolve_checkpoint(path)
    config = json.loads((path / "config.json").read_text())
    family = config["model_type"]
    info = read_info(path) if (path / METADATA_FILE).is_file() else new_info(family, None, stage="external")
    pruning = earlier_pruning(info.extra)
    return Source(path=path, name=name or default_name(path, info), family=family,
                  stage=STAGES.get(info.stage, info.stage), method=pruning["method"] if pruning else "none",
                  ratio=float(pruning["ratio"]) if pruning else 0.0, info=info,
                  vocab_size=int(config.get("vocab_size", 0)))


def language_tokens(packed: str | Path, split: str, seq_len: int, window_seed: int | None) -> tuple[np.ndarray, str]:
    """(tokens [seq_len] int64, description): the first seq_len tokens of the packed split, or a
    window at a uniformly random offset seeded by window_seed."""
    from keyred.data.packing import PackedTokens

    stream = PackedTokens(packed, split)
    if seq_len < 1 or seq_len > len(stream):
        raise ConfigError(f"--seq-len {seq_len} must be in 1..{len(stream)} (the tokens of split {split} of {packed})")
    start = 0 if window_seed is None else int(np.random.default_rng(window_seed).integers(0, len(stream) - seq_len + 1))
    tokens = np.asarray(stream.tokens[start:start + seq_len], dtype=np.int64)
    return tokens, f"{split} tokens {start}-{start + seq_len - 1}"


def word_problem_tokens(info, length: int | None, seed: int) -> tuple[np.ndarray, str]:
    """(tokens [length + 1] int64, description): BOS and one seeded word problem of the group a
    state-tracking checkpoint was trained on; length None: the run's test length."""
    from keyred.data.groups import build_group
    from keyred.data.word_problems import sample_sequences

    group = build_group(info.extra["train"]["group"])
    length = int(info.extra["train"]["test_length"]) if length is None else length
    if length < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {length}")
    elements = sample_sequences(group, length, 1, seed)[0].astype(np.int64)
    tokens = np.concatenate([[int(info.extra["bos_token"])], elements])
    return tokens, f"{group.name} word problem, k={length}, seed {seed}"


def analyse_checkpoint(source: Source, tokens: np.ndarray, description: str, device: str, stride: int = 1,
                       svd_driver: str | None = None, log=print):
    """Load a checkpoint (bf16 on CUDA, where fla's kernels need it; float32 otherwise), analyse
    one sequence of tokens [T]: a DataFrame with COLUMNS."""
    import torch

    from keyred.checkpoints import load_checkpoint

    model, _ = load_checkpoint(source.path, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    table = analyse_model(model, torch.as_tensor(tokens).unsqueeze(0), stride, svd_driver, log)
    front = dict(model=source.name, checkpoint=str(source.path), family=source.family, stage=source.stage,
                 method=source.method, ratio=source.ratio, input=description)
    for position, (column, value) in enumerate(front.items()):
        table.insert(position, column, value)
    return table[list(COLUMNS)]


# ------------------------------------------------------------------------------------------ CLI

def main(argv: list[str] | None = None) -> int:
    from keyred.data.corpus import SPLITS

    parser = argparse.ArgumentParser(prog="python -m keyred.analysis.stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", action="append", required=True,
                        help="checkpoint folder (or state-tracking run folder); repeat for several")
    parser.add_argument("--name", action="append", default=None,
                        help="model column: once for all checkpoints or once per --checkpoint (default: from metadata)")
    parser.add_argument("--packed", default=None, help="keyred.data.packing folder (language-model checkpoints)")
    parser.add_argument("--split", default="test", choices=SPLITS, help="packed split to read (default test)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"tokens per sequence (default {DEFAULT_SEQ_LEN}; state tracking: elements, default "
                             f"the run's test length)")
    parser.add_argument("--window-seed", type=int, default=None,
                        help="take a seeded random window of the split instead of its first tokens")
    parser.add_argument("--seed", type=int, default=0, help="seed of the word problem (state-tracking checkpoints)")
    parser.add_argument("--stride", type=int, default=1, help="measure the ranks every this many tokens")
    parser.add_argument("--svd-driver", default=None, choices=SVD_DRIVERS,
                        help="cuSOLVER driver of svdvals on CUDA (default gesvda, checked; see keyred.analysis.measures)")
    parser.add_argument("--out", required=True, help="CSV file to write")
    add_torch_options(parser)
    args = parser.parse_args(argv)

    from keyred.checkpoints import CheckpointError
    from keyred.fla.families import ModelSpecError

    names = args.name or [None]
    if len(names) not in (1, len(args.checkpoint)):
        parser.error(f"give --name once or once per --checkpoint ({len(args.checkpoint)}), got {len(names)}")
    names = names * len(args.checkpoint) if len(names) == 1 and len(args.checkpoint) > 1 else names
    if args.stride < 1:
        parser.error(f"--stride must be >= 1, got {args.stride}")
    try:  # everything that can be checked before loading a model
        sources = [describe_checkpoint(path, name) for path, name in zip(args.checkpoint, names)]
        inputs = []
        for source in sources:
            if source.state_tracking:
                inputs.append(word_problem_tokens(source.info, args.seq_len, args.seed))
                continue
            if args.packed is None:
                raise ConfigError(f"{source.path} is a language model: give --packed (a keyred.data.packing folder)")
            from keyred.data.packing import check_vocabulary

            check_vocabulary(args.packed, source.vocab_size)
            inputs.append(language_tokens(args.packed, args.split, args.seq_len or DEFAULT_SEQ_LEN, args.window_seed))
        for source, (tokens, _) in zip(sources, inputs):
            if args.stride > len(tokens):
                raise ConfigError(f"--stride {args.stride} is longer than the {len(tokens)} tokens of {source.path}")
        device = torch_device(args.device, args.threads)
    except (ConfigError, CheckpointError, ModelSpecError) as error:
        return bad_input(error)

    import pandas as pd

    from keyred import io

    tables, start = [], time.perf_counter()
    try:
        for index, (source, (tokens, description)) in enumerate(zip(sources, inputs), 1):
            progress(f"[analysis] {index}/{len(sources)} {source.name} ({source.stage}, {source.method} "
                     f"{source.ratio:g}) {source.path}: {description}")
            tables.append(analyse_checkpoint(source, tokens, description, device, args.stride, args.svd_driver,
                                             progress))
    except (ConfigError, CheckpointError, ModelSpecError, AnalysisError) as error:
        return bad_input(error)
    io.write_csv(args.out, pd.concat(tables, ignore_index=True))
    progress(f"[analysis] wrote {args.out} ({sum(map(len, tables))} rows) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

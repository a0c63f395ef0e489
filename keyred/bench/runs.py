"""The three benchmark kinds as one plan runner: a plan is a list of cases, one loop measures them.

- model: the whole causal LM's forward (no grad, logits of every position) at one batch x length,
  for every model given (checkpoints, the pruned checkpoint of each ratio of keyred.reduction.sweep
  output folders, random-weight shapes), grouped by shape (keyred.bench.sources.group_by_shape):
  each shape is built once, from the first model of that shape, and all shapes are timed
  round-robin in one process (keyred.bench.timing.measure_interleaved); one row per model given.
- mixer: one linear-attention layer (the family's block builds it, as in the model) on random
  hidden states [B, T, D], 'forward' (no grad) and 'forward+backward' (gradients of the layer's
  parameters and input) timed separately; with cuda_graph the forward is replayed from a CUDA graph.
- decode: greedy cached decoding of `steps` tokens after a random prompt (keyred.bench.passes);
  seq_len is the number of steps, latency is per decode step and tokens/s counts batch x steps.
  cuda_graph replays a captured decode step and needs CUDA, DeltaNet and the keyred launch (its
  in-place state update).

Every case is checked before the first is run (key dims fla supports, memory estimates against the
free memory, what fla refuses); a run's out-of-memory error names the case. dtype 'auto' is
bfloat16 on CUDA (fla's chunk kernels reject float32) and float32 on the CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import fla.utils
import pandas as pd
import torch
import triton

from keyred.bench.errors import BenchmarkError
from keyred.bench.kernels import launch_kernels, launch_label
from keyred.bench.memory import (check_memory, estimate_decode_bytes, estimate_forward_bytes, estimate_mixer_bytes,
                                 out_of_memory_as_error, release)
from keyred.bench.passes import forward_call, measure_decoding, measure_mixer
from keyred.bench.plan import ELEMENT_BYTES, BenchRequest, checkpoint_paths, resolve_dtype
from keyred.bench.shapes import shape_of
from keyred.bench.sources import (ModelSource, ShapeGroup, checkpoint_source, group_by_shape, instantiate,
                                  mixer_layer, mixer_parameter_count, parameter_count, shape_config, shape_source,
                                  torch_dtype)
from keyred.bench.table import environment, shape_columns, source_columns, table
from keyred.bench.timing import Measurement, measure_interleaved
from keyred.console import progress

MAX_CUDA_KEY_DIM = 256  # fla's chunk kernels assert K <= 256


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement of a plan: the model (`source`) or mixer (`config`) at one batch and pass.
    `columns` are the row's columns fixed before the run; each call processes `tokens` tokens in
    `steps` steps (decode: batch x steps tokens; latency is reported per step)."""

    what: str
    config: Any
    parameters: int
    estimate: int
    batch: int
    which: str
    tokens: int
    columns: dict[str, Any]
    source: ModelSource | None = None
    steps: int = 1
    cuda_graph: bool = False
    group: ShapeGroup | None = None  # model: every model of this shape (source is the one timed)


def check_key_dim(config, device: str, what: str) -> None:
    key_dim = shape_of(config).key_dim
    if device == "cuda" and key_dim > MAX_CUDA_KEY_DIM:
        raise BenchmarkError(f"{what}: d_k {key_dim} > {MAX_CUDA_KEY_DIM}, which fla's kernels do not support")


def check_gated_backward(config, device: str, what: str) -> None:
    """fla 0.6.0 refuses the backward of a gated delta rule on Hopper GPUs with triton < 3.7.1
    (chunk_bwd_dqkwg gives wrong results there); refuse before any work instead of mid-run."""
    gated = config.model_type == "gated_deltanet" or getattr(config, "use_forget_gate", False)
    if device != "cuda" or not gated:
        return
    if fla.utils.IS_NVIDIA_HOPPER and fla.utils.TRITON_ABOVE_3_4_0 and not fla.utils.TRITON_ABOVE_3_7_1:
        raise BenchmarkError(f"{what}: fla refuses the gated backward on Hopper GPUs with triton {triton.__version__} "
                             f"(< 3.7.1); install triton >= 3.7.1 or measure --passes forward")


def random_tokens(vocab_size: int, batch: int, length: int, seed: int, device: str) -> torch.Tensor:
    """Token ids [batch, length], seeded."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(vocab_size, (batch, length), generator=generator).to(device)


def _sources(request: BenchRequest) -> list[ModelSource]:
    """Every checkpoint (each checked before any is read) and then every random-weight shape."""
    checkpoints = [checkpoint_source(path) for path in checkpoint_paths(request)]
    return checkpoints + [shape_source(shape) for shape in request.shapes]


def _has_models(request: BenchRequest) -> bool:
    return bool(request.checkpoints or request.reductions or request.shapes)


class Runs:
    """How one kind plans, builds, measures and reports its cases (the loop is run_plan's)."""

    kind = ""

    @classmethod
    def started(cls, index: int, total: int, case: Case, request: BenchRequest) -> str:
        return f"[bench] {cls.kind} {index}/{total}: {case.what}; warm-up {request.timing.warmup}"

    @staticmethod
    def keeps(case: Case, following: Case | None) -> bool:
        """Whether the model or layer built for `case` serves the following case too."""
        return False


class ModelRuns(Runs):
    """Whole-model forward at batch x seq_len: one case per shape (group_by_shape), every shape in
    memory at once and timed round-robin (run_interleaved); one row per model given."""

    kind = "model"

    @staticmethod
    def cases(request: BenchRequest, device: str, dtype: str) -> list[Case]:
        if not _has_models(request):
            raise BenchmarkError("no models to benchmark: give --checkpoints, --reductions or --families")
        batch, seq_len, element = request.batch, request.seq_len, ELEMENT_BYTES[dtype]
        groups = group_by_shape(_sources(request))
        cases = []
        for group in groups:
            source = group.timed
            what = f"the forward of {group.label} ({source.label}) at batch {batch} x length {seq_len} ({dtype})"
            check_key_dim(source.config, device, what)
            parameters = parameter_count(source.config)
            estimate = estimate_forward_bytes(source.config, parameters, batch, seq_len, element)
            cases.append(Case(what=what, config=source.config, parameters=parameters, estimate=estimate, batch=batch,
                              which="forward", tokens=batch * seq_len, source=source, group=group,
                              columns={"seq_len": seq_len, "shape": group.label}))
        weights = sum(case.parameters * element for case in cases)
        for case in cases:  # every shape stays in memory while each is timed
            check_memory(weights - case.parameters * element + case.estimate, device,
                         f"{case.what}, with the weights of the {len(cases) - 1} other shapes in memory")
        return cases

    @staticmethod
    def run_interleaved(cases: list[Case], request: BenchRequest, device: str, dtype: str,
                        log) -> list[Measurement]:
        """Build every shape, warm each up, then time them round-robin; one Measurement per case."""
        models, prepares = [], []
        for index, case in enumerate(cases, 1):
            log(f"[bench] model {index}/{len(cases)}: {case.what}, {case.parameters:,} parameters, for "
                f"{', '.join(member.label for member in case.group.members)}")
            with out_of_memory_as_error(case.what):
                models.append(instantiate(case.source, device, dtype, request.seed))
            tokens = random_tokens(case.config.vocab_size, case.batch, request.seq_len, request.seed, device)
            prepares.append(forward_call(models[-1], tokens))
        log(f"[bench] model: warm-up {request.timing.warmup} per shape (the first calls of a shape compile and "
            f"autotune fla's kernels), then {request.timing.repeats} rounds over the {len(cases)} shapes")
        resident = [sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
                    for model in models]
        with out_of_memory_as_error(f"the forward of {len(cases)} shapes"), \
                launch_kernels(request.kernel_launch, device):
            results = measure_interleaved(prepares, request.timing, device, resident)
        del models, prepares
        release(device)
        return results

    @staticmethod
    def rows(case: Case, row: dict, request: BenchRequest, shapes: int) -> list[dict]:
        """One row per model of the case's shape, each with the shape's measurement."""
        timed = "" if case.source.checkpoint is None else str(case.source.checkpoint)
        return [{**row, **source_columns(member, request.name), "timed_checkpoint": timed,
                 "shapes_interleaved": shapes} for member in case.group.members]

    @staticmethod
    def finished(row: dict) -> str:
        return (f"[bench] model {row['shape']} ({row['launch']}): {row['tokens_per_s']:,.0f} tok/s (interquartile "
                f"{row['tokens_per_s_q25']:,.0f} to {row['tokens_per_s_q75']:,.0f}, {row['repeats']} rounds), "
                f"{row['latency_ms_median']:.2f} ms, kernel {row['kernel']} ({row['kernel_backend']}), peak memory "
                f"{row['peak_mem_bytes']:.4g} B ({row['peak_mem_kind']}), warm-up {row['warmup_s']:.1f}s")


class MixerRuns(Runs):
    """One linear-attention layer per shape (its num_layers is ignored) on random hidden states
    [batch, seq_len, hidden], each pass timed separately."""

    kind = "mixer"

    @staticmethod
    def cases(request: BenchRequest, device: str, dtype: str) -> list[Case]:
        if request.cuda_graph and device != "cuda":
            raise BenchmarkError(f"--cuda-graph needs a CUDA device, but this benchmark runs on {device}; "
                                 f"drop --cuda-graph or use --device cuda")
        if not request.shapes:
            raise BenchmarkError("no mixer shapes: give --families and the shape options")
        batch, seq_len = request.batch, request.seq_len
        cases = []
        for shape in request.shapes:
            config = shape_config(dataclasses.replace(shape, num_layers=1))
            parameters = mixer_parameter_count(config)
            for which in request.passes:
                what = (f"the {shape.family} mixer (d_k {shape.key_dim}, d_v {shape.value_dim}) {which} at batch "
                        f"{batch} x length {seq_len} ({dtype})")
                check_key_dim(config, device, what)
                if which != "forward":
                    check_gated_backward(config, device, what)
                estimate = estimate_mixer_bytes(config, parameters, batch, seq_len, ELEMENT_BYTES[dtype],
                                                which != "forward")
                check_memory(estimate, device, what)
                cases.append(Case(what=what, config=config, parameters=parameters, estimate=estimate, batch=batch,
                                  which=which, tokens=batch * seq_len,
                                  cuda_graph=request.cuda_graph and which == "forward",
                                  columns={"label": f"{shape.family} d_k {shape.key_dim}", "seq_len": seq_len}))
        return cases

    @staticmethod
    def build(case: Case, request: BenchRequest, device: str, dtype: str):
        return mixer_layer(case.config, device, request.seed).to(torch_dtype(dtype))

    @staticmethod
    def measure(layer, case: Case, request: BenchRequest, device: str, dtype: str) -> tuple[Measurement, dict]:
        generator = torch.Generator().manual_seed(request.seed)
        hidden = torch.randn(case.batch, request.seq_len, case.config.hidden_size, generator=generator)
        hidden = hidden.to(device, torch_dtype(dtype))
        with launch_kernels(request.kernel_launch, device):
            result = measure_mixer(layer, hidden, case.which, request.timing, device, request.seed, case.cuda_graph)
        return result, {}

    @staticmethod
    def finished(row: dict) -> str:
        return (f"[bench] mixer {row['label']} {row['pass']} ({row['launch']}): {row['tokens_per_s']:,.0f} tok/s, "
                f"{row['latency_ms_median']:.3f} ms, kernel {row['kernel']} ({row['kernel_backend']}), "
                f"warm-up {row['warmup_s']:.1f}s")


class DecodeRuns(Runs):
    """Greedy cached decoding of each model at each batch size (one model instance for all its batches)."""

    kind = "decode"

    @staticmethod
    def keeps(case: Case, following: Case | None) -> bool:
        return following is not None and following.source is case.source

    @staticmethod
    def _refuse_cuda_graph(request: BenchRequest, device: str, sources: list[ModelSource] | None) -> None:
        refusal = ("it needs a CUDA device" if device != "cuda" else
                   "it needs --kernel-launch keyred (fla's launch writes each step's state to a new tensor)"
                   if request.kernel_launch != "keyred" else None)
        others = sorted({source.config.model_type for source in sources or ()} - {"delta_net"})
        refusal = refusal or (f"it needs DeltaNet models (the in-place state update exists for DeltaNet's "
                              f"kernel only), not {', '.join(others)}" if others else None)
        if refusal:
            raise BenchmarkError(f"--cuda-graph decoding is not possible here: {refusal}")

    @classmethod
    def cases(cls, request: BenchRequest, device: str, dtype: str) -> list[Case]:
        if request.cuda_graph:
            cls._refuse_cuda_graph(request, device, None)
        if not _has_models(request) or not request.batches:
            raise BenchmarkError("no models or no batch sizes to benchmark")
        sources = _sources(request)
        if request.cuda_graph:
            cls._refuse_cuda_graph(request, device, sources)
        prompt_len, steps = request.prompt_len, request.steps
        cases = []
        for source in sources:
            parameters = parameter_count(source.config)
            for batch in request.batches:
                what = f"decoding {source.label} at batch {batch} (prompt {prompt_len}, {steps} steps, {dtype})"
                check_key_dim(source.config, device, what)
                estimate = estimate_decode_bytes(source.config, parameters, batch, prompt_len, ELEMENT_BYTES[dtype])
                check_memory(estimate, device, what)
                cases.append(Case(what=what, config=source.config, parameters=parameters, estimate=estimate,
                                  batch=batch, which="decode", tokens=batch * steps, steps=steps, source=source,
                                  cuda_graph=request.cuda_graph,
                                  columns={**source_columns(source, request.name), "seq_len": steps,
                                           "prompt_len": prompt_len}))
        return cases

    @staticmethod
    def build(case: Case, request: BenchRequest, device: str, dtype: str):
        return instantiate(case.source, device, dtype, request.seed)

    @staticmethod
    def measure(model, case: Case, request: BenchRequest, device: str, dtype: str) -> tuple[Measurement, dict]:
        prompt = random_tokens(case.config.vocab_size, case.batch, request.prompt_len, request.seed, device)
        with launch_kernels(request.kernel_launch, device, in_place=case.cuda_graph):
            result, state = measure_decoding(model, prompt, request.steps, request.timing, device, case.cuda_graph)
        if state.total % case.batch:
            raise BenchmarkError(f"{case.what}: the cache holds {state.total} bytes, not a multiple of the batch")
        return result, {"state_bytes_per_seq": state.total // case.batch,
                        "recurrent_state_bytes_per_seq": state.recurrent // case.batch,
                        "conv_state_bytes_per_seq": state.conv // case.batch}

    @staticmethod
    def finished(row: dict) -> str:
        return (f"[bench] decode {row['label']} batch {row['batch']} ({row['launch']}): {row['tokens_per_s']:,.0f} "
                f"tok/s, {row['latency_ms_median']:.3f} ms/step, state {row['state_bytes_per_seq']:,} B/seq, "
                f"kernel {row['kernel']} ({row['kernel_backend']}), warm-up {row['warmup_s']:.1f}s")


RUNS = {"model": ModelRuns, "mixer": MixerRuns, "decode": DecodeRuns}


def plan(request: BenchRequest, device: str) -> list[Case]:
    """The cases of a request on `device`, every one checked (memory, key dims, what fla refuses)
    before any is run."""
    return RUNS[request.kind].cases(request, device, resolve_dtype(request.dtype, device))


def _row(case: Case, result: Measurement, measured: dict, request: BenchRequest, device: str, dtype: str,
         env: dict) -> dict:
    launch = launch_label(case.cuda_graph, request.kernel_launch, device, result.kernels,
                          shape_of(case.config).key_dim, training=case.which == "forward+backward")
    return {"kind": request.kind, **case.columns, **shape_columns(case.config, case.parameters),
            "batch": case.batch, "pass": case.which, "launch": launch, "dtype": dtype, **env,
            "warmup": request.timing.warmup, "repeats": request.timing.repeats,
            **result.columns(case.tokens, case.steps), **measured, "estimated_mem_bytes": case.estimate,
            "seed": request.seed}


def run_plan(request: BenchRequest, device: str, log=progress) -> pd.DataFrame:
    """Measure every case of the request's plan in this process (whole models round-robin, the
    other kinds one after the other), with fla's kernels launched as request.kernel_launch on
    CUDA; the table (keyred.bench.table.COLUMNS)."""
    runs = RUNS[request.kind]
    dtype = resolve_dtype(request.dtype, device)
    cases = plan(request, device)
    env = environment(device)
    if runs is ModelRuns:
        rows = []
        for case, result in zip(cases, ModelRuns.run_interleaved(cases, request, device, dtype, log)):
            row = _row(case, result, {}, request, device, dtype, env)
            log(ModelRuns.finished(row))
            rows += ModelRuns.rows(case, row, request, len(cases))
        return table(rows)
    rows, subject = [], None
    for index, case in enumerate(cases, 1):
        log(runs.started(index, len(cases), case, request))
        with out_of_memory_as_error(case.what):
            if subject is None:
                subject = runs.build(case, request, device, dtype)
            result, measured = runs.measure(subject, case, request, device, dtype)
        if not runs.keeps(case, cases[index] if index < len(cases) else None):
            subject = None
            release(device)
        row = _row(case, result, measured, request, device, dtype, env)
        rows.append(row)
        log(runs.finished(row))
    return table(rows)

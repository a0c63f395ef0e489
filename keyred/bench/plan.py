"""What one benchmark command asks for: its options, from flags or from --spec, as a BenchRequest.

The options of each kind are one table (OPTIONS): the command line builds its flags from it and
a --spec JSON object uses the same names (the flags' names with underscores, e.g. "key_dims"), so
`request_from_options(kind, options)` is the one function that turns either into a request. The
request is checked before any work (sizes, choices, shapes); what needs the device or the models
(memory, key-dim limits, CUDA graphs) is checked when the plan is built (keyred.bench.runs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from keyred.bench.errors import BenchmarkError
from keyred.bench.shapes import ModelShape, shapes_from_options
from keyred.bench.spec import KINDS
from keyred.checkpoints import PRUNED, CheckpointError, reduced_checkpoints
from keyred.config import is_int
from keyred.fla.families import DEFAULT_VOCAB_SIZE, FAMILIES, SIZES
from keyred.fla.sites import LAUNCHES

PASSES = ("forward", "forward+backward")
DTYPES = ("auto", "bfloat16", "float16", "float32")
ELEMENT_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
REDUCED_STAGE = PRUNED  # the checkpoint of each ratio of a reduction folder that --reductions benchmarks

_CHECKPOINT_KINDS = ("model", "decode")
_ONE_BATCH_KINDS = ("model", "mixer")


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a benchmark kind: flag --name-with-dashes, --spec key name. `value` is 'int',
    'ints', 'str', 'strs' or 'bool'; `help` a string or, where it differs, one per kind."""

    name: str
    kinds: tuple[str, ...]
    value: str
    default: Any = None
    required: bool = False
    choices: tuple | None = None
    help: str | dict[str, str] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def help_for(self, kind: str) -> str | None:
        return self.help.get(kind) if isinstance(self.help, dict) else self.help


OPTIONS: tuple[Option, ...] = (
    Option("name", _CHECKPOINT_KINDS, "str", "", help="model name for the tables (as keyred.reduction.sweep's --name)"),
    Option("checkpoints", _CHECKPOINT_KINDS, "strs", (), help="checkpoint folders"),
    Option("reductions", _CHECKPOINT_KINDS, "strs", (),
           help=f"keyred.reduction.sweep output folders: each ratio*/{REDUCED_STAGE} checkpoint"),
    Option("families", KINDS, "strs", choices=FAMILIES, help="random-weight shapes of these families"),
    Option("size", KINDS, "str", choices=SIZES, help="base shape: the family's named architecture"),
    Option("hidden", KINDS, "int", help="hidden size"),
    Option("layers", _CHECKPOINT_KINDS, "int", help="number of layers"),
    Option("heads", KINDS, "int", help="number of heads"),
    Option("key_dims", KINDS, "ints", help="d_k per head, one shape each"),
    Option("value_dim", KINDS, "int", help="d_v per head (fixed)"),
    Option("vocab_size", KINDS, "int", DEFAULT_VOCAB_SIZE, help="vocabulary of random shapes"),
    Option("batches", ("decode",), "ints", required=True, help="batch sizes"),
    Option("prompt_len", ("decode",), "int", 16, help="prompt tokens (prefill, untimed)"),
    Option("steps", ("decode",), "int", 128, help="decode steps timed per repeat"),
    Option("batch", _ONE_BATCH_KINDS, "int", required=True),
    Option("seq_len", _ONE_BATCH_KINDS, "int", required=True),
    Option("passes", ("mixer",), "strs", PASSES, choices=PASSES),
    Option("cuda_graph", ("mixer", "decode"), "bool", False, help={
        "mixer": "replay the forward pass from a CUDA graph: GPU time without launch overhead (CUDA)",
        "decode": "replay a CUDA graph of one decode step: GPU time without launch overhead (CUDA, DeltaNet)"}),
    Option("kernel_launch", KINDS, "str", "keyred", choices=LAUNCHES,
           help="on CUDA, fla's kernels with keyred's launch choices (DeltaNet: autotuned fused-recurrent launch, "
                "chunks of 32 for d_k <= 64 without grad) or fla's own"),
    Option("warmup", KINDS, "int", 3, help="untimed calls first (kernel autotuning)"),
    Option("repeats", KINDS, "int", 10, help={
        "model": "rounds, each timing every distinct shape once, in turn (median and quartiles reported)",
        "mixer": "timed calls (median and quartiles reported)", "decode": "timed calls (median and quartiles reported)"}),
    Option("dtype", KINDS, "str", "auto", choices=DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU"),
    Option("seed", KINDS, "int", 0),
)


def options_of(kind: str) -> tuple[Option, ...]:
    """The options of one kind, in the order of the command line's help."""
    if kind not in KINDS:
        raise BenchmarkError(f"unknown benchmark kind {kind!r}; allowed: {', '.join(KINDS)}")
    return tuple(option for option in OPTIONS if kind in option.kinds)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Untimed warm-up calls (at least one: the kernel record is taken in the last) and timed repeats."""

    warmup: int
    repeats: int

    def __post_init__(self):
        for name in ("warmup", "repeats"):
            check_size(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class BenchRequest:
    """Everything one benchmark command measures. Options that do not apply to `kind` are None
    (or empty): batch and seq_len for model and mixer, batches, prompt_len and steps for decode,
    passes for mixer; checkpoints, reductions and name for model and decode."""

    kind: str
    shapes: tuple[ModelShape, ...]     # random-weight models (model, decode) or mixers
    timing: Timing
    kernel_launch: str
    dtype: str
    seed: int
    checkpoints: tuple[Path, ...] = ()
    reductions: tuple[Path, ...] = ()  # keyred.reduction.sweep folders: each ratio's REDUCED_STAGE checkpoint
    name: str = ""
    batch: int | None = None
    seq_len: int | None = None
    batches: tuple[int, ...] = ()
    prompt_len: int | None = None
    steps: int | None = None
    passes: tuple[str, ...] = ()
    cuda_graph: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise BenchmarkError(f"unknown benchmark kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        check_launch(self.kernel_launch)
        check_dtype(self.dtype)
        unknown = sorted(set(self.passes) - set(PASSES))
        if unknown or (self.kind == "mixer" and not self.passes):
            raise BenchmarkError(f"unknown passes {unknown or 'none'}; allowed: {', '.join(PASSES)}")


def check_size(name: str, value: int) -> None:
    """BenchmarkError '--name must be an integer >= 1' unless value is one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BenchmarkError(f"--{name} must be an integer >= 1, got {value!r}")


def check_launch(kind: str) -> None:
    if kind not in LAUNCHES:
        raise BenchmarkError(f"unknown --kernel-launch {kind!r}; allowed: {', '.join(LAUNCHES)}")


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise BenchmarkError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' -> bfloat16 on CUDA, float32 on the CPU; float32 on CUDA is refused (fla's chunk kernels reject it)."""
    check_dtype(dtype)
    if dtype == "auto":
        return "bfloat16" if device == "cuda" else "float32"
    if dtype == "float32" and device == "cuda":
        raise BenchmarkError("float32 on CUDA is not supported: fla's chunk kernels reject float32 inputs; "
                             "use bfloat16 or float16")
    return dtype


_VALUES = {"int": ("an integer", is_int), "str": ("a string", lambda value: isinstance(value, str)),
           "bool": ("true or false", lambda value: isinstance(value, bool))}


def _check_value(option: Option, value: Any) -> None:
    """BenchmarkError naming the --spec key unless `value` has the option's type and choices."""
    listed = option.value in ("ints", "strs")
    what, is_valid = _VALUES[option.value.removesuffix("s") if listed else option.value]
    if listed and not isinstance(value, (list, tuple)):
        raise BenchmarkError(f"--spec key '{option.name}' must be a list, each item {what}; got {value!r}")
    for item in value if listed else [value]:
        if not is_valid(item):
            raise BenchmarkError(f"--spec key '{option.name}': {item!r} is not {what}")
        if option.choices is not None and item not in option.choices:
            raise BenchmarkError(f"--spec key '{option.name}': {item!r} is not allowed; allowed values: "
                                 f"{', '.join(map(str, option.choices))}")


def check_options(kind: str, options: dict[str, Any]) -> None:
    """Unknown keys, values of the wrong type or outside their choices: BenchmarkError naming them."""
    if not isinstance(options, dict):
        raise BenchmarkError(f"--spec must be a JSON object of {kind} options, got {options!r}")
    known = {option.name: option for option in options_of(kind)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise BenchmarkError(f"--spec: unknown key(s) {', '.join(map(repr, unknown))} for {kind}; "
                             f"allowed keys: {', '.join(known)}")
    for name, value in options.items():
        _check_value(known[name], value)


def missing_options(kind: str, options: dict[str, Any]) -> list[str]:
    """The flags of the required options that `options` lacks."""
    return [option.flag for option in options_of(kind) if option.required and option.name not in options]


def merge_options(kind: str, spec: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """The options of one command: --spec's and the flags' (each checked); one given both ways is refused."""
    check_options(kind, spec)
    check_options(kind, flags)
    twice = sorted(set(spec) & set(flags))
    if twice:
        raise BenchmarkError(f"{', '.join(option.flag for option in options_of(kind) if option.name in twice)} "
                             f"given both in --spec and as flags; give each once")
    return {**spec, **flags}


def request_from_options(kind: str, options: dict[str, Any]) -> BenchRequest:
    """The request of `kind` from its options (flags or --spec, see OPTIONS; absent ones take their
    defaults); BenchmarkError naming the first problem."""
    check_options(kind, options)
    missing = missing_options(kind, options)
    if missing:
        raise BenchmarkError(f"{kind} needs {', '.join(missing)}")
    values = {option.name: option.default for option in options_of(kind)} | options
    timing = Timing(warmup=values["warmup"], repeats=values["repeats"])
    shapes = shapes_from_options(values["families"], values["size"], values["hidden"], values.get("layers"),
                                 values["heads"], values["key_dims"], values["value_dim"], values["vocab_size"],
                                 need_layers=kind != "mixer")
    for name in ("batch", "seq_len", "prompt_len", "steps"):
        if name in values:
            check_size(name.replace("_", "-"), values[name])
    for batch in values.get("batches", ()):
        check_size("batches", batch)
    fields = {name: values[name] for name in ("name", "batch", "seq_len", "prompt_len", "steps", "cuda_graph", "seed")
              if name in values}
    return BenchRequest(kind=kind, shapes=tuple(shapes), timing=timing,
                        checkpoints=tuple(Path(p) for p in values.get("checkpoints", ())),
                        reductions=tuple(Path(p) for p in values.get("reductions", ())),
                        batches=tuple(values.get("batches", ())), passes=tuple(values.get("passes", ())),
                        kernel_launch=values["kernel_launch"], dtype=values["dtype"], **fields)


# ----------------------------------------------------------------- the checkpoints of a request

def reduction_checkpoints(folder: str | Path) -> list[Path]:
    """The ratio*/pruned checkpoints of a keyred.reduction.sweep output folder, by ratio."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"reduction folder {folder} does not exist")
    return list(reduced_checkpoints(folder, REDUCED_STAGE).values())


def checkpoint_paths(request: BenchRequest) -> list[Path]:
    """The checkpoints of a request: those given, then those of every reduction folder, each checked
    to be a checkpoint folder (CheckpointError) before anything is loaded or built."""
    paths = list(request.checkpoints)
    for folder in request.reductions:
        paths += reduction_checkpoints(folder)
    for path in paths:
        if not (path / "config.json").is_file():
            raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                                  else f"checkpoint {path} is not a checkpoint folder (no config.json)")
    return paths

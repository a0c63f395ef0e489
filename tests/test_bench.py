"""keyred.bench and keyred.stages.bench: the three benchmark kinds on CPU at tiny shapes, their
tables, the kernel record, state bytes from the cache against the closed form, refusals before work,
the plots; flags and --spec building the same request, and the workflow's new --spec commands
asking for exactly what its recorded commands with flags asked for.

No timing thresholds: CPU numbers only have to exist, be finite and positive.
"""
import copy
import dataclasses
import json
import math
import shlex
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from dry_run_plan import dry_run_plan
from keyred.figures import bench as figures
from keyred.bench.errors import BenchmarkError, InsufficientMemoryError
from keyred.bench.memory import out_of_memory_as_error
from keyred.bench.plan import (PASSES, BenchRequest, Timing, reduction_checkpoints, request_from_options,
                               resolve_dtype)
from keyred.bench.runs import run_plan
from keyred.bench.shapes import ModelShape, base_shape, shape_of, shapes_from_options
from keyred.bench.sources import shape_config
from keyred.bench.spec import bench_options, bench_settings
from keyred.bench.table import COLUMNS
from keyred.checkpoints import CheckpointError
from keyred.config import ConfigError
from keyred.fla.families import FAMILIES
from keyred.stages.bench import main, parse_request
from test_workflow import copy_workflow

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUICK = Timing(warmup=1, repeats=2)
QUIET = lambda message: None  # noqa: E731
MEASURED = ("parameters", "warmup_s", "latency_ms_median", "latency_ms_min", "latency_ms_max", "tokens_per_s",
            "estimated_mem_bytes", "d_k", "d_v", "batch", "seq_len")


def tiny(family="delta_net", key_dim=16, value_dim=16, layers=2, heads=4, hidden=64):
    return ModelShape(family=family, hidden_size=hidden, num_layers=layers, num_heads=heads, key_dim=key_dim,
                      value_dim=value_dim, vocab_size=128)


def request(kind, shapes, timing=QUICK, **fields):
    """A request of random-weight shapes (the launch, dtype and seed of the command line's defaults)."""
    return BenchRequest(kind=kind, shapes=tuple(shapes), timing=timing, kernel_launch="keyred", dtype="auto", seed=0,
                        **fields)


def mixers(shapes, batch, seq_len, passes=PASSES, device="cpu", timing=QUICK, **fields):
    return run_plan(request("mixer", shapes, timing, batch=batch, seq_len=seq_len, passes=passes, **fields), device,
                    log=QUIET)


def check_table(frame: pd.DataFrame, extra=()) -> None:
    """Every column of COLUMNS, in order; the measured numbers finite and positive."""
    assert list(frame.columns) == list(COLUMNS)
    assert len(frame) > 0
    for column in (*MEASURED, *extra):
        values = frame[column].astype(float)
        assert np.isfinite(values).all() and (values > 0).all(), (column, values.tolist())
    assert (frame["peak_mem_kind"] == "cpu_rss_peak_delta").all()
    assert (frame["peak_mem_bytes"] >= 0).all()
    assert frame["latency_ms_min"].le(frame["latency_ms_median"]).all()
    assert (frame["device"] == "cpu").all() and (frame["kernel_backend"] == "keyred-torch").all()
    assert frame[["torch_version", "fla_version", "device_name", "dtype", "kernel"]].notna().all().all()


# ------------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("family", FAMILIES)
def test_shape_config_sets_key_and_value_dims_independently(family):
    shape = tiny(family, key_dim=24, value_dim=40, heads=2, hidden=48)
    config = shape_config(shape)
    assert shape_of(config) == shape
    assert (config.hidden_size, config.num_hidden_layers, config.num_heads) == (48, 2, 2)


def test_the_1_3b_shape_keeps_d_v_when_d_k_shrinks():
    base = base_shape("delta_net", "1.3B")
    assert (base.hidden_size, base.num_layers, base.num_heads, base.key_dim, base.value_dim) == (2048, 24, 16, 128, 128)
    shapes = shapes_from_options(["delta_net"], "1.3B", None, None, None, [128, 64, 32], None)
    assert [(s.key_dim, s.value_dim, s.num_layers, s.hidden_size) for s in shapes] == [
        (128, 128, 24, 2048), (64, 128, 24, 2048), (32, 128, 24, 2048)]
    config = shape_config(shapes[1])
    assert config.expand_k == 0.5 and config.expand_v == 1


def test_shape_options_name_what_is_missing():
    with pytest.raises(BenchmarkError, match="without --size, random-weight shapes need --hidden, --layers"):
        shapes_from_options(["delta_net"], None, None, None, 4, [16], 16)
    with pytest.raises(BenchmarkError, match="--hidden describe random-weight shapes and need --families"):
        shapes_from_options(None, None, 64, None, None, None, None)
    assert shapes_from_options(["gated_deltanet"], None, 64, None, 4, [16], 16, need_layers=False)[0].num_layers == 1
    with pytest.raises(BenchmarkError, match="key_dim must be an integer >= 1"):
        tiny(key_dim=0)
    with pytest.raises(BenchmarkError, match="fla's chunk kernels reject float32"):
        resolve_dtype("float32", "cuda")
    with pytest.raises(BenchmarkError, match="--repeats must be an integer >= 1"):
        Timing(warmup=1, repeats=0)
    with pytest.raises(BenchmarkError, match="--seq-len must be an integer >= 1"):
        request_from_options("model", {"families": ["delta_net"], "size": "tiny", "batch": 1, "seq_len": 0})


def test_reduction_folders_list_their_pruned_checkpoints_by_ratio(tmp_path):
    for name in ("ratio0.75", "ratio0.25", "ratio0.5"):
        (tmp_path / name / "pruned").mkdir(parents=True)
    (tmp_path / "ratio0.5" / "lora").mkdir()
    (tmp_path / "notes").mkdir()
    assert reduction_checkpoints(tmp_path) == [tmp_path / f"ratio{r}" / "pruned" for r in ("0.25", "0.5", "0.75")]
    with pytest.raises(CheckpointError, match="holds no ratio\\*/pruned checkpoints"):
        reduction_checkpoints(tmp_path / "notes")
    with pytest.raises(CheckpointError, match="does not exist"):
        reduction_checkpoints(tmp_path / "missing")


# ------------------------------------------------------------------------------ whole model

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny random DeltaNet (d_k 16) and its l1- and random-pruned children at ratio 0.5 (d_k 8),
    each in a reduce-like layout."""
    from keyred.checkpoints import new_info, save_checkpoint
    from keyred.fla.models import build_model
    from keyred.reduction.methods import prune_settings
    from keyred.reduction.prune import prune_checkpoint

    root = tmp_path_factory.mktemp("bench_checkpoints")
    save_checkpoint(build_model("delta_net", "tiny", vocab_size=128, seed=0), root / "base",
                    new_info("delta_net", "tiny", stage="train", seed=0))
    prune_checkpoint(root / "base", prune_settings({"method": "l1", "ratio": 0.5}),
                     root / "reduction" / "ratio0.5" / "pruned", log=QUIET)
    prune_checkpoint(root / "base", prune_settings({"method": "random", "ratio": 0.5}),
                     root / "reduction_random" / "ratio0.5" / "pruned", log=QUIET)
    return root


@pytest.fixture(scope="module")
def model_table(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_model") / "model.csv"
    code = main(["model", "--out", str(out), "--name", "tiny", "--checkpoints", str(checkpoints / "base"),
                 "--reductions", str(checkpoints / "reduction"), str(checkpoints / "reduction_random"),
                 "--batch", "2", "--seq-len", "80", "--warmup", "1", "--repeats", "3", "--threads", "1"])
    assert code == 0
    return pd.read_csv(out)


def test_whole_model_benchmark_of_a_baseline_and_its_pruned_checkpoint(model_table, checkpoints):
    check_table(model_table, extra=("tokens_per_s_q25", "tokens_per_s_q75", "latency_ms_q25", "latency_ms_q75"))
    rows = model_table.set_index("label")
    assert list(model_table["label"]) == ["baseline", "l1 0.5", "random 0.5"]
    assert rows.loc["baseline", ["d_k", "d_v", "method", "ratio", "stage"]].tolist() == [16, 16, "none", 0.0, "train"]
    assert rows.loc["l1 0.5", ["d_k", "d_v", "method", "ratio", "stage"]].tolist() == [8, 16, "l1", 0.5, "prune"]
    assert rows.loc["l1 0.5", "parameters"] < rows.loc["baseline", "parameters"]
    assert (model_table["kind"] == "model").all() and (model_table["model"] == "tiny").all()
    assert (model_table["pass"] == "forward").all() and (model_table["kernel"] == "chunk_delta_rule").all()
    assert rows.loc["l1 0.5", "checkpoint"] == str(checkpoints / "reduction" / "ratio0.5" / "pruned")
    assert model_table[["state_bytes_per_seq", "prompt_len"]].isna().all().all()
    assert (model_table["repeats"] == 3).all()
    assert (model_table["latency_ms_q25"] <= model_table["latency_ms_median"]).all()
    assert (model_table["latency_ms_median"] <= model_table["latency_ms_q75"]).all()
    assert (model_table["tokens_per_s_q25"] <= model_table["tokens_per_s"]).all()


def test_two_methods_at_one_ratio_are_one_measured_shape(model_table, checkpoints):
    """l1 and random at 0.5 give the same architecture: timed once (from the first given), both rows
    carry that measurement; two shapes in all, timed round-robin in one process."""
    rows = model_table.set_index("label")
    timing = ["shape", "timed_checkpoint", "tokens_per_s", "tokens_per_s_q25", "tokens_per_s_q75", "latency_ms_min",
              "latency_ms_max", "peak_mem_bytes", "warmup_s"]
    assert rows.loc["l1 0.5", timing].tolist() == rows.loc["random 0.5", timing].tolist()
    assert rows.loc["random 0.5", "timed_checkpoint"] == str(checkpoints / "reduction" / "ratio0.5" / "pruned")
    assert rows.loc["random 0.5", "checkpoint"] == str(checkpoints / "reduction_random" / "ratio0.5" / "pruned")
    assert rows.loc["baseline", "timed_checkpoint"] == str(checkpoints / "base")
    assert model_table["shape"].nunique() == 2 and (model_table["shapes_interleaved"] == 2).all()
    assert rows.loc["baseline", "shape"] == "delta_net 2x64, 4 heads, d_k 16, d_v 16"
    assert rows.loc["l1 0.5", "shape"] == "delta_net 2x64, 4 heads, d_k 8, d_v 16"


def test_group_by_shape_compares_the_whole_architecture():
    from keyred.bench.sources import group_by_shape, shape_source

    small, other = shape_source(tiny(key_dim=8)), shape_source(tiny(key_dim=16))
    again = shape_source(tiny(key_dim=8))
    config = copy.deepcopy(small.config)
    config.attn_mode = "fused_recurrent"  # same widths, another kernel: another shape
    variant = dataclasses.replace(small, config=config, label="variant")
    groups = group_by_shape([small, other, again, variant])
    assert [[member.label for member in group.members] for group in groups] == [
        ["delta_net d_k 8", "delta_net d_k 8"], ["delta_net d_k 16"], ["variant"]]
    assert [group.label for group in groups] == ["delta_net 2x64, 4 heads, d_k 8, d_v 16",
                                                 "delta_net 2x64, 4 heads, d_k 16, d_v 16",
                                                 "delta_net 2x64, 4 heads, d_k 8, d_v 16 #2"]
    assert groups[0].timed is small


def test_interleaved_rounds_rotate_over_the_shapes():
    from keyred.bench.timing import interleaved_order, measure_interleaved

    assert interleaved_order(3, 4) == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]
    assert interleaved_order(1, 2) == [[0], [0]]
    calls = []

    def prepare(index):
        return lambda: (lambda: calls.append(index))

    results = measure_interleaved([prepare(i) for i in range(3)], Timing(warmup=2, repeats=3), "cpu", [0, 0, 0])
    assert calls == [0, 0, 1, 1, 2, 2] + [0, 1, 2, 1, 2, 0, 2, 0, 1]  # warm-ups in order, then rotated rounds
    assert [len(result.seconds) for result in results] == [3, 3, 3]
    assert all(result.peak_mem_kind == "cpu_rss_peak_delta" for result in results)


def test_timing_columns_report_the_quartiles():
    from keyred.bench.timing import Measurement

    result = Measurement(seconds=(0.5, 0.1, 0.4, 0.2, 0.3), warmup_seconds=0.0, kernels=(), peak_mem_bytes=0.0,
                         peak_mem_kind="unavailable")
    columns = result.columns(tokens=100)
    assert columns["latency_ms_median"] == pytest.approx(300)
    assert (columns["latency_ms_q25"], columns["latency_ms_q75"]) == (pytest.approx(200), pytest.approx(400))
    assert columns["tokens_per_s_q25"] == pytest.approx(250) and columns["tokens_per_s_q75"] == pytest.approx(500)
    single = dataclasses.replace(result, seconds=(0.5,)).columns(tokens=100)
    assert single["tokens_per_s_q25"] == single["tokens_per_s_q75"] == pytest.approx(200)


def test_a_missing_checkpoint_is_refused_before_any_work(checkpoints, tmp_path, capsys):
    out = tmp_path / "model.csv"
    code = main(["model", "--out", str(out), "--checkpoints", str(checkpoints / "base"), str(tmp_path / "gone"),
                 "--batch", "2", "--seq-len", "8"])
    captured = capsys.readouterr()
    assert code == 2 and f"error: checkpoint {tmp_path / 'gone'} does not exist" in captured.err
    assert "[bench] model" not in captured.out and not out.exists()


@pytest.mark.parametrize("kind, options", [
    ("model", ["--layers", "2", "--batch", "1000000", "--seq-len", "1000000"]),
    ("mixer", ["--batch", "1000000", "--seq-len", "1000000"]),
    ("decode", ["--layers", "2", "--batches", "1", "1000000000", "--prompt-len", "1000"]),
])
def test_a_shape_too_large_for_memory_is_refused_with_the_numbers(kind, options, tmp_path, capsys):
    out = tmp_path / "out.csv"
    code = main([kind, "--out", str(out), "--families", "delta_net", "--hidden", "64", "--heads", "4",
                 "--key-dims", "16", "--value-dim", "16", *options])
    captured = capsys.readouterr()
    assert code == 2 and "needs an estimated" in captured.err and "GiB is free of RAM" in captured.err
    assert "use a smaller batch or length" in captured.err
    assert f"[bench] {kind} 1/" not in captured.out and not out.exists()


def test_out_of_memory_during_a_run_names_the_shape():
    with pytest.raises(InsufficientMemoryError, match="while running the forward of x at batch 2 x length 80: "
                                                      "CUDA out of memory"):
        with out_of_memory_as_error("the forward of x at batch 2 x length 80"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB\nmore")
    with pytest.raises(RuntimeError, match="unrelated"):
        with out_of_memory_as_error("anything"):
            raise RuntimeError("unrelated")


# ------------------------------------------------------------------------------------ mixers

@pytest.fixture(scope="module")
def mixer_table():
    shapes = [tiny(family, key_dim) for family in ("delta_net", "gated_deltanet") for key_dim in (16, 8)]
    return mixers(shapes, batch=2, seq_len=80)


def test_mixer_benchmark_times_forward_and_backward_at_each_key_dim(mixer_table, tmp_path):
    check_table(mixer_table)
    assert len(mixer_table) == 8
    assert set(mixer_table["pass"]) == {"forward", "forward+backward"}
    assert (mixer_table["num_layers"] == 1).all() and (mixer_table["d_v"] == 16).all()
    parameters = mixer_table.groupby(["family", "d_k"])["parameters"].first()
    assert parameters["delta_net", 8] < parameters["delta_net", 16]
    mixer_table.to_csv(tmp_path / "mixer.csv", index=False)
    assert list(pd.read_csv(tmp_path / "mixer.csv").columns) == list(COLUMNS)


@pytest.mark.parametrize("family, which, seq_len, kernel", [
    ("delta_net", "forward", 64, "fused_recurrent_delta_rule"),
    ("delta_net", "forward", 65, "chunk_delta_rule"),
    ("delta_net", "forward+backward", 64, "fused_recurrent_delta_rule"),   # DeltaNet switches with grad too
    ("delta_net", "forward+backward", 65, "chunk_delta_rule"),
    ("gated_deltanet", "forward", 64, "fused_recurrent_gated_delta_rule"),
    ("gated_deltanet", "forward", 65, "chunk_gated_delta_rule"),
    ("gated_deltanet", "forward+backward", 64, "chunk_gated_delta_rule"),  # the gated layers keep chunk with grad
])
def test_the_kernel_column_names_the_op_the_layer_chose(family, which, seq_len, kernel):
    frame = mixers([tiny(family, 8, heads=2, hidden=32)], batch=1, seq_len=seq_len, passes=(which,),
                   timing=Timing(warmup=1, repeats=1))
    assert frame["kernel"].tolist() == [kernel] and frame["kernel_backend"].tolist() == ["keyred-torch"]


def test_off_the_gpu_the_launch_column_says_keyred_torch(mixer_table):
    assert (mixer_table["launch"] == "eager, keyred-torch").all()


def test_a_cuda_graph_or_an_unknown_launch_is_refused_before_work():
    with pytest.raises(BenchmarkError, match="--cuda-graph needs a CUDA device"):
        mixers([tiny()], batch=1, seq_len=8, cuda_graph=True)
    with pytest.raises(BenchmarkError, match="unknown --kernel-launch 'fast'; allowed: keyred, fla"):
        dataclasses.replace(request("mixer", [tiny()], batch=1, seq_len=8, passes=PASSES), kernel_launch="fast")
    with pytest.raises(BenchmarkError, match="--cuda-graph decoding is not possible here: it needs a CUDA device"):
        run_plan(request("decode", [tiny()], batches=(1,), prompt_len=2, steps=2, cuda_graph=True), "cpu", log=QUIET)


def test_a_gated_backward_that_fla_refuses_on_hopper_is_refused_before_work(monkeypatch):
    import fla.utils

    monkeypatch.setattr(fla.utils, "IS_NVIDIA_HOPPER", True)
    monkeypatch.setattr(fla.utils, "TRITON_ABOVE_3_4_0", True)
    monkeypatch.setattr(fla.utils, "TRITON_ABOVE_3_7_1", False)
    with pytest.raises(BenchmarkError, match="fla refuses the gated backward on Hopper GPUs with triton .* "
                                             "install triton >= 3.7.1 or measure --passes forward"):
        mixers([tiny("gated_deltanet")], batch=1, seq_len=8, passes=("forward+backward",), device="cuda")


# ---------------------------------------------------------------------------------- decoding

DECODE_SHAPES = [tiny(family, key_dim, value_dim=32, heads=2) for family in ("delta_net", "gated_deltanet")
                 for key_dim in (32, 16)]


@pytest.fixture(scope="module")
def decode_table():
    return run_plan(request("decode", DECODE_SHAPES, batches=(1, 3), prompt_len=5, steps=4), "cpu", log=QUIET)


def test_decode_benchmark_table(decode_table):
    check_table(decode_table, extra=("prompt_len", "state_bytes_per_seq", "recurrent_state_bytes_per_seq",
                                     "conv_state_bytes_per_seq"))
    assert len(decode_table) == 8 and (decode_table["pass"] == "decode").all()
    assert (decode_table["seq_len"] == 4).all() and (decode_table["prompt_len"] == 5).all()
    assert set(decode_table["kernel"]) == {"fused_recurrent_delta_rule", "fused_recurrent_gated_delta_rule"}


def test_state_bytes_from_the_cache_equal_the_closed_form(decode_table):
    conv_size, element = 4, 4  # the tiny shapes' short convs; float32 on CPU
    for _, row in decode_table.iterrows():
        layers, heads, d_k, d_v = row["num_layers"], row["num_heads"], row["d_k"], row["d_v"]
        assert row["recurrent_state_bytes_per_seq"] == layers * heads * d_k * d_v * 4
        assert row["conv_state_bytes_per_seq"] == layers * (2 * heads * d_k + heads * d_v) * conv_size * element
        assert row["state_bytes_per_seq"] == row["recurrent_state_bytes_per_seq"] + row["conv_state_bytes_per_seq"]
    recurrent = decode_table.groupby(["family", "d_k"])["recurrent_state_bytes_per_seq"].agg(["min", "max"])
    assert (recurrent["min"] == recurrent["max"]).all()          # the same for every batch size
    for family in ("delta_net", "gated_deltanet"):
        assert recurrent.loc[(family, 32), "min"] == 2 * recurrent.loc[(family, 16), "min"]  # exactly d_k


# ----------------------------------------------------------------------- flags, --spec, workflow

MIXER_FLAGS = ["--families", "delta_net", "gated_deltanet", "--hidden", "256", "--heads", "2", "--value-dim", "128",
               "--key-dims", "128", "64", "32", "--batch", "2", "--seq-len", "256", "--passes", "forward",
               "--cuda-graph", "--warmup", "2", "--repeats", "5"]
MIXER_SPEC = {"families": ["delta_net", "gated_deltanet"], "hidden": 256, "heads": 2, "value_dim": 128,
              "key_dims": [128, 64, 32], "batch": 2, "seq_len": 256, "passes": ["forward"], "cuda_graph": True,
              "warmup": 2, "repeats": 5}


def test_flags_and_spec_build_the_same_request():
    from_flags, _ = parse_request(["mixer", "--out", "m.csv", *MIXER_FLAGS])
    from_spec, args = parse_request(["mixer", "--out", "m.csv", "--spec", json.dumps(MIXER_SPEC)])
    assert from_flags == from_spec == request_from_options("mixer", MIXER_SPEC)
    assert (args.out, args.device, args.threads) == ("m.csv", "auto", None)
    assert len(from_spec.shapes) == 6 and from_spec.cuda_graph and from_spec.passes == ("forward",)
    mixed, _ = parse_request(["mixer", "--out", "m.csv", "--spec", json.dumps({"hidden": 256, "heads": 2}),
                              *MIXER_FLAGS[:3], *MIXER_FLAGS[7:]])  # spec and flags combine
    assert mixed == from_flags
    defaults, _ = parse_request(["decode", "--out", "d.csv", "--families", "delta_net", "--size", "tiny",
                                 "--batches", "1"])
    assert (defaults.timing, defaults.prompt_len, defaults.steps, defaults.kernel_launch, defaults.dtype) == (
        Timing(warmup=3, repeats=10), 16, 128, "keyred", "auto")


@pytest.mark.parametrize("spec, flags, message", [
    ({"batch": 2}, ["--batch", "3", "--seq-len", "8"], "--batch given both in --spec and as flags"),
    ({"batch": 2, "seq_len": 8, "layers": 2}, [], "unknown key(s) 'layers' for mixer; allowed keys: families"),
    ({"batch": "2", "seq_len": 8}, [], "--spec key 'batch': '2' is not an integer"),
    ({"batch": 2, "seq_len": 8, "cuda_graph": 1}, [], "--spec key 'cuda_graph': 1 is not true or false"),
    ({"batch": 2, "seq_len": 8, "families": "delta_net"}, [], "--spec key 'families' must be a list, each item a"),
    ({"batch": 2, "seq_len": 8, "families": ["mamba"]}, [], "'mamba' is not allowed; allowed values: delta_net"),
    ([1, 2], [], "--spec must be a JSON object of mixer options"),
])
def test_a_bad_spec_is_refused_naming_the_key(spec, flags, message, tmp_path, capsys):
    code = main(["mixer", "--out", str(tmp_path / "m.csv"), "--spec", json.dumps(spec), *flags])
    assert code == 2 and not (tmp_path / "m.csv").exists()
    assert message in capsys.readouterr().err


def test_a_required_option_missing_from_flags_and_spec_is_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_request(["model", "--out", "m.csv", "--spec", json.dumps({"batch": 2})])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --seq-len" in capsys.readouterr().err


def test_the_spec_of_each_job_holds_exactly_the_settings_it_reads():
    default = {kind: bench_options(kind, {}) for kind in ("model", "mixer", "decode")}
    changed = {kind: bench_options(kind, {"mixer": {"batch": 7}, "shape": {"num_layers": 5}})
               for kind in ("model", "mixer", "decode")}
    assert changed["model"] == default["model"]
    assert changed["mixer"] == {**default["mixer"], "batch": 7}   # a mixer is one layer: num_layers is not read
    assert changed["decode"] == {**default["decode"], "layers": 5}
    for kind, options in default.items():
        assert request_from_options(kind, options).timing == Timing(warmup=2, repeats=5)  # the schema's defaults
    with pytest.raises(ConfigError, match="config key 'bench.decode.steps': 0 is less than the minimum of 1"):
        bench_settings({"decode": {"steps": 0}})


RECORDED = sorted((REPO / "tests" / "data" / "dry_run_before").glob("*.json"))
BENCH_RULES = ("bench_mixer", "bench_decode", "bench_models")


def command_request(command: str):
    """The request, output, device and threads of a recorded or planned shell command of a bench rule."""
    words = shlex.split(command)
    words = words[words.index("-m") + 2:words.index(">")]
    request, args = parse_request(words)
    return request, (args.kind, args.out, args.device, args.threads)


@pytest.fixture(scope="module")
def planned_workflow(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("bench_workflow"))
    shutil.copytree(REPO / "configs", workdir / "configs")
    return workdir


@pytest.mark.parametrize("recorded", RECORDED, ids=[path.stem for path in RECORDED])
def test_the_workflow_spec_asks_for_what_the_recorded_flags_asked_for(recorded, planned_workflow):
    before = [job for job in json.loads(recorded.read_text()) if job["rule"] in BENCH_RULES]
    config = () if recorded.stem == "default" else ("--configfile", f"configs/{recorded.stem}.yaml",
                                                    "--replace-workflow-config")
    after = {(job["rule"], job["output"]): job for job in dry_run_plan(planned_workflow, *config)
             if job["rule"] in BENCH_RULES}
    assert sorted(after) == sorted((job["rule"], job["output"]) for job in before) and len(before) >= 3
    for old in before:
        new = after[old["rule"], old["output"]]
        assert "-m keyred.stages.bench " in new["command"] and " --spec " in new["command"]
        assert (new["log"], new["resources"]) == (old["log"], old["resources"])
        expected, arguments = command_request(old["command"])
        if old["rule"] == "bench_models":  # one method's checkpoints now stand for every method's shape
            assert len(expected.reductions) > 1
            expected = dataclasses.replace(expected, reductions=expected.reductions[:1])
        assert command_request(new["command"]) == (expected, arguments), old["rule"]


# ------------------------------------------------------------------------------------- plots

def is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_dim_scaling_plot(mixer_table, decode_table, tmp_path):
    ratios = figures.key_dim_ratios(pd.concat([mixer_table, decode_table]), reference_key_dim=16)
    reference = ratios[ratios["d_k"] == 16]
    assert np.allclose(reference["speedup"], 1) and np.allclose(reference["memory_ratio"].dropna(), 1)
    decode = ratios[(ratios["kind"] == "decode") & (ratios["d_k"] == 32)]
    assert (decode["memory_measure"] == "state_bytes_per_seq").all() and (decode["memory_ratio"] > 1).all()
    assert ratios.loc[ratios["kind"] == "mixer", "memory_ratio"].isna().all()  # a CPU RSS delta is no tensor memory
    figures.plot_key_dim_scaling(mixer_table, decode_table, tmp_path / "scaling.png", reference_key_dim=16)
    figures.plot_key_dim_scaling(None, decode_table, tmp_path / "decode.png", reference_key_dim=16)
    assert is_png(tmp_path / "scaling.png") and is_png(tmp_path / "decode.png")
    with pytest.raises(ValueError, match="no d_k = 128 row to compare with"):
        figures.key_dim_ratios(decode_table, reference_key_dim=128)


def test_pareto_front():
    points = pd.DataFrame({"speed": [1.0, 2.0, 3.0, 3.0, 0.5], "loss": [1.0, 1.5, 2.0, 2.5, 0.9]})
    assert figures.pareto_front(points, "speed", "loss").index.tolist() == [4, 0, 1, 2]
    assert figures.pareto_front(points, "speed", "loss", higher_is_better=True).index.tolist() == [3]


def test_pareto_front_treats_overlapping_speeds_as_equal():
    """B is 5% faster than A but within A's spread, and worse: only with the spread is it dominated.
    C is faster beyond every spread: it stays. When all spreads overlap, the best point alone is left."""
    points = pd.DataFrame({"speed": [100.0, 105.0, 200.0], "low": [90.0, 95.0, 190.0], "high": [110.0, 115.0, 210.0],
                           "loss": [1.0, 1.2, 1.5]}, index=["A", "B", "C"])
    assert figures.pareto_front(points, "speed", "loss").index.tolist() == ["A", "B", "C"]
    assert figures.pareto_front(points, "speed", "loss", low="low", high="high").index.tolist() == ["A", "C"]
    close = points.assign(low=[90.0, 95.0, 100.0], high=[110.0, 115.0, 300.0])
    assert figures.pareto_front(close, "speed", "loss", low="low", high="high").index.tolist() == ["A"]
    tied = points.assign(loss=[1.0, 1.0, 1.5])  # equal quality, overlapping speeds: neither dominates
    assert figures.pareto_front(tied, "speed", "loss", low="low", high="high").index.tolist() == ["A", "B", "C"]


def model_rows(shapes):
    """Whole-model benchmark rows: (label, method, ratio, shape, tokens/s) with a +-10% spread."""
    return pd.DataFrame([dict(kind="model", model="m", label=label, method=method, ratio=ratio, shape=shape,
                              d_k=16 if ratio == 0 else 8, tokens_per_s=speed, tokens_per_s_q25=0.9 * speed,
                              tokens_per_s_q75=1.1 * speed, repeats=5, batch=2, seq_len=8, dtype="float32",
                              device="cpu", device_name="x") for label, method, ratio, shape, speed in shapes])


def test_quality_joins_the_speed_of_its_ratio_whatever_the_method():
    bench = model_rows([("baseline", "none", 0.0, "d_k 16", 100.0), ("l1 0.5", "l1", 0.5, "d_k 8", 150.0)])
    quality = pd.DataFrame([
        dict(model="m", method="none", ratio=0.0, stage="unpruned", value=2.0),
        dict(model="m", method="l1", ratio=0.5, stage="lora", value=2.4),
        dict(model="m", method="drrqr", ratio=0.5, stage="lora", value=2.2),
        dict(model="m", method="drrqr", ratio=0.5, stage="pruned", value=3.0),
    ]).assign(task="heldout_perplexity", metric="bits_per_byte", n=10)
    joined = figures.speed_quality_table(bench, quality).set_index("method")
    assert joined.loc["drrqr", ["tokens_per_s", "shape", "stage"]].tolist() == [150.0, "d_k 8", "lora"]
    assert joined.loc["l1", "tokens_per_s"] == 150.0 and joined.loc["none", "tokens_per_s"] == 100.0
    twice = pd.concat([bench, model_rows([("random 0.5", "random", 0.5, "d_k 8", 140.0)])])
    with pytest.raises(ValueError, match="m at ratio 0.5 has 2 measurements"):
        figures.speed_quality_table(twice, quality)
    with pytest.raises(ValueError, match="no tokens_per_s_q25, tokens_per_s_q75 columns"):
        figures.speed_quality_table(bench.drop(columns=["tokens_per_s_q25", "tokens_per_s_q75"]), quality)


def test_quality_vs_speed_plot(model_table, tmp_path):
    quality = pd.DataFrame([
        dict(model="tiny", method="none", ratio=0.0, stage="unpruned", value=2.0),
        dict(model="tiny", method="l1", ratio=0.5, stage="pruned", value=3.0),
        dict(model="tiny", method="l1", ratio=0.5, stage="lora", value=2.4),
        dict(model="tiny", method="drrqr", ratio=0.5, stage="lora", value=2.3),
    ]).assign(task="heldout_perplexity", metric="bits_per_byte", n=10)
    joined = figures.speed_quality_table(model_table, quality)
    assert sorted(zip(joined["method"], joined["stage"], joined["value"])) == [
        ("drrqr", "lora", 2.3), ("l1", "lora", 2.4), ("none", "unpruned", 2.0)]
    assert np.isfinite(joined["tokens_per_s"]).all()
    assert joined.loc[joined["method"] == "drrqr", "tokens_per_s"].item() == joined.loc[
        joined["method"] == "l1", "tokens_per_s"].item()   # speed is the shape's: the drrqr model was never timed
    figures.plot_quality_vs_speed(model_table, quality, tmp_path / "pareto.png")
    assert is_png(tmp_path / "pareto.png")
    with pytest.raises(ValueError, match="no \\(model, ratio\\) in both tables"):
        figures.speed_quality_table(model_table, quality.assign(model="other"))
    assert math.isclose(joined["ratio"].max(), 0.5)

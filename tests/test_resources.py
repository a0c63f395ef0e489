"""keyred.resources: the cluster resources of every workflow job, from one table."""
import pytest

from keyred.fla import families as models
from keyred.resources import KEYS, MODEL_STAGES, SHAPE_STAGES, SIZES, STAGES, job_resources


def test_sizes_are_the_model_sizes():
    assert SIZES == models.SIZES


@pytest.mark.parametrize("stage", MODEL_STAGES)
def test_model_stages_grow_with_model_size(stage):
    asked = [job_resources(stage, size=size, family="delta_net", device="cuda") for size in SIZES]
    for smaller, larger in zip(asked, asked[1:]):
        assert larger["mem_mb"] >= smaller["mem_mb"] and larger["runtime"] >= smaller["runtime"]
    assert asked[-1]["mem_mb"] > asked[0]["mem_mb"] and asked[-1]["runtime"] > asked[0]["runtime"]
    assert all(r["gpu"] == 1 for r in asked)


@pytest.mark.parametrize("stage", MODEL_STAGES + SHAPE_STAGES)
def test_gpu_stages_ask_for_no_gpu_off_cuda(stage):
    for device in ("cpu", "auto"):
        asked = job_resources(stage, size="tiny", device=device, gpus=4, threads=2)
        assert asked["gpu"] == 0 and asked["cpus_per_gpu"] == 0
    assert job_resources(stage, size="tiny", device="cuda", threads=2)["cpus_per_gpu"] == 2


@pytest.mark.parametrize("stage", ["data", "tables"])
def test_cpu_stages_never_ask_for_a_gpu(stage):
    assert job_resources(stage, device="cuda", gpus=8)["gpu"] == 0


def test_training_asks_for_the_configured_gpus_and_memory_per_process():
    one = job_resources("train", size="340M", family="delta_net", device="cuda", gpus=1, threads=8)
    eight = job_resources("train", size="340M", family="delta_net", device="cuda", gpus=8, threads=8)
    assert (one["gpu"], eight["gpu"]) == (1, 8)
    assert eight["cpus_per_gpu"] == 8 and eight["mem_mb"] == 8 * one["mem_mb"]
    assert eight["runtime"] == one["runtime"]
    # evaluation and reduction use one GPU whatever the training uses
    assert job_resources("evaluate", size="340M", device="cuda", gpus=8)["gpu"] == 1


def test_gated_deltaproduct_gets_more_time():
    product = job_resources("train", size="small", family="gated_deltaproduct", device="cuda")
    plain = job_resources("train", size="small", family="gated_deltanet", device="cuda")
    assert product["runtime"] == 2 * plain["runtime"] and product["mem_mb"] == plain["mem_mb"]


def test_training_asks_for_24_hours_at_most_and_resumes_beyond():
    for size in SIZES:
        assert job_resources("train", size=size, family="gated_deltaproduct", device="cuda")["runtime"] <= 1440


def test_data_scales_with_the_token_budget():
    sample = job_resources("data")
    budget = job_resources("data", token_budget=10_000_000_000)
    assert budget["mem_mb"] > sample["mem_mb"] + 40_000 and budget["runtime"] > sample["runtime"]


def test_every_stage_gives_every_key():
    for stage in STAGES:
        assert tuple(job_resources(stage, size="tiny")) == KEYS


def test_values_are_whole_numbers_as_sbatch_needs():
    for stage in MODEL_STAGES:
        for size in SIZES:
            asked = job_resources(stage, size=size, family="gated_deltaproduct", device="cuda", gpus=2)
            assert all(isinstance(value, int) and value >= 0 for value in asked.values()), asked


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="unknown stage 'plot'"):
        job_resources("plot")
    with pytest.raises(ValueError, match="allowed sizes: tiny, small, 340M, 1.3B"):
        job_resources("train", size="huge")
    with pytest.raises(ValueError, match="gpus must be"):
        job_resources("train", size="tiny", gpus=0)

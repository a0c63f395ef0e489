"""keyred.reduction (methods, selection, surgery, prune) and keyred.stages.prune: settings,
per-method channel choice, surgery, reloadable checkpoints, CLI.

Tiny models of the three families, calibrated on the packed Wikipedia sample. Paths that must
agree: ratio 0 == original (bit for bit), a model whose Q/K channels are permuted within heads
== the original (and pruning follows the permutation), surgery == the rows the method kept.
"""
import copy
import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from keyred.config import ConfigError, load_schema, section_settings, validate_config
from keyred.fla.families import FAMILIES, exact_ratio
from keyred.reduction.methods import (DRRQR_SAMPLING, METHODS, PCA_METHODS, PruneSettings, check_prunable,
                                      checkpoint_key_dim, new_key_dim, prune_settings)
from keyred.reduction.prune import prune_checkpoint, prune_model
from keyred.reduction.selection import select_channels
from keyred.reduction.surgery import apply_selection, pca_conv_error
from keyred.stages.prune import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(calibration_sequences=4, calibration_length=64, gradient_sequences=4, batch_size=2, rrqr_rows=512)
QUIET = lambda message: None  # noqa: E731


def settings(method, ratio, **changes):
    return prune_settings({"method": method, "ratio": ratio, **SMALL, **changes})


@pytest.fixture(scope="module")
def models():
    from keyred.fla.models import build_model

    return {family: build_model(family, "tiny", vocab_size=512, seed=0).eval() for family in FAMILIES}


@pytest.fixture(scope="module")
def packed(packed_wikipedia):
    return packed_wikipedia / "packed"


@pytest.fixture(scope="module")
def tokens(packed):
    from keyred.data.packing import PackedTokens

    return torch.from_numpy(PackedTokens(packed, "validation").sequences(72)[:1].astype(np.int64))


def logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def attention(model, index):
    return model.model.layers[index].attn


def steps(layer):
    return getattr(layer, "num_householder", 1)


def expected_rows(layer, kept, key_steps):
    """Rows of a (step, head, channel) projection that keep channels kept[h] of every head."""
    heads, dim = layer.num_heads, layer.head_k_dim
    return torch.cat([step * heads * dim + h * dim + kept[h] for step in range(key_steps) for h in range(heads)])


# ------------------------------------------------------------------------------------ settings

@pytest.mark.parametrize("values, message", [
    ({"method": "magnitude", "ratio": 0.5}, "allowed methods: drrqr, rrqr, l1, wanda, taylor, random, pca"),
    ({"method": "l1", "ratio": 1.0}, "'prune.ratio': 1.0 is greater than or equal to the maximum of 1"),
    ({"method": "l1", "ratio": -0.1}, "'prune.ratio': -0.1 is less than the minimum of 0"),
    ({"method": "l1", "ratio": True}, "'prune.ratio': True is not of type 'number'"),
    ({"method": "l1", "ratio": 0.5, "round_to": 8}, "'reduction.prune.round_to': 8 is not allowed; allowed values: 1, 16"),
    ({"method": "l1", "ratio": 0.5, "calibration_length": 1}, "'reduction.prune.calibration_length': 1 is less than"),
    ({"method": "l1", "ratio": 0.5, "rrqr_f": 1.0}, "'reduction.prune.rrqr_f': 1.0 is less than or equal to the minimum"),
    ({"method": "l1", "ratio": 0.5, "max_swaps": -1}, "'reduction.prune.max_swaps': -1 is less than the minimum of 0"),
    ({"method": "l1", "ratio": 0.5, "batch_size": 2.0}, "'reduction.prune.batch_size': 2.0 is not of type 'integer'"),
    ({"method": "l1", "ratio": 0.5, "lr": 1}, "unknown key(s) 'lr'"),
    ({"ratio": 0.5}, "missing key(s) method"),
])
def test_bad_settings_name_the_problem(values, message):
    with pytest.raises(ConfigError) as error:
        prune_settings(values)
    assert message in str(error.value)


def test_settings_take_the_schema_defaults():
    defaults = load_schema()["properties"]["reduction"]["properties"]["prune"]["properties"]
    built = prune_settings({"method": "l1", "ratio": 0.5})
    assert dataclasses.asdict(built) == {"method": "l1", "ratio": 0.5,
                                         **{key: entry["default"] for key, entry in defaults.items()}}
    assert built == section_settings(PruneSettings, "reduction.prune", {}, method="l1", ratio=0.5)
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(PruneSettings))


def test_methods_are_the_schema_enumeration():
    """Every method is allowed; the default list is the KeyReduction paper's seven (pca_prenorm,
    keyred's variant of its pca baseline, only on request)."""
    reduction = load_schema()["properties"]["reduction"]["properties"]
    assert tuple(reduction["methods"]["items"]["enum"]) == METHODS
    assert tuple(reduction["methods"]["default"]) == tuple(method for method in METHODS if method != "pca_prenorm")
    assert tuple(reduction["prune"]["properties"]["drrqr_sampling"]["enum"]) == DRRQR_SAMPLING
    assert reduction["prune"]["properties"]["drrqr_sampling"]["default"] == "positions"


def test_rrqr_f_must_exceed_one_before_any_job():
    """Strong RRQR's bound f must be > 1 (at f = 1 the swap loop need not end): the config check
    that the Snakefile runs and the settings of a job both refuse it, naming the key."""
    with pytest.raises(ConfigError, match=r"'reduction\.prune\.rrqr_f': 1 is less than or equal to the minimum of 1"):
        validate_config({"reduction": {"prune": {"rrqr_f": 1}}})
    with pytest.raises(ConfigError, match=r"'reduction\.prune\.rrqr_f': 1 is less than or equal to the minimum of 1"):
        section_settings(PruneSettings, "reduction.prune", {"rrqr_f": 1}, method="drrqr", ratio=0.5)
    assert validate_config({"reduction": {"prune": {"rrqr_f": 1.01}}})["reduction"]["prune"]["rrqr_f"] == 1.01


def test_new_key_dim():
    assert new_key_dim(16, 0.0) == 16
    assert new_key_dim(16, 0.5) == 8
    assert new_key_dim(16, 0.25) == 12
    assert new_key_dim(10, 0.7) == 3
    assert new_key_dim(10, 0.8) == 2                         # 10 * (1 - 0.8) = 1.9999999999999996
    assert new_key_dim(100, 0.34) == 66
    assert new_key_dim(16, 0.9375) == 1
    assert new_key_dim(128, 0.3, round_to=16) == 80          # floor(89.6) = 89 -> 80
    assert new_key_dim(128, 0.9, round_to=16) == 16          # 12 -> 0 -> at least 16
    with pytest.raises(ConfigError, match=r"leaves d_k' = 0 of d_k = 16; ratio must be at most 1 - 1/d_k = 0.9375"):
        new_key_dim(16, 0.95)
    with pytest.raises(ConfigError, match="needs d_k >= 16, but the model has d_k = 8"):
        new_key_dim(8, 0.5, round_to=16)
    with pytest.raises(ConfigError, match="nothing would be pruned"):
        new_key_dim(16, 0.5, round_to=16)


def test_families_without_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="model type 'llama' has no linear-attention keys.*delta_net, gated_deltanet"):
        check_prunable(SimpleNamespace(model_type="llama"))
    with pytest.raises(ConfigError, match="hybrid models"):
        check_prunable(SimpleNamespace(model_type="gated_deltanet", head_dim=16, attn={"layers": [1]}))
    with pytest.raises(ConfigError, match="qk_activation 'relu'"):
        check_prunable(SimpleNamespace(model_type="delta_net", qk_activation="relu", hidden_size=64, expand_k=1,
                                       num_heads=4))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2"}))
    with pytest.raises(ConfigError, match="'mamba2' has no linear-attention keys"):
        checkpoint_key_dim(tmp_path)
    with pytest.raises(ConfigError, match="has no config.json"):
        checkpoint_key_dim(tmp_path / "missing")


def test_fractional_expand_v_keeps_the_value_dim(models):
    """fla truncates head_dim * expand_v: the plain quotient 256 / 98 loses a value channel."""
    from fla.layers import GatedDeltaNet, GatedDeltaProduct

    assert int(98 * (256 / 98)) == 255
    for layer_class in (GatedDeltaNet, GatedDeltaProduct):
        with pytest.raises(ValueError, match="does not produce an integer"):
            layer_class(hidden_size=32, head_dim=98, expand_v=256 / 98, num_heads=1)
        layer = layer_class(hidden_size=32, head_dim=98, expand_v=exact_ratio(256, 98), num_heads=1)
        assert layer.head_v_dim == 256
    for key_dim in range(1, 513):
        for value_dim in (1, 64, 128, 256, 512, 1024):
            assert int(key_dim * exact_ratio(value_dim, key_dim)) == value_dim


# ------------------------------------------------------------------------------ methods, surgery

@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_reproduces_the_logits_exactly(family, models, packed, tokens):
    """Ratio 0 keeps every channel (pca: T = identity), so the surgery copies every tensor: the
    logits must be bit-identical, not merely close."""
    model = models[family]
    reference = logits(model, tokens)
    for method in METHODS:
        pruned, extra = prune_model(model, settings(method, 0.0), packed, log=QUIET)
        assert torch.equal(logits(pruned, tokens), reference), method
        assert extra["new_key_dim"] == extra["key_dim"] == 16 and extra["calibration"]["sequences"] == 0
        if method not in PCA_METHODS:
            assert extra["kept_indices"] == [[list(range(16))] * 4] * 2


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_keeps_distinct_channels_and_slices_them(family, models, packed, tokens):
    model = models[family]
    value_dim = attention(model, 0).head_v_dim
    for method in METHODS:
        pruned, extra = prune_model(model, settings(method, 0.5), packed, log=QUIET)
        assert extra["method"] == method and extra["new_key_dim"] == 8 and extra["value_dim"] == value_dim
        assert torch.isfinite(logits(pruned, tokens)).all(), method
        for index in range(2):
            old, new = attention(model, index), attention(pruned, index)
            assert (new.head_k_dim, new.head_v_dim) == (8, value_dim)
            for unchanged in ("v_proj", "b_proj", "o_proj"):
                assert torch.equal(getattr(new, unchanged).weight, getattr(old, unchanged).weight)
            if method in PCA_METHODS:
                continue
            kept = torch.tensor(extra["kept_indices"][index])
            assert kept.shape == (4, 8)
            assert all(len(set(row.tolist())) == 8 and row.tolist() == sorted(row.tolist()) for row in kept)
            q_rows, k_rows = expected_rows(old, kept, 1), expected_rows(old, kept, steps(old))
            assert torch.equal(new.q_proj.weight, old.q_proj.weight[q_rows])
            assert torch.equal(new.k_proj.weight, old.k_proj.weight[k_rows])
            assert torch.equal(new.q_conv1d.weight, old.q_conv1d.weight[q_rows])
            assert torch.equal(new.k_conv1d.weight, old.k_conv1d.weight[k_rows])
        if method in ("drrqr", "rrqr"):
            assert len(extra["rrqr"]["swaps"]) == 2 and len(extra["rrqr"]["swaps"][0]) == 4
        if method in ("drrqr", "pca", "pca_prenorm", "wanda", "taylor"):
            loss = {"loss": "lm"} if method == "taylor" else {}
            assert extra["calibration"] == {"sequences": 4, "length": 64, "tokens": 256, "source": "packed", **loss}


@pytest.mark.parametrize("method", PCA_METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_pca_projects_and_reports_its_conv_error(family, method, models, packed):
    model = models[family]
    spec = settings(method, 0.5)
    pruned, extra = prune_model(model, spec, packed, log=QUIET)
    assert extra["kept_indices"] is None
    statistics = extra["pca_statistics"]
    assert statistics["l2_normalised"] == statistics["centred"] == (method == "pca")
    assert statistics["keys_per_head"] == 4 * 64 * steps(attention(model, 0))
    error = extra["pca_conv_error"]
    assert len(error["q"]) == len(error["k"]) == 2 and 0 < error["mean"] < 2
    # the top half of a PSD matrix's eigenvalues hold at least half of its trace
    assert all(0.5 <= share <= 1 + 1e-9 for layer in extra["pca_energy_kept"] for share in layer)
    # W' = T W with orthonormal rows T, recovered here from the pruned and original q_proj
    old, new = attention(model, 0), attention(pruned, 0)
    for head in range(4):
        w_old = old.q_proj.weight[head * 16:(head + 1) * 16].double()
        w_new = new.q_proj.weight[head * 8:(head + 1) * 8].double()
        transform = w_new @ torch.linalg.pinv(w_old)
        torch.testing.assert_close(transform @ transform.T, torch.eye(8, dtype=torch.float64), atol=1e-4, rtol=0)
    # the error measure itself is 0 for a pure channel selection (a conv follows a selection exactly)
    from keyred.data.packing import PackedTokens

    windows = PackedTokens(packed, "train").sequences(128)[:2]
    selection = select_channels(model, settings("l1", 0.5), 8)
    selected = apply_selection(model, selection, 8)
    exact = pca_conv_error(model, selected, selection, windows, spec, "cpu", QUIET)
    assert exact["mean"] == 0.0


def permuted(model, permutations):
    """A copy whose Q/K channels are permuted within heads: new channel j of head h is old channel
    permutations[layer][h, j], in q_proj, every key step of k_proj, and both short convs."""
    model = copy.deepcopy(model)
    for index, permutation in enumerate(permutations):
        layer = attention(model, index)
        rows = {"q": expected_rows(layer, permutation, 1), "k": expected_rows(layer, permutation, steps(layer))}
        with torch.no_grad():
            for which, order in rows.items():
                for module in (getattr(layer, f"{which}_proj"), getattr(layer, f"{which}_conv1d")):
                    module.weight.copy_(module.weight[order].clone())
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_is_channel_selection_only(family, models, tokens):
    """Permuting channels within heads changes nothing, and l1 keeps the same (moved) channels."""
    model = models[family]
    generator = torch.Generator().manual_seed(1)
    permutations = [torch.stack([torch.randperm(16, generator=generator) for _ in range(4)]) for _ in range(2)]
    shuffled = permuted(model, permutations)
    torch.testing.assert_close(logits(shuffled, tokens), logits(model, tokens), atol=1e-5, rtol=1e-5)
    pruned, extra = prune_model(model, settings("l1", 0.5), log=QUIET)
    pruned_shuffled, extra_shuffled = prune_model(shuffled, settings("l1", 0.5), log=QUIET)
    for permutation, kept, kept_shuffled in zip(permutations, extra["kept_indices"], extra_shuffled["kept_indices"]):
        for head in range(4):
            assert sorted(permutation[head, kept_shuffled[head]].tolist()) == kept[head]
    torch.testing.assert_close(logits(pruned_shuffled, tokens), logits(pruned, tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_follows_the_gradients(family, models, packed):
    """A channel with the largest weights but a zero conv kernel cannot move the loss: its gradient
    is exactly 0, so taylor prunes it while l1 keeps it."""
    model = copy.deepcopy(models[family])
    layer = attention(model, 0)
    rows = {"q": expected_rows(layer, torch.tensor([[3]] * 4), 1),
            "k": expected_rows(layer, torch.tensor([[3]] * 4), steps(layer))}
    with torch.no_grad():
        for which, channel in rows.items():
            getattr(layer, f"{which}_proj").weight[channel] *= 10
            getattr(layer, f"{which}_conv1d").weight[channel] = 0
    _, l1 = prune_model(model, settings("l1", 0.5), log=QUIET)
    _, taylor = prune_model(model, settings("taylor", 0.5, gradient_sequences=2, calibration_length=64), packed,
                            log=QUIET)
    assert all(3 in head for head in l1["kept_indices"][0])
    assert all(3 not in head for head in taylor["kept_indices"][0])
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in models[family].parameters()]


# ------------------------------------------------------------------- drrqr's row sampling

def stacked_rows(model, windows: np.ndarray) -> list[torch.Tensor]:
    """Per layer, each head's stacked rows [Q; K] [H, N L (1 + n), d_k] recomputed here: q_proj and
    k_proj outputs (hooked), a causal depthwise conv written with F.conv1d, then SiLU; q rows in
    token order, then k rows in (token, step) order."""
    import torch.nn.functional as F
    from keyred.fla.models import attention_layers

    layers, outputs = attention_layers(model), {}
    handles = [getattr(layer, f"{which}_proj").register_forward_hook(
        lambda m, a, out, key=(i, which): outputs.setdefault(key, out.detach()))
        for i, (_, layer) in enumerate(layers) for which in ("q", "k")]
    with torch.no_grad():
        model(input_ids=torch.from_numpy(windows))
    for handle in handles:
        handle.remove()
    stacked = []
    for index, (_, layer) in enumerate(layers):
        parts = []
        for which in ("q", "k"):
            x, conv = outputs[index, which].transpose(1, 2), getattr(layer, f"{which}_conv1d")
            with torch.no_grad():
                padded = F.pad(x, (conv.weight.shape[-1] - 1, 0))
                y = F.silu(F.conv1d(padded, conv.weight, conv.bias, groups=x.shape[1]))
            parts.append(y.transpose(1, 2).reshape(-1, layer.num_heads, layer.head_k_dim))
        stacked.append(torch.cat(parts).transpose(0, 1))
    return stacked


@pytest.mark.parametrize("family", ["delta_net", "gated_deltaproduct"])
def test_drrqr_per_head_draws_the_reference_rows(family, models):
    """per_head: rows of each head's stacked [Q; K], a fresh numpy RandomState(seed) choice per
    layer and head; windows in 2 batches (the draw does not depend on the batching)."""
    from keyred.fla.models import attention_layers
    from keyred.reduction.calibration import activation_statistics, drrqr_sampling

    model, windows = models[family], np.random.default_rng(0).integers(0, 512, size=(3, 40)).astype(np.int64)
    layers, stacked = attention_layers(model), stacked_rows(model, windows)
    available = stacked[0].shape[1]
    assert available == 3 * 40 * (1 + steps(attention(model, 0)))
    spec = settings("drrqr", 0.5, rrqr_rows=50, drrqr_sampling="per_head", seed=42)
    rows = activation_statistics(model, layers, windows, spec, "cpu", QUIET)
    generator = np.random.RandomState(42)
    for entry, expected in zip(rows, stacked):
        drawn = [np.sort(generator.choice(available, 50, replace=False)) for _ in range(4)]
        assert entry["rows"].shape == (4, 50, 16) and len({tuple(d) for d in drawn}) == 4   # a fresh draw per head
        for head in range(4):
            torch.testing.assert_close(entry["rows"][head], expected[head, drawn[head]], atol=1e-5, rtol=1e-5)
    assert drrqr_sampling(layers, windows, spec) == {
        "rule": "per_head", "rows": 50, "rows_available": available, "seed": 42,
        "draw": "rows of each head's stacked [Q; K] without replacement, a fresh draw per layer and head "
                "(numpy RandomState.choice)"}
    everything = activation_statistics(model, layers, windows, dataclasses.replace(spec, rrqr_rows=available), "cpu",
                                       QUIET)
    for entry, expected in zip(everything, stacked):     # not more rows than asked for: all of them, in order
        torch.testing.assert_close(entry["rows"], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["delta_net", "gated_deltaproduct"])
def test_drrqr_positions_share_token_positions(family, models):
    """positions (the default): every head of every layer reads the q row and the n k rows of the
    same tokens."""
    from keyred.fla.models import attention_layers
    from keyred.reduction.calibration import activation_statistics, drrqr_sampling

    model, windows = models[family], np.random.default_rng(0).integers(0, 512, size=(3, 40)).astype(np.int64)
    layers, stacked, n = attention_layers(model), stacked_rows(model, windows), steps(attention(model, 0))
    spec = settings("drrqr", 0.5, rrqr_rows=60)
    assert spec.drrqr_sampling == "positions"
    chosen = torch.randperm(120, generator=torch.Generator().manual_seed(spec.seed))[:60 // (1 + n)].sort().values
    keys = (120 + chosen[:, None] * n + torch.arange(n)).flatten()
    for entry, expected in zip(activation_statistics(model, layers, windows, spec, "cpu", QUIET), stacked):
        torch.testing.assert_close(entry["rows"], expected[:, torch.cat([chosen, keys])], atol=1e-5, rtol=1e-5)
    assert drrqr_sampling(layers, windows, spec)["rows"] == 60 // (1 + n) * (1 + n)


def test_drrqr_records_its_sampling_and_the_default_is_unchanged(models, packed):
    model = models["gated_deltanet"]
    _, default = prune_model(model, settings("drrqr", 0.5), packed, log=QUIET)
    _, positions = prune_model(model, settings("drrqr", 0.5, drrqr_sampling="positions"), packed, log=QUIET)
    _, per_head = prune_model(model, settings("drrqr", 0.5, drrqr_sampling="per_head", rrqr_rows=300), packed,
                              log=QUIET)
    assert default["kept_indices"] == positions["kept_indices"]
    assert default["drrqr_sampling"] == {"rule": "positions", "rows": 512, "rows_available": 512, "seed": 0,
                                         "draw": positions["drrqr_sampling"]["draw"]}
    assert (per_head["drrqr_sampling"]["rule"], per_head["drrqr_sampling"]["rows"]) == ("per_head", 300)
    assert per_head["settings"]["drrqr_sampling"] == "per_head" and per_head["rrqr"]["rows"] == 300
    assert all(len(set(head)) == 8 for layer in per_head["kept_indices"] for head in layer)
    with pytest.raises(ConfigError, match=r"'reduction\.prune\.drrqr_sampling': 'rows' is not allowed; "
                                          r"allowed values: positions, per_head"):
        settings("drrqr", 0.5, drrqr_sampling="rows")


# ------------------------------------------------------------------- task calibration

def task_data(count: int = 5, length: int = 12):
    """Token ids and targets [count, length] (np.int64): about half the positions scored, one
    window not scored at all."""
    rng = np.random.default_rng(3)
    windows = rng.integers(0, 512, size=(count, length)).astype(np.int64)
    targets = np.where(rng.random((count, length)) < 0.5, rng.integers(0, 512, size=(count, length)), -100)
    targets[1] = -100
    return windows, targets.astype(np.int64)


def task_loss(model, windows, targets):
    """The mean cross-entropy of the logits at t against targets[t] over the scored positions."""
    logits = model(input_ids=torch.from_numpy(windows)).logits
    scored = torch.from_numpy(targets != -100)
    return -torch.log_softmax(logits.double(), -1)[scored, torch.from_numpy(targets)[scored]].mean()


def test_taylor_with_targets_takes_the_gradient_of_the_task_loss(models):
    from keyred.fla.models import attention_layers
    from keyred.reduction.calibration import taylor_gradients
    from keyred.reduction.selection import top_channels
    from keyred.reduction.channels import by_head, weights_by_head

    model = copy.deepcopy(models["delta_net"]).double()
    layers, (windows, targets) = attention_layers(model), task_data()
    spec = settings("taylor", 0.5, batch_size=2)
    gradients = taylor_gradients(model, layers, windows, spec, "cpu", QUIET, targets)
    assert all(p.grad is None for p in model.parameters())
    task_loss(model, windows, targets).backward()
    for (_, layer), (q, k) in zip(layers, gradients):
        torch.testing.assert_close(q, layer.q_proj.weight.grad, atol=1e-12, rtol=1e-9)
        torch.testing.assert_close(k, layer.k_proj.weight.grad, atol=1e-12, rtol=1e-9)
    model.zero_grad(set_to_none=True)
    weight, direction = layers[0][1].q_proj.weight, torch.randn_like(layers[0][1].q_proj.weight)
    with torch.no_grad():     # a central difference along a random direction, no autograd
        weight += 1e-5 * direction
        above = task_loss(model, windows, targets)
        weight -= 2e-5 * direction
        below = task_loss(model, windows, targets)
        weight += 1e-5 * direction
    assert (above - below).item() / 2e-5 == pytest.approx((gradients[0][0] * direction).sum().item(), rel=1e-6)
    kept = select_channels(model, spec, 8, windows, log=QUIET, targets=targets).kept
    for (_, layer), grads, chosen in zip(layers, gradients, kept):
        scores = (weights_by_head(layer) * by_head(layer, *grads)).abs().sum((1, 3))
        assert torch.equal(chosen, top_channels(scores, 8).cpu())


def test_targets_of_the_next_token_give_the_lm_gradients(models):
    from keyred.fla.models import attention_layers
    from keyred.reduction.calibration import taylor_gradients

    model, (windows, _) = models["gated_deltaproduct"], task_data()
    layers, spec = attention_layers(model), settings("taylor", 0.5, batch_size=2)
    shifted = np.concatenate([windows[:, 1:], np.full((len(windows), 1), -100)], 1)
    for lm, task in zip(taylor_gradients(model, layers, windows, spec, "cpu", QUIET),
                        taylor_gradients(model, layers, windows, spec, "cpu", QUIET, shifted)):
        for a, b in zip(lm, task):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_given_windows_prune_like_the_packed_corpus(models, packed):
    """Windows given directly are those the packed path draws: the same choice per method; the
    metadata says where they came from."""
    from keyred.reduction.calibration import calibration_windows

    model = models["gated_deltanet"]
    for method in ("drrqr", "pca", "wanda", "taylor"):
        spec = settings(method, 0.5)
        windows = calibration_windows(packed, spec.calibration_count, spec.calibration_length, spec.seed)
        pruned, extra = prune_model(model, spec, packed, log=QUIET)
        given, given_extra = prune_model(model, spec, windows=windows.astype(np.int64), log=QUIET)
        assert given_extra["kept_indices"] == extra["kept_indices"], method
        for name, tensor in pruned.state_dict().items():
            torch.testing.assert_close(given.state_dict()[name], tensor, atol=1e-6, rtol=1e-5)
        assert given_extra["calibration"] == {**extra["calibration"], "source": "windows"}
    windows, targets = task_data()
    _, extra = prune_model(model, settings("taylor", 0.5), windows=windows, targets=targets, log=QUIET)
    assert extra["calibration"] == {"sequences": 5, "length": 12, "tokens": 60, "source": "windows",
                                    "loss": "targets", "scored_positions": int((targets != -100).sum())}
    _, extra = prune_model(model, settings("l1", 0.5), windows=windows, targets=targets, log=QUIET)
    assert extra["calibration"] == {"sequences": 0, "length": 0, "tokens": 0, "source": None}


def test_bad_task_windows_are_refused(models, packed):
    model, (windows, targets) = models["delta_net"], task_data()
    spec = settings("taylor", 0.5)
    cases = [(dict(packed=packed, windows=windows), "'windows': give calibration data once"),
             (dict(targets=targets), "'targets': targets need their windows"),
             (dict(windows=windows[0]), "'windows': must be a non-empty integer array [N, L]"),
             (dict(windows=windows.astype(np.float32)), "'windows': must be a non-empty integer array"),
             (dict(windows=windows + 512), "token ids must lie in [0, 512)"),
             (dict(windows=windows, targets=targets[:, :-1]), "'targets': must be an integer array shaped like"),
             (dict(windows=windows, targets=np.full_like(targets, -100)), "scores no position"),
             (dict(windows=windows, targets=np.where(targets == -100, -100, 512)), "scored targets must lie in"),
             (dict(), "method taylor needs calibration data")]
    for arguments, message in cases:
        with pytest.raises(ConfigError) as error:
            prune_model(model, spec, log=QUIET, **arguments)
        assert message in str(error.value), (arguments.keys(), str(error.value))


# ------------------------------------------------------------------------ checkpoints and CLI

@pytest.fixture(scope="module")
def checkpoints(models, packed, tmp_path_factory):
    """Per family: the source checkpoint, it pruned by l1 at 0.5 (delta_net through the CLI), and
    that pruned again by random at 0.5."""
    from keyred.checkpoints import new_info, save_checkpoint

    root = tmp_path_factory.mktemp("prune")
    folders = {}
    for family, model in models.items():
        source, once, twice = root / f"{family}_source", root / f"{family}_l1", root / f"{family}_twice"
        save_checkpoint(model, source, new_info(family, "tiny", stage="train", seed=0))
        spec = json.dumps({"method": "l1", "ratio": 0.5})
        common = ["--packed", str(packed), "--device", "cpu", "--threads", "1"]
        if family == "delta_net":
            assert main(["--checkpoint", str(source), "--spec", spec, "--out", str(once), *common]) == 0
        else:
            prune_checkpoint(source, prune_settings({"method": "l1", "ratio": 0.5}), once, packed, log=QUIET)
        assert main(["--checkpoint", str(once), "--spec", json.dumps({"method": "random", "ratio": 0.5, "seed": 3}),
                     "--out", str(twice), *common]) == 0
        folders[family] = SimpleNamespace(source=source, once=once, twice=twice)
    return folders


def test_checkpoint_metadata(checkpoints, models, tokens):
    from keyred.checkpoints import read_info
    from keyred.fla.models import load_checkpoint

    for family, folders in checkpoints.items():
        info = read_info(folders.once)
        assert (info.family, info.size, info.stage, info.parent) == (family, "tiny", "prune", str(folders.source))
        extra = info.extra
        assert (extra["method"], extra["ratio"], extra["round_to"], extra["key_dim"], extra["new_key_dim"]) == \
               ("l1", 0.5, 1, 16, 8)
        assert np.array(extra["kept_indices"]).shape == (2, 4, 8)
        assert extra["calibration"]["sequences"] == 0 and extra["seconds"] > 0 and "pruned_again_from" not in extra
        assert extra["settings"]["method"] == "l1"
        pruned, _ = prune_model(models[family], settings("l1", 0.5), log=QUIET)
        reloaded, _ = load_checkpoint(folders.once)
        assert torch.equal(logits(reloaded, tokens), logits(pruned, tokens))

        again = read_info(folders.twice)
        assert again.parent == str(folders.once) and again.extra["key_dim"] == 8 and again.extra["new_key_dim"] == 4
        assert again.extra["pruned_again_from"] == {"checkpoint": str(folders.once), "stage": "prune", "key_dim": 8,
                                                    "method": "l1", "ratio": 0.5, "parent": str(folders.source)}
        twice, _ = load_checkpoint(folders.twice)
        assert torch.isfinite(logits(twice, tokens)).all()


def test_a_finetuned_pruned_model_counts_as_pruned(checkpoints, tmp_path):
    """keyred.training.lora nests its input's metadata under "source"."""
    from keyred.io import write_json
    from keyred.checkpoints import read_info

    finetuned = tmp_path / "finetuned"
    shutil.copytree(checkpoints["gated_deltanet"].once, finetuned)
    info = read_info(finetuned)
    write_json(finetuned / "keyred.json", {**dataclasses.asdict(info), "stage": "finetune", "parent": "pruned",
                                           "extra": {"settings": {}, "source": info.extra}})
    prune_checkpoint(finetuned, prune_settings({"method": "l1", "ratio": 0.25}), tmp_path / "out", log=QUIET)
    assert read_info(tmp_path / "out").extra["pruned_again_from"] == {
        "checkpoint": str(finetuned), "stage": "finetune", "key_dim": 8, "method": "l1", "ratio": 0.5,
        "parent": "pruned"}


def test_pruned_checkpoints_reload_with_plain_transformers(checkpoints):
    """Only `import fla` and transformers, never keyred; loading and shapes only (no CPU forward)."""
    script = textwrap.dedent("""
        import json, sys
        import fla  # noqa: F401
        from transformers import AutoModelForCausalLM
        shapes = {}
        for path in sys.argv[1:]:
            model = AutoModelForCausalLM.from_pretrained(path)
            attn = model.model.layers[0].attn
            shapes[path] = [attn.head_k_dim, attn.head_v_dim, list(attn.q_proj.weight.shape),
                            list(attn.k_proj.weight.shape), list(attn.v_proj.weight.shape)]
        assert not any(name.split(".")[0] == "keyred" for name in sys.modules)
        print(json.dumps(shapes))
    """)
    paths = [str(folder) for folders in checkpoints.values()
             for folder in (folders.source, folders.once, folders.twice)]
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    shapes = json.loads(done.stdout.strip().splitlines()[-1])
    for family, folders in checkpoints.items():
        key_steps, value_dim = (2 if family == "gated_deltaproduct" else 1), (16 if family == "delta_net" else 32)
        source = shapes[str(folders.source)]
        assert source[:2] == [16, value_dim]
        for folder, key_dim in ((folders.once, 8), (folders.twice, 4)):
            head_k, head_v, q, k, v = shapes[str(folder)]
            assert (head_k, head_v) == (key_dim, value_dim)
            assert q == [4 * key_dim, 64] and k == [key_steps * 4 * key_dim, 64] and v == source[4]


def test_cli_refuses_bad_input_before_loading(models, packed, tmp_path, capsys):
    from keyred.checkpoints import new_info, save_checkpoint

    source = tmp_path / "source"
    save_checkpoint(models["gated_deltanet"], source, new_info("gated_deltanet", "tiny", stage="train"))
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    capsys.readouterr()
    cases = [(source, '{"method": "obs", "ratio": 0.5}', "allowed methods: drrqr, rrqr"),
             (source, '{"method": "l1", "ratio": 0.99}', "leaves d_k' = 0 of d_k = 16"),
             (source, '{"method": "l1", "ratio": 0.5', "--spec is not valid JSON"),
             (source, '{"method": "pca", "ratio": 0.5, "calibration_sequences": 100000}',
              "100000 calibration windows of 2048 tokens"),
             (tmp_path / "llama", '{"method": "l1", "ratio": 0.5}', "no linear-attention keys")]
    for checkpoint, spec, message in cases:
        try:
            code = main(["--checkpoint", str(checkpoint), "--packed", str(packed), "--spec", spec,
                         "--out", str(tmp_path / "out")])
        except SystemExit as exit:         # argparse: bad JSON
            code = exit.code
        error = capsys.readouterr().err
        assert code == 2 and "error: " in error and message in error, error
    assert not (tmp_path / "out").exists()

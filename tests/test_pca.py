"""keyred.reduction's two pca methods: pca (the KeyReduction paper's baseline: centred covariance
of the L2-normalised keys) and pca_prenorm (uncentred second moment of the keys before the norm).

Known answers on constructed keys, where the two statistics (and the two half-way variants) pick
different top directions, and the real hook path on the tiny models against keys recomputed
here from the weights (a plain causal depthwise conv, SiLU, fla's l2norm formula, numpy's cov).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from keyred.fla.families import FAMILIES
from keyred.reduction.calibration import add_key_moments, empty_key_moments, key_statistic
from keyred.reduction.methods import ACTIVATION_METHODS, METHODS, PCA_METHODS, prune_settings
from keyred.reduction.selection import pca_selection, select_channels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUIET = lambda message: None  # noqa: E731
E1, E2, E3 = torch.eye(3, dtype=torch.float64)


def constructed_keys() -> torch.Tensor:
    """Keys [R, 1, 3] k = r u: unit directions u = (2, +-1, +-0.5) / |.| (all four sign pairs,
    equally often) times scales r in {2, 20} independent of u.

    After the L2 norm the keys are u: mean (2, 0, 0) / |.|, centred covariance diag(0, 1, 0.25) /
    5.25, so pca's directions are e2 then e3. The uncentred moment of u, diag(4, 1, 0.25) / 5.25,
    puts e1 first; so do the pre-norm statistics (E[r^2] E[u u^T] uncentred, and centred
    diag(4 Var r, E r^2, E r^2 / 4) / 5.25 with 4 Var r = 324 > E r^2 = 202)."""
    signs = torch.tensor([[a, b] for a in (1.0, -1.0) for b in (1.0, -1.0)], dtype=torch.float64)
    directions = torch.cat([torch.full((4, 1), 2.0, dtype=torch.float64), signs * torch.tensor([1.0, 0.5])], 1)
    directions = directions / directions.norm(dim=1, keepdim=True)
    scales = torch.tensor([2.0, 20.0], dtype=torch.float64)
    keys = (scales[:, None, None] * directions[None]).reshape(-1, 3)
    return keys.repeat(5, 1)[:, None, :].float()           # [40, 1, 3], one head


def statistic(keys, normalised: bool, chunks: int = 4) -> dict:
    sums = empty_key_moments()
    for part in keys.chunk(chunks):                         # several calibration batches
        add_key_moments(sums, part, normalised)
    return key_statistic(sums, normalised)


def top_direction(matrix) -> torch.Tensor:
    return pca_selection([matrix], 1).transforms[0][0, 0]


def test_pca_uses_the_centred_covariance_of_the_normalised_keys():
    keys = constructed_keys()
    pca = statistic(keys, normalised=True)
    unit = keys.double() / (keys.double().square().sum(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(pca["mean"][0], unit[:, 0].mean(0))
    expected = torch.diag(torch.tensor([0.0, 1.0, 0.25], dtype=torch.float64)) / 5.25
    torch.testing.assert_close(pca["covariance"][0], expected, atol=1e-6, rtol=0)   # eps 1e-6 of fla's l2norm
    assert pca["count"] == 40
    selection = pca_selection([pca["covariance"]], 2)
    torch.testing.assert_close(selection.transforms[0][0], torch.stack([E2, E3]), atol=1e-9, rtol=0)
    assert selection.stats["pca_energy_kept"] == [[pytest.approx(1.0, abs=1e-6)]]     # e1 has no variance
    assert pca_selection([pca["covariance"]], 1).stats["pca_energy_kept"] == [[pytest.approx(0.8, abs=1e-6)]]


def test_pca_prenorm_and_the_half_way_variants_pick_another_direction():
    keys = constructed_keys()
    prenorm = statistic(keys, normalised=False)["second_moment"]
    torch.testing.assert_close(prenorm[0].double(), keys[:, 0].double().T @ keys[:, 0].double() / 40,
                               atol=1e-4, rtol=1e-6)
    assert torch.allclose(top_direction(prenorm).double(), E1, atol=1e-6)
    normalised = statistic(keys, normalised=True)
    uncentred_normalised = normalised["covariance"] + torch.einsum("hd,he->hde", normalised["mean"], normalised["mean"])
    assert torch.allclose(top_direction(uncentred_normalised), E1, atol=1e-9)
    centred_prenorm = torch.from_numpy(np.cov(keys[:, 0].double().numpy().T, bias=True))[None]
    assert torch.allclose(top_direction(centred_prenorm), E1, atol=1e-9)
    assert torch.allclose(top_direction(normalised["covariance"]), E2, atol=1e-9)


def test_the_pcas_are_methods_of_their_own():
    assert PCA_METHODS == ("pca", "pca_prenorm") and set(PCA_METHODS) <= set(METHODS)
    assert set(PCA_METHODS) <= set(ACTIVATION_METHODS)
    assert prune_settings({"method": "pca_prenorm", "ratio": 0.5}).calibration_count == 16


def normalised_keys(model, windows: np.ndarray) -> list[np.ndarray]:
    """Per layer, the L2-normalised keys [N L n, H, d_k] recomputed from the weights: k_proj
    outputs (hooked), a causal depthwise conv written here with F.conv1d, SiLU, x / sqrt(|x|^2 + eps)."""
    from keyred.fla.models import attention_layers

    layers, outputs = attention_layers(model), {}
    handles = [layer.k_proj.register_forward_hook(lambda m, a, out, i=i: outputs.setdefault(i, out.detach()))
               for i, (_, layer) in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=torch.from_numpy(windows))
    finally:
        for handle in handles:
            handle.remove()
    keys = []
    for index, (_, layer) in enumerate(layers):
        x, conv = outputs[index].transpose(1, 2), layer.k_conv1d.requires_grad_(False)
        width = conv.weight.shape[-1]
        y = F.silu(F.conv1d(F.pad(x, (width - 1, 0)), conv.weight, conv.bias, groups=x.shape[1])).transpose(1, 2)
        y = y.double().reshape(-1, layer.num_heads, layer.head_k_dim)
        keys.append((y / (y.square().sum(-1, keepdim=True) + 1e-6).sqrt()).numpy())
    return keys


@pytest.mark.parametrize("family", FAMILIES)
def test_pca_on_a_model_is_the_covariance_of_its_normalised_keys(family):
    """The hook path (k short-conv outputs, every key step of Gated DeltaProduct) gives the top
    eigenvectors of numpy's covariance of the recomputed normalised keys."""
    from keyred.fla.models import build_model

    model = build_model(family, "tiny", vocab_size=512, seed=0).eval()
    windows = np.random.default_rng(0).integers(0, 512, size=(3, 40)).astype(np.int64)
    settings = prune_settings({"method": "pca", "ratio": 0.5, "batch_size": 2})
    selection = select_channels(model, settings, 8, windows, log=QUIET)
    steps = getattr(model.model.layers[0].attn, "num_householder", 1)
    assert selection.stats["pca_statistics"] == {
        "keys": "k (short-conv outputs with SiLU; queries not read)", "keys_per_head": 3 * 40 * steps,
        "l2_normalised": True, "centred": True, "statistic": "covariance E[(k^ - m)(k^ - m)^T]"}
    for transforms, keys in zip(selection.transforms, normalised_keys(model, windows)):
        for head in range(keys.shape[1]):
            values, vectors = np.linalg.eigh(np.cov(keys[:, head].T, bias=True))
            expected = torch.from_numpy(vectors[:, ::-1][:, :8].T.copy())
            overlap = (transforms[head] @ expected.T).abs()
            torch.testing.assert_close(overlap.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-4, rtol=0)
    prenorm = select_channels(model, prune_settings({"method": "pca_prenorm", "ratio": 0.5, "batch_size": 2}), 8,
                              windows, log=QUIET)
    assert prenorm.stats["pca_statistics"]["l2_normalised"] is False
    assert prenorm.stats["pca_statistics"]["centred"] is False
    assert not torch.allclose(prenorm.transforms[0], selection.transforms[0], atol=1e-2)

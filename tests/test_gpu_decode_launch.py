"""keyred's launch of fla's fused-recurrent DeltaNet kernel and graph-captured decoding, on a CUDA GPU.

The autotuned launch (and its in-place state update) must give fla's own outputs and states, and
a decoding step captured in a CUDA graph and replayed must give the same logits and states as
eager decoding with fla's launch, token by token (teacher-forced, so one flipped argmax cannot
make the two diverge). Skipped without a GPU.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fla's Triton kernels)")]

from fla.ops.delta_rule import fused_recurrent_delta_rule  # noqa: E402

from keyred.bench.timing import capture_cuda_graph  # noqa: E402
from keyred.fla.models import build_model  # noqa: E402
from keyred.fla.launch.decode_launch import decode_launch  # noqa: E402


def _inputs(batch, heads, key_dim, value_dim, seed=0):
    generator = torch.Generator("cuda").manual_seed(seed)
    q, k = (torch.nn.functional.normalize(torch.randn(batch, 1, heads, key_dim, device="cuda", generator=generator),
                                          dim=-1).bfloat16() for _ in range(2))
    v = torch.randn(batch, 1, heads, value_dim, device="cuda", generator=generator).bfloat16()
    beta = torch.rand(batch, 1, heads, device="cuda", generator=generator).bfloat16()
    state = torch.randn(batch, heads, key_dim, value_dim, device="cuda", generator=generator) * 0.1
    return q, k, v, beta, state


@pytest.mark.parametrize("key_dim", [32, 64, 128])
def test_keyred_launch_gives_fla_outputs_and_states(key_dim):
    q, k, v, beta, state = _inputs(64, 4, key_dim, 128)
    with decode_launch("fla"):
        o_fla, state_fla = fused_recurrent_delta_rule(q, k, v, beta, initial_state=state, output_final_state=True)
    with decode_launch("keyred"):
        o_keyred, state_keyred = fused_recurrent_delta_rule(q, k, v, beta, initial_state=state,
                                                            output_final_state=True)
    torch.testing.assert_close(o_keyred, o_fla, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(state_keyred, state_fla, rtol=1e-5, atol=1e-5)
    held = state.clone()
    with torch.no_grad(), decode_launch("keyred", in_place=True):
        o_in_place, state_in_place = fused_recurrent_delta_rule(q, k, v, beta, initial_state=held,
                                                                output_final_state=True)
    assert state_in_place.data_ptr() == held.data_ptr(), "in place: the state tensor is updated, not replaced"
    torch.testing.assert_close(state_in_place, state_fla, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_in_place, o_fla, rtol=1e-2, atol=1e-3)


def _states(cache):
    return [cache[index]["recurrent_state"].clone() for index in range(len(cache))]


def test_graph_replayed_decoding_equals_eager_decoding():
    model = build_model("delta_net", "tiny", vocab_size=512).cuda().bfloat16().eval()
    tokens = torch.randint(0, 512, (8, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    prompt, forced = tokens[:, :8], tokens[:, 8:]
    with torch.no_grad(), decode_launch("fla"):
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        eager = [model(input_ids=forced[:, t:t + 1], past_key_values=cache, use_cache=True).logits
                 for t in range(forced.shape[1])]
        eager_states = _states(cache)
    with torch.no_grad(), decode_launch("keyred", in_place=True):
        cache = model(input_ids=prompt, use_cache=True).past_key_values
        ids = forced[:, :1].clone()
        logits = torch.empty_like(eager[0])
        position = {"t": 0}

        def step():  # the three warm-up calls of capture_cuda_graph decode tokens 0, 1, 2 eagerly
            logits.copy_(model(input_ids=ids, past_key_values=cache, use_cache=True).logits)
            position["t"] += 1
            ids.copy_(forced[:, min(position["t"], forced.shape[1] - 1)].unsqueeze(1))

        graph = capture_cuda_graph(step)  # warm-up steps ran; the captured step itself has not
        assert position["t"] == 4  # 3 warm-up calls and the capture call (recorded, not run)
        replayed = []
        for t in range(3, forced.shape[1]):
            ids.copy_(forced[:, t:t + 1])
            graph.replay()
            replayed.append(logits.clone())
        for t, result in enumerate(replayed, start=3):
            torch.testing.assert_close(result, eager[t], rtol=2e-2, atol=2e-2, msg=f"logits of step {t}")
        for got, want in zip(_states(cache), eager_states):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

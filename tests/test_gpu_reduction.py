"""Key reduction on a CUDA GPU (skipped without one): drrqr calibration through fla's Triton
kernels with the strong-RRQR selection on the GPU, then LoRA recovery in bf16 autocast."""
import pytest
import torch

from keyred.training.lora import finetune, finetune_settings
from keyred.fla.families import key_head_dim
from keyred.fla.models import build_model
from keyred.reduction.methods import prune_settings
from keyred.reduction.prune import prune_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fla's Triton kernels)")]


def test_drrqr_and_lora_run_on_the_gpu(packed_wikipedia):
    model = build_model("delta_net", "tiny", vocab_size=512, seed=0).to("cuda")
    settings = prune_settings({"method": "drrqr", "ratio": 0.5, "calibration_sequences": 4, "calibration_length": 128,
                               "gradient_sequences": 4, "batch_size": 4, "rrqr_rows": 1024})
    pruned, extra = prune_model(model, settings, packed_wikipedia / "packed", device="cuda")
    assert key_head_dim(pruned.config) == 8 and extra["rrqr"]["all_converged"]
    assert all(len(set(head)) == 8 for layer in extra["kept_indices"] for head in layer)

    recovered, rows, summary = finetune(pruned.to("cuda"), packed_wikipedia / "packed",
                                        finetune_settings({"steps": 10, "batch_size": 4, "seq_len": 128,
                                                           "lr": 2e-3, "warmup_steps": 1, "eval_sequences": 4}),
                                        device="cuda")
    assert next(recovered.parameters()).is_cuda
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in rows[1:])
    assert summary["val_loss_after"] < summary["val_loss_before"]

"""Recall models (fla causal LMs over the MQAR vocabulary), their masked loss and their score.

The model reads a sequence [S, 3N] and is scored at the query positions only (targets != IGNORE_INDEX):
accuracy is the fraction of queries whose argmax prediction is the value; its standard error is
taken over sequences (queries of one sequence share one state, so they are not independent).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from keyred.data import IGNORE_INDEX
from keyred.data.recall import vocabulary_size
from keyred.device import mixed_precision
from keyred.bench.shapes import ModelShape, config_fields
from keyred.fla.models import CONFIG_CLASSES
from keyred.recall.spec import RecallModel

EVAL_BATCH_SIZE = 512                # sequences per forward pass when scoring


def recall_config(settings: RecallModel, key_vocab: int):
    """The fla config of a recall model: the family's tiny architecture reshaped to settings
    (keyred.bench.shapes.config_fields; short conv on, one output per token, cross-entropy computed
    by keyred), with settings.fla on top."""
    shape = ModelShape(family=settings.family, hidden_size=settings.hidden_size, num_layers=settings.num_layers,
                       num_heads=settings.num_heads, key_dim=settings.key_dim, value_dim=settings.value_dim,
                       vocab_size=vocabulary_size(key_vocab))
    keys = {**config_fields(shape), "fuse_cross_entropy": False, "use_cache": False, **settings.fla}
    return CONFIG_CLASSES[settings.family](**keys, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def build_recall_model(settings: RecallModel, key_vocab: int, seed: int):
    """A freshly initialised recall model (float32, CPU), deterministic in `seed`."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(recall_config(settings, key_vocab))


def recall_loss(model, inputs, targets):
    """Mean cross-entropy over the query positions of token ids inputs [B, L] (long tensors on the
    model's device; targets [B, L] with IGNORE_INDEX elsewhere)."""
    logits = model(input_ids=inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def batch_tensors(inputs: np.ndarray, targets: np.ndarray, rows, device: str):
    """(inputs, targets) long tensors [len(rows), L] on device."""
    return (torch.from_numpy(inputs[rows].astype(np.int64)).to(device),
            torch.from_numpy(targets[rows].astype(np.int64)).to(device))


def score_recall(model, inputs: np.ndarray, targets: np.ndarray, device: str = "cpu") -> dict:
    """accuracy over every query of the set [S, 3N], its stderr over sequences (std of the
    per-sequence accuracy / sqrt(S)), and the number of sequences."""
    model.eval()
    per_sequence = []
    with torch.no_grad(), mixed_precision(device):
        for start in range(0, len(inputs), EVAL_BATCH_SIZE):
            rows = slice(start, start + EVAL_BATCH_SIZE)
            tokens, wanted = batch_tensors(inputs, targets, rows, device)
            predicted = model(input_ids=tokens, use_cache=False).logits.argmax(-1)
            scored = wanted != IGNORE_INDEX
            correct = ((predicted == wanted) & scored).sum(1).float() / scored.sum(1).float()
            per_sequence.append(correct.cpu().numpy())
    accuracy = np.concatenate(per_sequence)
    stderr = float(accuracy.std(ddof=1) / math.sqrt(len(accuracy))) if len(accuracy) > 1 else float("nan")
    return {"accuracy": float(accuracy.mean()), "stderr": stderr, "sequences": len(accuracy)}

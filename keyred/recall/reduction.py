"""Key reduction of one trained recall model: every method at every ratio, scored on every test
set before and after a LoRA recovery on the task.

Calibration (drrqr, the pcas, wanda, taylor) reads seeded training sequences of the task, with the
task's targets for taylor (its loss is the recall loss at the query positions); the pruning itself
is keyred.reduction.prune.prune_model's. Recovery: peft LoRA (keyred.training.lora.add_lora: the
recall.reduction.finetune keys rank, alpha, dropout, target_modules, train_extra) trained for
`steps` batches of training sequences with the recall loss, AdamW, warm-up + cosine to
lr * min_lr_ratio, clipping, then merged. The reduction.finetune keys that concern language
modelling (seq_len, distillation, eval_sequences, log_every) are not used here.
"""

from __future__ import annotations

import copy
import time

import numpy as np

from keyred.checkpoints import LORA, PRUNED, UNPRUNED
from keyred.fla.families import key_head_dim
from keyred.recall.model import batch_tensors, recall_loss, score_recall
from keyred.recall.spec import RecallReduction, RecallTask, test_set
from keyred.reduction.methods import new_key_dim, prune_settings
from keyred.reduction.prune import prune_model
from keyred.training.batches import BatchOrder
from keyred.training.lora import BETAS, FinetuneSettings, add_lora, finetune_settings
from keyred.training.optimizer import (build_optimizer, check_finite, clip_and_step, learning_rate,
                                       set_learning_rate)


def score_sets(model, task: RecallTask, sets: dict, device: str, columns: dict) -> list[dict]:
    """One row per test set of task.scored_pairs: `columns`, pairs, accuracy, stderr, sequences."""
    return [{**columns, "pairs": pairs, **score_recall(model, *sets[test_set(pairs)], device)}
            for pairs in task.scored_pairs]


def recover(pruned, train_set, settings: FinetuneSettings, device: str, name: str):
    """LoRA-train `pruned` (modified in place) on the task for settings.steps batches; return the
    merged model (eval mode) and the mean loss of the last ten steps."""
    peft_model = add_lora(pruned, settings)
    optimizer = build_optimizer(peft_model, settings.lr, settings.weight_decay, BETAS, device)
    order = BatchOrder(len(train_set[0]), settings.batch_size, settings.seed)
    losses = []
    for step in range(settings.steps):
        peft_model.train()
        lr = learning_rate(step, settings.lr, settings.steps, settings.warmup_steps, settings.min_lr_ratio)
        set_learning_rate(optimizer, lr)
        inputs, targets = batch_tensors(*train_set, order.rows(step), device)
        loss = recall_loss(peft_model, inputs, targets)
        check_finite(loss, name, step + 1, lr)
        loss.backward()
        clip_and_step(peft_model, optimizer, settings.grad_clip)
        losses.append(loss.item())
    return peft_model.merge_and_unload().eval(), float(np.mean(losses[-10:]))


def calibration(train_set, count: int, seed: int):
    """`count` seeded training sequences (inputs, targets) [count, 3N] for the calibrated methods."""
    rows = np.sort(np.random.default_rng(seed).choice(len(train_set[0]), min(count, len(train_set[0])),
                                                      replace=False))
    return train_set[0][rows], train_set[1][rows]


def reduce_recall(model, task: RecallTask, reduction: RecallReduction, sets: dict, device: str,
                  columns: dict, log=print) -> list[dict]:
    """Rows (columns + method, ratio, stage, key_dim, pairs, accuracy, stderr, sequences, seconds,
    recovery_loss) for the unpruned model and every method x ratio, pruned and after recovery."""
    key_dim = key_head_dim(model.config)
    rows = score_sets(model, task, sets, device, {**columns, "method": "unpruned", "ratio": 0.0, "stage": UNPRUNED,
                                                  "new_key_dim": key_dim, "seconds": 0.0, "recovery_loss": float("nan")})
    finetune = finetune_settings(reduction.finetune)
    for method in reduction.methods:
        for ratio in reduction.ratios:
            settings = prune_settings({**reduction.prune, "method": method, "ratio": ratio})
            start = time.perf_counter()
            windows, targets = calibration(sets["train"], max(settings.calibration_count, 1), settings.seed)
            pruned, _ = prune_model(copy.deepcopy(model), settings, device=device, log=lambda line: None,
                                    windows=windows, targets=targets)
            count = new_key_dim(key_dim, ratio, settings.round_to)
            common = {**columns, "method": method, "ratio": ratio, "new_key_dim": count}
            rows += score_sets(pruned, task, sets, device, {**common, "stage": PRUNED,
                                                            "seconds": time.perf_counter() - start,
                                                            "recovery_loss": float("nan")})
            start = time.perf_counter()
            recovered, loss = recover(pruned, sets["train"], finetune, device, f"{columns['model']} {method} {ratio}")
            rows += score_sets(recovered, task, sets, device, {**common, "stage": LORA,
                                                               "seconds": time.perf_counter() - start,
                                                               "recovery_loss": loss})
            at_task = [row for row in rows[-2 * len(task.scored_pairs):] if row["pairs"] == task.pairs]
            log(f"[recall] {columns['model']} seed {columns['seed']} {method} ratio {ratio} (d_k {key_dim} -> "
                f"{count}): accuracy at N={task.pairs} pruned {at_task[0]['accuracy']:.3f}, after LoRA "
                f"{at_task[1]['accuracy']:.3f}")
    return rows

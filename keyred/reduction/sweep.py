"""The key-reduction sweep of one model and one method over every ratio: prune, evaluate, recover
with LoRA, evaluate again.

One process per (model, method): fla is imported and the parent loaded once for all ratios.
For each ratio, keyred.reduction.prune reduces d_k of the parent (a plain fla checkpoint);
keyred.training.lora recovers it with LoRA (adapters merged; distillation from the parent when
finetune.distill is set); keyred.evaluation scores both on the test split. The output folder is
written as a whole, in the layout of keyred.checkpoints: per ratio the pruned and LoRA
checkpoints (reduced_checkpoint; each with the tokenizer, its evaluation rows in its model card,
the LoRA one with its adapter before merging), and the tables (reduction_table_path) evaluation (model, method,
ratio, stage = pruned | lora, task, metric, value, n), length_extrapolation (the same columns with
position, loss) and finetune_loss.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import (ADAPTER_FOLDER, LORA, PRUNED, new_info, ratio_folder, reduced_checkpoint,
                                reduction_table_path, save_checkpoint)
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError, section_settings
from keyred.data.corpus import read_documents
from keyred.data.packing import read_token_file
from keyred.data.tokenizer import load_tokenizer
from keyred.evaluation.extrapolation import length_extrapolation
from keyred.evaluation.runner import check_vocabulary, evaluate_model, with_columns
from keyred.evaluation.settings import evaluate_settings
from keyred.reduction.methods import SECTION as PRUNE_SECTION
from keyred.reduction.methods import PruneSettings, check_prunable, new_key_dim
from keyred.reduction.prune import prune_model
from keyred.training.lora import check_targets, finetune, finetune_settings, lora_record

SECTIONS = ("prune", "finetune", "evaluate")


def read_sections(spec, method: str, ratios: list[float]):
    """(prune settings per ratio, finetune settings, evaluate settings) from the spec; ConfigError if bad."""
    if not isinstance(spec, dict) or set(spec) != set(SECTIONS):
        raise ConfigError(f"the spec must be a JSON object with exactly the sections {', '.join(SECTIONS)}")
    folders = {}
    for index, ratio in enumerate(ratios):       # each ratio writes its own folder of the output
        first = folders.setdefault(ratio_folder(ratio), index)
        if first != index:
            raise ConfigError(f"ratios {ratios[first]} and {ratio} would share the folder {ratio_folder(ratio)}; "
                              f"give each ratio once, with at most 6 significant digits")
    prunes = [section_settings(PruneSettings, PRUNE_SECTION, spec["prune"], method=method, ratio=ratio)
              for ratio in ratios]
    return prunes, finetune_settings(spec["finetune"]), evaluate_settings(spec["evaluate"])


def evaluate_stage(model, tokenizer, documents, heldout_tokens, context: int, settings, device: str,
                   columns: dict, log):
    """(results, extrapolation) DataFrames of one model with `columns` (model, method, ratio, stage) in front."""
    curve = length_extrapolation(model, heldout_tokens, context, settings.extrapolation_factor,
                                 settings.extrapolation_sequences, device, settings.seed)
    results = evaluate_model(model, tokenizer, documents, settings, log)
    return with_columns(results, **columns), with_columns(curve, **columns)


class _Sweep:
    """What every ratio of one sweep shares: the parent, the held-out data, the settings and the
    tables collected so far."""

    def __init__(self, name, checkpoint, packed, corpus, tokenizer_dir, sections, context, out, device, log):
        self.name, self.checkpoint, self.packed, self.context, self.out = name, checkpoint, packed, context, out
        self.device, self.log = device, log
        self.prunes, self.finetuning, self.evaluation = sections
        self.parent, self.parent_info = load_checkpoint(checkpoint, device=device)
        self.key_dim = check_prunable(self.parent.config)
        for settings in self.prunes:                  # every ratio must leave keys before any work starts
            new_key_dim(self.key_dim, settings.ratio, settings.round_to)
        check_targets(self.parent, self.finetuning.target_modules)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        check_vocabulary(self.parent, self.tokenizer)
        self.documents = read_documents(Path(corpus) / "test.jsonl")
        self.heldout_tokens = read_token_file(Path(packed) / "test.npy")
        self.results, self.curves, self.losses = [], [], []

    def evaluate(self, model, columns: dict) -> list[dict]:
        """Score one model, keep its tables and return its evaluation rows (task, metric, value, n)."""
        results, curve = evaluate_stage(model, self.tokenizer, self.documents, self.heldout_tokens, self.context,
                                        self.evaluation, self.device, columns, self.log)
        self.results.append(results)
        self.curves.append(curve)
        return results[["task", "metric", "value", "n"]].to_dict("records")

    def reduce_ratio(self, settings: PruneSettings, tmp: Path) -> None:
        """Prune the parent at settings.ratio, evaluate, recover with LoRA, evaluate; checkpoints into `tmp`."""
        ratio, info = settings.ratio, self.parent_info
        self.log(f"[reduce] {self.name} {settings.method} ratio {ratio}: d_k {self.key_dim} -> "
                 f"{new_key_dim(self.key_dim, ratio, settings.round_to)}")
        pruned, extra = prune_model(copy.deepcopy(self.parent), settings, self.packed, self.device, self.log)
        columns = dict(model=self.name, method=settings.method, ratio=ratio, stage=PRUNED)
        save_checkpoint(pruned, reduced_checkpoint(tmp, ratio, PRUNED),
                        new_info(info.family, info.size, stage="prune", seed=settings.seed,
                                 parent=str(self.checkpoint), extra=extra),
                        tokenizer=self.tokenizer, evaluation=self.evaluate(pruned, columns))
        teacher = self.parent if self.finetuning.distill else None
        pruned.name_or_path = str(reduced_checkpoint(self.out, ratio, PRUNED))    # the adapter's base
        with tempfile.TemporaryDirectory(prefix="keyred-adapter-") as adapter:
            recovered, rows, summary = finetune(pruned, self.packed, self.finetuning, self.device, teacher, self.log,
                                                adapter)
            lora = {"settings": dataclasses.asdict(self.finetuning),
                    "lora": lora_record(self.finetuning, ADAPTER_FOLDER)}
            save_checkpoint(recovered, reduced_checkpoint(tmp, ratio, LORA),
                            new_info(info.family, info.size, stage="finetune", seed=self.finetuning.seed,
                                     parent=str(reduced_checkpoint(self.out, ratio, PRUNED)),
                                     extra={**lora, **summary, "source": extra}),
                            tokenizer=self.tokenizer, adapter=adapter,
                            evaluation=self.evaluate(recovered, {**columns, "stage": LORA}))
        self.losses.append(pd.DataFrame(rows).assign(model=self.name, method=settings.method, ratio=ratio))

    def write_tables(self, tmp: Path) -> None:
        for name, tables in (("evaluation", self.results), ("length_extrapolation", self.curves),
                             ("finetune_loss", self.losses)):
            io.write_csv(reduction_table_path(tmp, name), pd.concat(tables, ignore_index=True))


def reduce_model(name: str, checkpoint: str | Path, packed: str | Path, corpus: str | Path, tokenizer_dir,
                 sections: tuple, context: int, out: str | Path, device: str, log=print) -> None:
    """Run the sweep of one (model, method) and write its outputs into `out` atomically.

    sections: read_sections' (prune settings per ratio, finetune settings, evaluate settings).
    """
    sweep = _Sweep(name, checkpoint, packed, corpus, tokenizer_dir, sections, context, out, device, log)
    with io.atomic_dir(out) as tmp:
        for settings in sweep.prunes:
            sweep.reduce_ratio(settings, tmp)
        sweep.write_tables(tmp)

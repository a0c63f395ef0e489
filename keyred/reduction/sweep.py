"""The key-reduction sweep of one model and one method over every ratio: prune, evaluate, recover
with LoRA, evaluate again.

One process per (model, method): fla is imported and the parent loaded once for all ratios.
For each ratio, keyred.reduction.prune reduces d_k of the parent (a plain fla checkpoint);
keyred.training.lora recovers it with LoRA (adapters merged; distillation from the parent when
finetune.distill is set); keyred.evaluation scores both on the test split, and the parent once
(its results are not written: the evaluate job's are the baseline), so that every metric of a
reduced model also gets its paired difference to the parent on the same samples. The output folder is
written as a whole, in the layout of keyred.checkpoints: per ratio the pruned and LoRA
checkpoints (reduced_checkpoint; each with the tokenizer, its evaluation rows in its model card,
the LoRA one with its adapter before merging), and the tables (reduction_table_path) evaluation (model, method,
ratio, stage = pruned | lora, task, metric, value, stderr, n, delta, delta_stderr: keyred.evaluation.runner),
length_extrapolation (model, method, ratio, stage, position, loss, sequences) and finetune_loss.

Resuming (`resume_dir`): each ratio works in `<resume_dir>/ratio<r>/` (ratio_folder): its pruned
checkpoint, then its LoRA checkpoint, and a resume state (keyred.training.resume) recording the
ratio's table rows once the pruned model is evaluated and again once the LoRA one is. Started
again with the same settings, a finished ratio is skipped, a pruned one is loaded back, and the
LoRA loop in progress continues from its own resume state (`finetune/` inside the ratio's folder,
keyred.training.lora.finetune), so the result equals an uninterrupted run's. SIGUSR1 or SIGTERM
stops the LoRA loop at its next step (and the rest of the sweep after the model in hand is saved),
raising TrainingStopped. The checkpoints are moved into the output folder when every ratio is
done, and the resume folder is removed. A state of other settings (model, data, parent, code) is
refused naming the file; an unreadable one is set aside and its ratio starts afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from keyred import io
from keyred.checkpoints import (ADAPTER_FOLDER, LORA, METADATA_FILE, PRUNED, REDUCED_STAGES, new_info, ratio_folder,
                                read_info, reduced_checkpoint, reduction_table_path, save_checkpoint)
from keyred.fla.models import load_checkpoint
from keyred.config import ConfigError, section_settings
from keyred.data.corpus import read_documents
from keyred.data.packing import read_packed_info, read_token_file
from keyred.data.tokenizer import load_tokenizer
from keyred.evaluation.extrapolation import length_extrapolation
from keyred.evaluation.runner import check_vocabulary, evaluate_with_samples, with_columns, with_paired_difference
from keyred.evaluation.settings import evaluate_settings
from keyred.provenance import code_digest
from keyred.reduction.methods import SECTION as PRUNE_SECTION
from keyred.reduction.methods import PruneSettings, check_prunable, new_key_dim
from keyred.reduction.prune import prune_model
from keyred.training.lora import check_targets, finetune, finetune_settings, lora_record
from keyred.training.resume import (RESUME_FILE, StopSignals, TrainingStopped, load_resume_state,
                                    remove_resume_state, save_resume_state)

SECTIONS = ("prune", "finetune", "evaluate")
FINETUNE_RESUME = "finetune"       # inside a ratio's resume folder: the resume state of its LoRA loop
TABLES = ("results", "curves", "losses")


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
                   columns: dict, log, parent_samples: dict):
    """(results, extrapolation) DataFrames of one model with `columns` (model, method, ratio, stage) in
    front; results with the paired difference to the parent, whose per-sample values are `parent_samples`
    (keyred.evaluation.runner.evaluate_with_samples)."""
    curve = length_extrapolation(model, heldout_tokens, context, settings.extrapolation_factor,
                                 settings.extrapolation_sequences, device, settings.seed)
    results, samples = evaluate_with_samples(model, tokenizer, documents, settings, log)
    results = with_paired_difference(results, samples, parent_samples, settings)
    return with_columns(results, **columns), with_columns(curve, **columns)


def _parent_record(checkpoint) -> dict:
    """What identifies the parent checkpoint in a resume state: keyred.json's creation time, or
    for a checkpoint without one the sizes and modification times of its weight files."""
    path = Path(checkpoint)
    if (path / METADATA_FILE).is_file():
        return {"checkpoint": str(path), "created": read_info(path).created}
    return {"checkpoint": str(path), "files": {file.name: [file.stat().st_size, file.stat().st_mtime_ns]
                                               for file in sorted(path.glob("*.safetensors"))}}


def _data_record(packed) -> dict:
    """What identifies the packed data (and the corpus it was packed from) in a resume state."""
    info = read_packed_info(packed)
    return {"tokenizer_sha256": info["tokenizer_sha256"], "max_train_tokens": info["max_train_tokens"],
            "corpus_sha256": {split: facts["corpus_sha256"] for split, facts in info["splits"].items()}}


class SweepStopped(TrainingStopped):
    """A stop signal arrived outside a LoRA step; the ratio's state is saved in `resume_dir`."""

    def __init__(self, signal_name: str, what: str, resume_dir: str | Path):
        Exception.__init__(self, f"{signal_name} received: stopped after {what} with its resume state saved in "
                                 f"{Path(resume_dir) / RESUME_FILE}; run the same command again to continue from there")
        self.signal_name, self.step, self.resume_dir = signal_name, 0, resume_dir


class _Sweep:
    """What every ratio of one sweep shares: the parent, the held-out data, the settings, the
    resume states found and the tables collected so far."""

    def __init__(self, name, checkpoint, packed, corpus, tokenizer_dir, sections, context, out, device, log,
                 resume_dir=None):
        self.name, self.checkpoint, self.packed, self.context, self.out = name, checkpoint, packed, context, out
        self.device, self.log = device, log
        self.prunes, self.finetuning, self.evaluation = sections
        self.resume_dir = None if resume_dir is None else Path(resume_dir)
        self.fingerprints: dict[float, dict] = {}
        self.states = self.read_states() if self.resume_dir is not None else {}
        self.parent, self.parent_info = load_checkpoint(checkpoint, device=device)
        self.key_dim = check_prunable(self.parent.config)
        for settings in self.prunes:                  # every ratio must leave keys before any work starts
            new_key_dim(self.key_dim, settings.ratio, settings.round_to)
        check_targets(self.parent, self.finetuning.target_modules)
        self.tokenizer = load_tokenizer(tokenizer_dir)
        check_vocabulary(self.parent, self.tokenizer)
        self.documents = read_documents(Path(corpus) / "test.jsonl")
        self.heldout_tokens = read_token_file(Path(packed) / "test.npy")
        self.tables = {name: [] for name in TABLES}
        self._parent_samples: dict | None = None

    # ------------------------------------------------------------------------------- resuming

    def read_states(self) -> dict[float, dict]:
        """The resume state of every ratio that has one whose checkpoints are all there (before any
        model is loaded: ConfigError for a state of other settings)."""
        shared = {"stage": "reduce", "name": self.name, "out": str(self.out), "context": self.context,
                  "parent": _parent_record(self.checkpoint),
                  "data": _data_record(self.packed), "code": code_digest("keyred.reduction.sweep"),
                  "finetune": dataclasses.asdict(self.finetuning), "evaluate": dataclasses.asdict(self.evaluation)}
        self.fingerprints = {s.ratio: {**shared, "prune": dataclasses.asdict(s)} for s in self.prunes}
        states = {}
        for settings in self.prunes:
            folder = self.resume_dir / ratio_folder(settings.ratio)
            state = load_resume_state(folder, self.fingerprints[settings.ratio])
            stages = REDUCED_STAGES[:1] if state and state["phase"] == PRUNED else REDUCED_STAGES
            if state and all(reduced_checkpoint(self.resume_dir, settings.ratio, s).is_dir() for s in stages):
                states[settings.ratio] = state
        return states

    def save_state(self, ratio: float, phase: str, extra: dict, tables: dict, stop: StopSignals) -> None:
        """Record `phase` (PRUNED or LORA: that checkpoint is written) of `ratio` with its table rows;
        SweepStopped when a stop signal has arrived. Nothing without a resume folder."""
        if self.resume_dir is None:
            return
        folder = self.resume_dir / ratio_folder(ratio)
        save_resume_state(folder, {"phase": phase, "extra": extra, "tables": tables}, self.fingerprints[ratio])
        if stop.requested:
            raise SweepStopped(stop.requested, f"the {phase} model of ratio {ratio}", folder)

    # ------------------------------------------------------------------------------ the sweep

    def parent_samples(self) -> dict:
        """The parent's per-sample values of every metric (scored once, when first needed)."""
        if self._parent_samples is None:
            self.log(f"[reduce] {self.name}: scoring the unpruned parent for the paired differences")
            self._parent_samples = evaluate_with_samples(self.parent, self.tokenizer, self.documents, self.evaluation,
                                                         self.log)[1]
        return self._parent_samples

    def evaluate(self, model, columns: dict, tables: dict) -> list[dict]:
        """Score one model, add its tables to `tables` and return its evaluation rows (task, metric, value, n)."""
        results, curve = evaluate_stage(model, self.tokenizer, self.documents, self.heldout_tokens, self.context,
                                        self.evaluation, self.device, columns, self.log, self.parent_samples())
        tables["results"].append(results)
        tables["curves"].append(curve)
        return results[["task", "metric", "value", "n"]].to_dict("records")

    def reduce_ratio(self, settings: PruneSettings, work: Path, stop: StopSignals) -> None:
        """Prune the parent at settings.ratio, evaluate, recover with LoRA, evaluate; checkpoints into
        `work` (the output's temporary folder, or the resume folder), resuming from the ratio's state."""
        ratio, info = settings.ratio, self.parent_info
        state = self.states.get(ratio)
        columns = dict(model=self.name, method=settings.method, ratio=ratio, stage=PRUNED)
        if state is None:
            self.log(f"[reduce] {self.name} {settings.method} ratio {ratio}: d_k {self.key_dim} -> "
                     f"{new_key_dim(self.key_dim, ratio, settings.round_to)}")
            if self.resume_dir is not None:       # a LoRA state left without its ratio's state is stale
                remove_resume_state(self.resume_dir / ratio_folder(ratio) / FINETUNE_RESUME)
            tables = {name: [] for name in TABLES}
            pruned, extra = prune_model(copy.deepcopy(self.parent), settings, self.packed, self.device, self.log)
            save_checkpoint(pruned, reduced_checkpoint(work, ratio, PRUNED),
                            new_info(info.family, info.size, stage="prune", seed=settings.seed,
                                     parent=str(self.checkpoint), extra=extra),
                            tokenizer=self.tokenizer, evaluation=self.evaluate(pruned, columns, tables))
            self.save_state(ratio, PRUNED, extra, tables, stop)
        elif state["phase"] == PRUNED:
            extra, tables = state["extra"], state["tables"]
            self.log(f"[reduce] {self.name} {settings.method} ratio {ratio}: resuming from the pruned model in "
                     f"{reduced_checkpoint(work, ratio, PRUNED)}")
            pruned, _ = load_checkpoint(reduced_checkpoint(work, ratio, PRUNED), device=self.device)
        else:
            self.log(f"[reduce] {self.name} {settings.method} ratio {ratio}: done in {work} (resume state)")
            self.keep(state["tables"])
            return
        self.recover(pruned, settings, extra, tables, work, stop)
        self.keep(tables)

    def recover(self, pruned, settings: PruneSettings, extra: dict, tables: dict, work: Path, stop) -> None:
        """The LoRA half of a ratio: finetune `pruned`, save and evaluate the merged model (into `tables`)."""
        ratio, info = settings.ratio, self.parent_info
        columns = dict(model=self.name, method=settings.method, ratio=ratio, stage=LORA)
        teacher = self.parent if self.finetuning.distill else None
        pruned.name_or_path = str(reduced_checkpoint(self.out, ratio, PRUNED))    # the adapter's base
        resume = None if self.resume_dir is None else self.resume_dir / ratio_folder(ratio) / FINETUNE_RESUME
        with tempfile.TemporaryDirectory(prefix="keyred-adapter-") as adapter:
            recovered, rows, summary = finetune(pruned, self.packed, self.finetuning, self.device, teacher, self.log,
                                                adapter, resume, self.fingerprints.get(ratio))
            lora = {"settings": dataclasses.asdict(self.finetuning),
                    "lora": lora_record(self.finetuning, ADAPTER_FOLDER)}
            save_checkpoint(recovered, reduced_checkpoint(work, ratio, LORA),
                            new_info(info.family, info.size, stage="finetune", seed=self.finetuning.seed,
                                     parent=str(reduced_checkpoint(self.out, ratio, PRUNED)),
                                     extra={**lora, **summary, "source": extra}),
                            tokenizer=self.tokenizer, adapter=adapter,
                            evaluation=self.evaluate(recovered, columns, tables))
        tables["losses"].append(pd.DataFrame(rows).assign(model=self.name, method=settings.method, ratio=ratio))
        self.save_state(ratio, LORA, extra, tables, stop)
        if resume is not None:
            remove_resume_state(resume)

    def keep(self, tables: dict) -> None:
        for name in TABLES:
            self.tables[name].extend(tables[name])

    def write_tables(self, tmp: Path) -> None:
        for name, key in (("evaluation", "results"), ("length_extrapolation", "curves"), ("finetune_loss", "losses")):
            io.write_csv(reduction_table_path(tmp, name), pd.concat(self.tables[key], ignore_index=True))


def reduce_model(name: str, checkpoint: str | Path, packed: str | Path, corpus: str | Path, tokenizer_dir,
                 sections: tuple, context: int, out: str | Path, device: str, log=print,
                 resume_dir: str | Path | None = None) -> None:
    """Run the sweep of one (model, method) and write its outputs into `out` atomically.

    sections: read_sections' (prune settings per ratio, finetune settings, evaluate settings).
    With `resume_dir` the ratios are kept there until all are done, and a stop signal raises
    TrainingStopped (module docstring); the folder is removed once `out` is written.
    """
    sweep = _Sweep(name, checkpoint, packed, corpus, tokenizer_dir, sections, context, out, device, log,
                   resume_dir)
    if resume_dir is None:
        with io.atomic_dir(out) as tmp:
            for settings in sweep.prunes:
                sweep.reduce_ratio(settings, tmp, StopSignals(active=False))
            sweep.write_tables(tmp)
        return
    with StopSignals() as stop:
        for settings in sweep.prunes:
            sweep.reduce_ratio(settings, Path(resume_dir), stop)
    with io.atomic_dir(out) as tmp:
        sweep.write_tables(tmp)
        for settings in sweep.prunes:              # last: a ratio whose checkpoints left is done again
            for stage in REDUCED_STAGES:
                target = reduced_checkpoint(tmp, settings.ratio, stage)
                target.parent.mkdir(exist_ok=True)
                shutil.move(reduced_checkpoint(resume_dir, settings.ratio, stage), target)   # a rename on one disk
    remove_resume_state(resume_dir)

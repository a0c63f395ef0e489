"""The model card (README.md) of a checkpoint folder, made with huggingface_hub's ModelCard.

`model_card(facts)` renders the card from plain facts (keyred.checkpoints.card_facts gathers them
from the model, its keyred.json and the stage's metrics): what the model is (family, size, d_k,
d_v, parameters; its variant: Householder steps, eigenvalue range, gates, preset), where it comes
from (parent, method, ratio, LoRA settings, seed, code), its metrics when known (validation loss, evaluation rows) and how to load and evaluate the folder.
Importing this module is cheap: huggingface_hub is imported when a card is made.
"""

from __future__ import annotations

from pathlib import Path

CARD_FILE = "README.md"
PLACEHOLDER = "path/to/this/folder"      # the card cannot know where the folder will be copied to


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def _yes_no(flag) -> str:
    return "yes" if flag else "no"


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_value(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _model_section(facts: dict) -> str:
    rows = [("family", facts["family"]), ("size", facts["size"]), ("d_k (key head dim)", facts["d_k"]),
            ("d_v (value head dim)", facts["d_v"]), ("layers", facts["layers"]), ("heads", facts["heads"]),
            ("hidden size", facts["hidden_size"]), ("vocabulary", facts["vocab_size"]),
            ("parameters", f"{facts['parameters']:,}"), ("stage", facts["stage"]), ("parent", facts["parent"]),
            ("seed", facts["seed"]), ("created", facts["created"])]
    variant = facts.get("variant") or {}
    if variant:
        rows[6:6] = [("Householder steps n_h", variant["n_h"]), ("eigenvalues", variant["eigenvalues"]),
                     ("forget gate", _yes_no(variant["forget_gate"])), ("output gate", _yes_no(variant["output_gate"])),
                     ("preset", variant.get("preset"))]
    if facts.get("pruning"):
        pruning = facts["pruning"]
        rows[4:4] = [("reduction method", pruning["method"]), ("reduction ratio", pruning["ratio"]),
                     ("d_k before reduction", pruning["key_dim"])]
    return "## Model\n\n" + _table(("", ""), rows)


def _metrics_section(facts: dict) -> str:
    parts = ["## Metrics"]
    if facts["metrics"]:
        parts.append(_table(("metric", "value"), [(name, value) for name, value in facts["metrics"].items()]))
    if facts["evaluation"]:
        parts.append("Evaluation (keyred evaluate / lm-eval, on keyred's held-out split):\n\n"
                     + _table(("task", "metric", "value", "n"),
                              [(row["task"], row["metric"], row["value"], row["n"]) for row in facts["evaluation"]]))
    if len(parts) == 1:
        parts.append("No metrics were recorded when this checkpoint was written; the tables of the run that wrote "
                     "it (e.g. evaluation.csv of a reduction folder) hold them.")
    return "\n\n".join(parts)


def _lora_section(lora: dict, adapter: bool) -> str:
    rows = [(key, ", ".join(value) if isinstance(value, list | tuple) else value) for key, value in lora.items()]
    text = "## LoRA recovery\n\nThe weights of this folder have the LoRA adapter merged in (load the folder as it is)."
    if adapter:
        text += (f" `{lora['adapter']}/` keeps the adapter as peft saved it before merging; loading the folder "
                 f"ignores it. `peft.PeftModel.from_pretrained(parent, \"{PLACEHOLDER}/{lora['adapter']}\")` on "
                 "the parent model rebuilds the unmerged model")
        if lora.get("adapter_extra"):
            text += (f", after loading `{lora['adapter']}/{lora['adapter_extra']}` (the short-convolution, norm and "
                     "bias weights trained in full) into the parent with `load_state_dict(..., strict=False)`")
        text += "."
    return text + "\n\n" + _table(("setting", "value"), rows)


def _loading_section(facts: dict) -> str:
    tokenizer = (f"tokenizer = AutoTokenizer.from_pretrained(\"{PLACEHOLDER}\")\n" if facts["tokenizer"] else "")
    text = ("## How to load\n\n"
            "```python\n"
            "import fla  # registers the fla model types with transformers\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{PLACEHOLDER}\")\n{tokenizer}"
            "```\n\n"
            "Without `import fla`, pass `trust_remote_code=True`: `config.json`'s `auto_map` points at "
            "`keyred_fla.py` in this folder, which imports fla (and keyred's CPU kernels when keyred is "
            "installed; fla's own kernels need a CUDA GPU). With keyred: "
            f"`keyred.fla.models.load_checkpoint(\"{PLACEHOLDER}\")` returns the model and its `keyred.json`. "
            "Before fla is imported, `AutoTokenizer.from_pretrained` (which reads config.json) asks whether to run "
            "`keyred_fla.py` unless given `trust_remote_code=True`; either answer loads the tokenizer.")
    if not facts["tokenizer"]:
        return text + ("\n\nThis folder holds no tokenizer: the model reads token ids "
                       f"({facts['tokenizer_note']}).")
    return text + (
        "\n\n## How to evaluate\n\n"
        "With the standard lm-eval command line (GPU, fla installed):\n\n"
        "```bash\n"
        f"lm_eval --model hf --model_args pretrained={PLACEHOLDER},trust_remote_code=True "
        "--tasks lambada_openai --device cuda\n"
        "```\n\n"
        "With keyred (any machine; the held-out files come from `keyred corpus` and `keyred packing`):\n\n"
        "```bash\n"
        f"keyred evaluate --checkpoint {PLACEHOLDER} --tokenizer {PLACEHOLDER} --heldout test.jsonl "
        "--heldout-tokens test.npy --context 256 --name model --method none --ratio 0 "
        "--out evaluation.csv --extrapolation extrapolation.csv\n"
        "```")


def _files_section(facts: dict) -> str:
    rows = [("config.json, model.safetensors", "the model (transformers save_pretrained)"),
            ("keyred.json", "keyred's metadata: lineage, settings, versions, code digest and git revision"),
            ("keyred_fla.py", "the module config.json's auto_map names (imports fla)")]
    if facts["tokenizer"]:
        rows.append(("tokenizer.json, tokenizer_config.json", "the tokenizer"))
    if facts["adapter"]:
        rows.append(("adapter/", "the LoRA adapter before merging (peft save_pretrained)"))
    return "## Files\n\n" + _table(("file", "what"), rows)


def model_card(facts: dict):
    """A huggingface_hub ModelCard of a checkpoint from `facts` (keyred.checkpoints.card_facts)."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", model_name=facts["title"], tags=facts["tags"],
                         base_model=facts["base_model"], pipeline_tag=facts["pipeline_tag"])
    code = facts["code"]
    stage = f"stage `{code['stage']}`, code digest `{code['digest']}`" if code.get("stage") else "outside a stage"
    changes = " with local changes" if code.get("git_dirty") else ""
    provenance = (f"Written by keyred {facts['versions'].get('keyred', 'unknown')} ({stage}, git revision "
                  f"`{code.get('git_revision', 'unknown')}`{changes}) with "
                  + ", ".join(f"{name} {version}" for name, version in facts["versions"].items() if name != "keyred")
                  + ".")
    sections = [f"# {facts['title']}", facts["summary"], _model_section(facts), _metrics_section(facts)]
    if facts["lora"]:
        sections.append(_lora_section(facts["lora"], facts["adapter"]))
    sections += [_loading_section(facts), _files_section(facts), provenance]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(folder: str | Path, facts: dict) -> Path:
    """Write the card of `facts` as `folder`/README.md (inside a folder being written atomically)."""
    path = Path(folder) / CARD_FILE
    model_card(facts).save(path)
    return path

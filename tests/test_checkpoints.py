"""Self-contained checkpoints (keyred.checkpoints, keyred.model_card): every folder keyred writes
holds its tokenizer, a model card, the code that wrote it and, after LoRA, the adapter; a reduced
checkpoint copied alone to another folder reloads with keyred and with plain transformers
(trust_remote_code, in an interpreter that has not imported fla), tokenizes and evaluates."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch

from keyred import checkpoints
from keyred.checkpoints import (ADAPTER_FOLDER, LORA, PRUNED, REMOTE_CODE_FILE, new_info, read_info,
                                reduced_checkpoint, save_checkpoint)
from keyred.fla.families import key_head_dim
from keyred.fla.models import build_model, load_checkpoint
from keyred.provenance import code_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "The river flows past the old mill and into the sea."


@pytest.fixture(scope="module")
def reduced(packed_wikipedia, tmp_path_factory):
    """One reduce job (keyred.stages.reduce main: drrqr at ratio 0.5, two LoRA steps) of a tiny
    Gated DeltaNet saved with the corpus tokenizer: its output folder."""
    from test_reduce import arguments

    from keyred.data.tokenizer import load_tokenizer
    from keyred.stages.reduce import main

    root = tmp_path_factory.mktemp("self_contained")
    save_checkpoint(build_model("gated_deltanet", "tiny", vocab_size=512, seed=0), root / "parent",
                    new_info("gated_deltanet", "tiny", stage="train", seed=0, extra={"name": "gdn", "val_loss": 6.1}),
                    tokenizer=load_tokenizer(packed_wikipedia / "tokenizer"))
    out = root / "gdn" / "drrqr"
    assert main(arguments(packed_wikipedia, root / "parent", out)) == 0
    return out


@pytest.fixture(scope="module")
def copied(reduced, tmp_path_factory):
    """The pruned and LoRA checkpoints at ratio 0.5, each copied alone to a folder of its own."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    return {stage: shutil.copytree(reduced_checkpoint(reduced, 0.5, stage), elsewhere / f"{stage}_copy")
            for stage in (PRUNED, LORA)}


def test_every_reduced_checkpoint_holds_tokenizer_card_code_and_remote_code(reduced, copied):
    for stage, folder in copied.items():
        names = {path.name for path in folder.iterdir()}
        assert {"config.json", "model.safetensors", "keyred.json", "README.md", REMOTE_CODE_FILE,
                "tokenizer.json", "tokenizer_config.json"} <= names
        info = read_info(folder)
        assert info.code["stage"] == "keyred.stages.reduce"
        assert info.code["digest"] == code_digest("keyred.stages.reduce")     # what the workflow rule passes
        assert info.code["git_revision"] == "unknown" or len(info.code["git_revision"]) == 40
        config = json.loads((folder / "config.json").read_text())
        assert config["auto_map"] == {"AutoConfig": "keyred_fla.GatedDeltaNetConfig",
                                      "AutoModelForCausalLM": "keyred_fla.GatedDeltaNetForCausalLM"}
    assert (ADAPTER_FOLDER in {path.name for path in copied[LORA].iterdir()}
            and ADAPTER_FOLDER not in {path.name for path in copied[PRUNED].iterdir()})


def test_the_lora_checkpoint_records_its_lora_settings(copied):
    info = read_info(copied[LORA])
    lora = info.extra["lora"]
    assert (lora["rank"], lora["alpha"], lora["dropout"]) == (32, 64, 0.0)
    assert lora["target_modules"] == ["q_proj", "k_proj", "v_proj"]
    assert (lora["adapter"], lora["adapter_extra"]) == ("adapter", "extra_parameters.safetensors")
    assert info.extra["settings"]["steps"] == 2 and info.extra["source"]["method"] == "drrqr"


def test_the_model_card_says_what_the_model_is_and_how_to_load_it(reduced, copied):
    from huggingface_hub import ModelCard

    evaluation = pd.read_csv(reduced / "evaluation.csv")
    for stage, folder in copied.items():
        card = ModelCard.load(folder / "README.md")
        assert set(card.data.tags) >= {"keyred", "gated_deltanet", stage}
        assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
        text = card.text
        for line in ("| d_k (key head dim) | 8 |", "| d_v (value head dim) | 32 |", "| reduction method | drrqr |",
                     "| reduction ratio | 0.5 |", "| d_k before reduction | 16 |",
                     "pretrained=path/to/this/folder,trust_remote_code=True", "import fla",
                     "keyred evaluate --checkpoint path/to/this/folder", "code digest `"):
            assert line in text, (stage, line)
        assert f"| parent | {read_info(folder).parent} |" in text
        rows = evaluation[(evaluation.ratio == 0.5) & (evaluation.stage == stage)]
        for row in rows.itertuples():
            assert f"| {row.task} | {row.metric} | {row.value:.4g} | {row.n} |" in text
    lora_text = ModelCard.load(copied[LORA] / "README.md").text
    assert "| validation loss after LoRA |" in lora_text and "`adapter/` keeps the adapter" in lora_text


def test_a_copied_checkpoint_reloads_and_tokenizes_with_its_own_tokenizer(packed_wikipedia, reduced, copied):
    from keyred.data.tokenizer import load_tokenizer

    ids = torch.tensor([load_tokenizer(packed_wikipedia / "tokenizer").encode(TEXT)])
    for stage, folder in copied.items():
        model, info = load_checkpoint(folder)
        original, _ = load_checkpoint(reduced_checkpoint(reduced, 0.5, stage))
        assert key_head_dim(model.config) == 8 and info.stage == {PRUNED: "prune", LORA: "finetune"}[stage]
        tokenizer = load_tokenizer(folder)
        assert tokenizer.encode(TEXT) == ids[0].tolist() and tokenizer.decode(ids[0]) == TEXT
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, original(ids).logits, rtol=0, atol=0)


def test_plain_transformers_loads_a_copy_with_trust_remote_code_without_importing_fla(copied, tmp_path):
    """The path `lm_eval --model hf --model_args pretrained=<dir>,trust_remote_code=True` takes:
    AutoConfig, AutoModelForCausalLM and AutoTokenizer on the folder, fla not imported first."""
    from keyred.data.tokenizer import load_tokenizer

    folder = copied[LORA]
    model, _ = load_checkpoint(folder)
    ids = torch.tensor([[5, 17, 300, 42, 7, 99, 1, 2]])
    with torch.no_grad():
        np.save(tmp_path / "expected.npy", model(ids).logits.numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np, torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        folder = {str(folder)!r}
        assert "fla" not in sys.modules
        assert AutoConfig.from_pretrained(folder, trust_remote_code=True).model_type == "gated_deltanet"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
        assert type(model).__module__.startswith("fla.models"), type(model)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits = model(torch.tensor({ids.tolist()})).logits.numpy()
        np.testing.assert_allclose(logits, np.load({str(tmp_path / "expected.npy")!r}), rtol=0, atol=1e-6)
        from keyred.checkpoints import read_info, save_checkpoint    # saved again: no copies of fla's sources
        resaved = save_checkpoint(model, {str(tmp_path / "resaved")!r}, read_info(folder))
        assert sorted(path.name for path in resaved.glob("*.py")) == ["keyred_fla.py"]
        print("ok", tokenizer.encode({TEXT!r}))
    """)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stderr[-3000:]
    assert run.stdout.split(" ", 1)[1].strip() == str(load_tokenizer(folder).encode(TEXT))


def test_a_copied_checkpoint_evaluates_with_the_evaluate_stage(packed_wikipedia, copied, tmp_path):
    from keyred.stages.evaluate import main

    folder = copied[PRUNED]
    spec = {"tasks": ["heldout_perplexity"], "max_documents": 1, "extrapolation_sequences": 1}
    code = main(["--checkpoint", str(folder), "--tokenizer", str(folder),
                 "--heldout", str(packed_wikipedia / "corpus" / "test.jsonl"),
                 "--heldout-tokens", str(packed_wikipedia / "packed" / "test.npy"), "--context", "32",
                 "--spec", json.dumps(spec), "--name", "gdn", "--method", "drrqr", "--ratio", "0.5",
                 "--out", str(tmp_path / "eval.csv"), "--extrapolation", str(tmp_path / "extrapolation.csv"),
                 "--device", "cpu", "--threads", "1"])
    assert code == 0
    results = pd.read_csv(tmp_path / "eval.csv")
    assert set(results.task) == {"heldout_perplexity"} and np.isfinite(results.value).all()


def test_the_adapter_beside_the_merged_model_rebuilds_it(copied):
    """The pruned parent + adapter/ (peft) + the weights train_extra trained in full, merged, is the
    merged LoRA checkpoint."""
    from peft import PeftModel
    from safetensors.torch import load_file

    base, _ = load_checkpoint(copied[PRUNED])
    merged, _ = load_checkpoint(copied[LORA])
    adapter = copied[LORA] / ADAPTER_FOLDER
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 32
    missing, unexpected = base.load_state_dict(load_file(adapter / "extra_parameters.safetensors"), strict=False)
    assert not unexpected
    rebuilt = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids).logits, merged(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_prune_and_finetune_stages_pass_the_tokenizer_on_and_keep_the_adapter(packed_wikipedia, tmp_path):
    """The standalone stages (keyred prune, keyred finetune): a trained checkpoint with its
    tokenizer, pruned, then recovered with LoRA, each folder self-contained."""
    from keyred.data.tokenizer import load_tokenizer
    from keyred.stages.finetune import main as finetune
    from keyred.stages.prune import main as prune

    save_checkpoint(build_model("delta_net", "tiny", vocab_size=512, seed=0), tmp_path / "trained",
                    new_info("delta_net", "tiny", stage="train", seed=0),
                    tokenizer=load_tokenizer(packed_wikipedia / "tokenizer"))
    common = ["--packed", str(packed_wikipedia / "packed"), "--device", "cpu", "--threads", "1"]
    assert prune(["--checkpoint", str(tmp_path / "trained"), "--spec", json.dumps({"method": "l1", "ratio": 0.5}),
                  "--out", str(tmp_path / "pruned"), *common]) == 0
    spec = dict(steps=1, batch_size=2, seq_len=32, warmup_steps=0, rank=4, alpha=8, eval_sequences=2)
    assert finetune(["--checkpoint", str(tmp_path / "pruned"), "--spec", json.dumps(spec), "--out",
                     str(tmp_path / "lora"), "--losses", str(tmp_path / "losses.csv"), *common]) == 0
    for name, stage in (("pruned", "keyred.stages.prune"), ("lora", "keyred.stages.finetune")):
        folder = tmp_path / name
        assert (folder / "tokenizer.json").is_file() and (folder / "README.md").is_file()
        info = read_info(folder)
        assert info.code["stage"] == stage and info.code["digest"] == code_digest(stage)
    lora = read_info(tmp_path / "lora").extra["lora"]
    assert (lora["rank"], lora["alpha"], lora["adapter"]) == (4, 8, ADAPTER_FOLDER)
    adapter = json.loads((tmp_path / "lora" / ADAPTER_FOLDER / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["base_model_name_or_path"] == str(tmp_path / "pruned")
    assert "| reduction method | l1 |" in (tmp_path / "lora" / "README.md").read_text()


# ------------------------------------------------------------------------- without a reduce job

def test_a_state_tracking_checkpoint_has_a_card_but_no_tokenizer(tmp_path):
    from huggingface_hub import ModelCard

    model = build_model("gated_deltaproduct", "tiny", vocab_size=7, seed=0)
    folder = save_checkpoint(model, tmp_path / "checkpoint",
                             new_info("gated_deltaproduct", None, stage="state_tracking", seed=3,
                                      extra={"train": {"group": "S3"}, "best_val_seq_acc": 0.75}))
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag is None and "state_tracking" in card.data.tags
    assert "# S3 (state_tracking)" in card.text and "| best validation sequence accuracy | 0.75 |" in card.text
    assert "holds no tokenizer" in card.text and not (folder / "tokenizer.json").exists()
    assert read_info(folder).code["stage"] is None       # written outside a stage


def test_the_code_record_names_the_stage_on_the_call_stack():
    stage_globals = {"__name__": "keyred.stages.train", "new_info": new_info}
    exec("def write():\n    return new_info('delta_net', 'tiny', stage='train')", stage_globals)
    info = stage_globals["write"]()
    assert info.code["stage"] == "keyred.stages.train" and info.code["digest"] == code_digest("keyred.stages.train")


def test_the_git_revision_is_unknown_outside_keyreds_own_checkout(tmp_path, monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    package = tmp_path / "site-packages" / "keyred"
    package.mkdir(parents=True)
    monkeypatch.setattr(checkpoints, "PACKAGE_ROOT", package)
    checkpoints.git_revision.cache_clear()
    try:
        assert checkpoints.git_revision() == ("unknown", None)          # not in a git checkout at all
        if shutil.which("git"):                                         # inside another repository
            git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
            subprocess.run(git + ["init", "-q"], check=True)
            subprocess.run(git + ["commit", "-q", "--allow-empty", "-m", "other"], check=True)
            checkpoints.git_revision.cache_clear()
            assert checkpoints.git_revision() == ("unknown", None)
        checkpoints.git_revision.cache_clear()
        monkeypatch.setattr(subprocess, "run", no_git)
        assert checkpoints.git_revision() == ("unknown", None)          # no git program
    finally:
        checkpoints.git_revision.cache_clear()


def test_old_metadata_without_a_code_record_still_reads(tmp_path):
    folder = save_checkpoint(build_model("delta_net", "tiny", vocab_size=64, seed=0), tmp_path / "old",
                             new_info("delta_net", "tiny", stage="train"))
    data = json.loads((folder / "keyred.json").read_text())
    del data["code"]
    (folder / "keyred.json").write_text(json.dumps(data))
    assert read_info(folder).code == {}

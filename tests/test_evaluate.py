"""keyred.evaluation and keyred.stages.evaluate: settings from the schema, local tasks, lm-eval with an
independent perplexity check, standard errors and paired differences, length extrapolation, the CLI."""
import dataclasses
import itertools
import json
import math
import random

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from keyred.checkpoints import new_info, save_checkpoint
from keyred.config import ConfigError, load_schema
from keyred.evaluation.extrapolation import length_extrapolation
from keyred.evaluation.runner import (PAIRED_COLUMNS, RESULT_COLUMNS, evaluate_model, evaluate_with_samples,
                                      with_columns, with_paired_difference)
from keyred.evaluation.settings import EvaluateSettings, evaluate_settings
from keyred.evaluation.tasks import (HUB_TASKS, LAST_WORD_CONTEXT_WORDS, LOCAL_TASKS, RECALL_KEY_LETTERS,
                                     last_word_samples, recall_samples)
from keyred.evaluation.uncertainty import aggregate, paired_difference, standard_error
from keyred.fla.models import build_model
from keyred.stages.evaluate import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ("the a of and to in is was that it for on with as his her they at by this had from not but river "
         "house garden morning winter light stone road city people water children window letter walked said "
         "found opened carried watched remembered followed crossed wrote slowly quietly old small bright cold "
         "long green quiet early").split()
SETTINGS = dict(max_documents=6, last_word_samples=30, recall_samples=30, recall_pairs=4, max_length=64,
                extrapolation_factor=2, extrapolation_sequences=3)
METRICS = {("heldout_perplexity", "word_perplexity"), ("heldout_perplexity", "byte_perplexity"),
           ("heldout_perplexity", "bits_per_byte"), ("heldout_last_word", "acc"),
           ("heldout_last_word", "perplexity"), ("assoc_recall", "acc"), ("assoc_recall", "perplexity")}


def fabricated_documents(count: int, seed: int) -> list[str]:
    """English-like paragraphs of 4 to 12 sentences from a small word list."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))).capitalize() + rng.choice(".!?")
                     for _ in range(rng.randint(4, 12))]
        documents.append(" ".join(sentences))
    return documents


@pytest.fixture(scope="module")
def documents():
    return fabricated_documents(30, seed=0)


@pytest.fixture(scope="module")
def tokenizer(documents):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(documents, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model("delta_net", "tiny", vocab_size=len(tokenizer), seed=0).eval()


@pytest.fixture(scope="module")
def evaluated(model, tokenizer, documents):
    """(table, per-sample values) of the tiny model."""
    return evaluate_with_samples(model, tokenizer, documents, evaluate_settings(SETTINGS))


@pytest.fixture(scope="module")
def table(evaluated):
    return evaluated[0]


def token_stream(tokenizer, documents) -> np.ndarray:
    """The documents' tokens, each followed by EOS, as one 1-D array (what packing produces)."""
    return np.array([t for text in documents for t in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]])


# ------------------------------------------------------------------------------------ settings and task data

def test_unknown_tasks_and_keys_list_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"'evaluate.tasks.1': 'mmlu' is not allowed; allowed values: "
                                          r"heldout_perplexity, heldout_last_word, assoc_recall"):
        evaluate_settings({"tasks": ["heldout_perplexity", "mmlu"]})
    with pytest.raises(ConfigError, match=r"'evaluate.hub_tasks.0': 'boolq' is not allowed; allowed values: wikitext, "):
        evaluate_settings({"hub_tasks": ["boolq"]})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'shots'"):
        evaluate_settings({"shots": 5})
    with pytest.raises(ConfigError, match=r"'evaluate.batch_size': 0 is less than the minimum of 1"):
        evaluate_settings({"batch_size": 0})
    with pytest.raises(ConfigError, match=r"'evaluate.tasks': 'assoc_recall' is not of type 'array'"):
        evaluate_settings({"tasks": "assoc_recall"})
    with pytest.raises(ConfigError, match=rf"'evaluate.recall_pairs': at most {26 ** RECALL_KEY_LETTERS}, got 17577"):
        evaluate_settings({"recall_pairs": 26 ** RECALL_KEY_LETTERS + 1})
    assert evaluate_settings({"tasks": ["assoc_recall"]}).tasks == ("assoc_recall",)
    assert evaluate_settings({"tasks": ["assoc_recall", "heldout_perplexity", "assoc_recall"]}).tasks == \
        ("assoc_recall", "heldout_perplexity")


def test_settings_are_the_schema_section():
    """Defaults, ranges and task names come from the schema; the code's task lists are its enumerations."""
    schema = load_schema()["properties"]["evaluate"]["properties"]
    built = evaluate_settings(None)
    assert dataclasses.asdict(built) == {key: tuple(entry["default"]) if isinstance(entry["default"], list)
                                         else entry["default"] for key, entry in schema.items()}
    assert all(field.default is dataclasses.MISSING for field in dataclasses.fields(EvaluateSettings))
    assert tuple(schema["tasks"]["items"]["enum"]) == LOCAL_TASKS == tuple(schema["tasks"]["default"])
    assert tuple(schema["hub_tasks"]["items"]["enum"]) == HUB_TASKS


def test_last_word_passages_end_on_a_word_of_the_document(documents):
    samples = last_word_samples(documents, 50, seed=1)
    assert len(samples) == 50 and samples == last_word_samples(documents, 50, seed=1)
    for sample in samples:
        assert sample["target"][0] == " " and sample["target"][1:].isalpha()
        assert len(sample["context"].split()) <= LAST_WORD_CONTEXT_WORDS
        assert any(" ".join(d.split()).find(sample["context"] + sample["target"]) >= 0 for d in documents)


def test_recall_targets_are_the_values_of_the_queried_keys():
    samples = recall_samples(20, pairs=5, seed=2)
    assert samples == recall_samples(20, pairs=5, seed=2) and samples != recall_samples(20, pairs=5, seed=3)
    for sample in samples:
        pairs, *queries = sample["context"].split(" ; ")
        words = pairs.split()
        memory = dict(zip(words[::2], words[1::2]))
        assert len(memory) == 5
        for answered in queries[:-1]:
            key, value = answered.split(" -> ")
            assert memory[key] == value
        assert queries[-1].endswith(" ->") and sample["target"] == " " + memory[queries[-1][:-3]]


# ------------------------------------------------------------------------------------ lm-eval

def test_every_configured_metric_is_finite(table):
    assert list(table.columns) == ["task", "metric", "value", "stderr", "n"] == RESULT_COLUMNS
    assert set(zip(table.task, table.metric)) == METRICS and len(table) == len(METRICS)
    assert np.isfinite(table.value).all() and np.isfinite(table.stderr).all() and (table.stderr >= 0).all()
    assert (table.loc[table.metric != "acc", "stderr"] > 0).all()
    assert dict(zip(table.task, table.n)) == {"heldout_perplexity": 6, "heldout_last_word": 30, "assoc_recall": 30}
    final = with_columns(table, model="tiny", method="drrqr", ratio=0.5)
    assert list(final.columns) == ["model", "method", "ratio", "task", "metric", "value", "stderr", "n"]
    assert (final.ratio == 0.5).all() and list(table.columns) == RESULT_COLUMNS


def test_the_logged_samples_give_lm_evals_values_and_the_standard_errors(evaluated):
    """Each metric aggregated from its per-sample values is lm-eval's value; accuracies have the
    binomial standard error, the others the seeded bootstrap over samples (documents)."""
    table, samples = evaluated
    settings = evaluate_settings(SETTINGS)
    assert set(samples) == METRICS
    for row in table.itertuples():
        found = samples[(row.task, row.metric)]
        assert len(found.values) == len(found.keys) == row.n
        assert aggregate(found.aggregation, found.values, found.weights) == pytest.approx(row.value, rel=1e-9)
        assert row.stderr == standard_error(found.aggregation, found.values, found.weights,
                                            settings.bootstrap_iters, settings.seed)
        if row.metric == "acc":
            assert found.aggregation == "mean" and set(found.values) <= {0.0, 1.0}
            assert row.stderr == pytest.approx(math.sqrt(row.value * (1 - row.value) / (row.n - 1)))
    rolling = samples[("heldout_perplexity", "bits_per_byte")]
    assert rolling.aggregation == "bits_per_byte" and (rolling.weights > 100).all()       # bytes per document


def test_paired_difference_to_the_model_itself_is_zero_and_to_another_is_resolved(evaluated, tokenizer, documents):
    table, samples = evaluated
    settings = evaluate_settings(SETTINGS)
    itself = with_paired_difference(table, samples, samples, settings)
    assert list(itself.columns) == RESULT_COLUMNS + PAIRED_COLUMNS
    assert (itself.delta == 0).all() and (itself.delta_stderr == 0).all()
    other = build_model("delta_net", "tiny", vocab_size=len(tokenizer), seed=1).eval()
    other_table, other_samples = evaluate_with_samples(other, tokenizer, documents, settings)
    paired = with_paired_difference(other_table, other_samples, samples, settings)
    np.testing.assert_allclose(paired.delta, other_table.value - table.value, rtol=1e-9, atol=1e-12)
    assert np.isfinite(paired.delta_stderr).all()
    bits = paired.set_index("metric").loc["bits_per_byte"]
    unpaired = math.hypot(bits.stderr, table.set_index("metric").loc["bits_per_byte", "stderr"])
    assert 0 < bits.delta_stderr < unpaired
    moved = {key: dataclasses.replace(value, keys=value.keys[::-1]) for key, value in samples.items()}
    with pytest.raises(ValueError, match="scored on different samples"):
        with_paired_difference(other_table, other_samples, moved, settings)


# ------------------------------------------------------------------------------------ standard errors

def test_bootstrap_is_seeded_and_is_the_exact_bootstrap_of_a_toy_case():
    """Three documents (log-likelihood, bytes): every one of the 27 equally likely resamples
    enumerated by hand gives the exact bootstrap standard error of bits per byte."""
    values, weights = np.array([-700.0, -2600.0, -1500.0]), np.array([500.0, 1500.0, 1000.0])
    exact = np.std([-values[list(i)].sum() / weights[list(i)].sum() / math.log(2)
                    for i in itertools.product(range(3), repeat=3)])
    estimate = standard_error("bits_per_byte", values, weights, iters=20000, seed=3)
    assert estimate == pytest.approx(exact, rel=0.03)
    assert estimate == standard_error("bits_per_byte", values, weights, iters=20000, seed=3)
    assert estimate != standard_error("bits_per_byte", values, weights, iters=20000, seed=4)
    assert math.isnan(standard_error("bits_per_byte", values, weights, iters=0))
    assert math.isnan(standard_error("perplexity", values[:1], iters=100))
    assert standard_error("mean", [1, 0, 1, 1]) == pytest.approx(math.sqrt(0.75 * 0.25 / 3))   # binomial
    assert aggregate("weighted_perplexity", values, weights) == pytest.approx(math.exp(4800 / 3000))
    with pytest.raises(ValueError, match="no standard error for lm-eval aggregation 'median'"):
        standard_error("median", values)


def test_paired_standard_error_is_smaller_than_the_unpaired_one_on_correlated_samples():
    """Documents of very different difficulty, two models that differ a little on each: the paired
    difference is resolved far better than the two standard errors combined."""
    rng = np.random.default_rng(0)
    weights = rng.integers(200, 5000, 60).astype(float)
    parent = -weights * rng.uniform(1.0, 3.0, 60)                    # log-likelihood: hard and easy documents
    reduced = parent - weights * (0.01 + 0.005 * rng.standard_normal(60))
    delta, paired = paired_difference("bits_per_byte", reduced, parent, weights, weights, iters=2000, seed=0)
    assert delta == pytest.approx(aggregate("bits_per_byte", reduced, weights) - aggregate("bits_per_byte", parent,
                                                                                           weights))
    unpaired = math.hypot(standard_error("bits_per_byte", reduced, weights, 2000, 0),
                          standard_error("bits_per_byte", parent, weights, 2000, 0))
    assert 0 < paired < unpaired / 10
    correct = (rng.random(200) < 0.6).astype(float)
    flipped = np.where(rng.random(200) < 0.05, 1 - correct, correct)  # the reduced model changes 5% of answers
    delta, paired = paired_difference("mean", flipped, correct)
    assert delta == pytest.approx(flipped.mean() - correct.mean())
    assert paired == pytest.approx(np.std(flipped - correct, ddof=1) / math.sqrt(200))
    assert paired < math.hypot(standard_error("mean", flipped), standard_error("mean", correct)) / 2
    with pytest.raises(ValueError, match="needs the same samples, got 200 and 199"):
        paired_difference("mean", flipped, correct[1:])


def test_rolling_perplexity_is_the_direct_windowed_loss(table, model, tokenizer, documents):
    """Every token is predicted from as many previous tokens as fit in a max_length window
    (EOS before the first), windows tiling the document: our own sum of NLL gives lm-eval's numbers."""
    window, nll, words, size = SETTINGS["max_length"], 0.0, 0, 0
    texts = documents[:SETTINGS["max_documents"]]
    assert max(len(tokenizer(text)["input_ids"]) for text in texts) > 2 * window  # several windows per document
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            sequence = [tokenizer.eos_token_id] + ids
            for start in range(0, len(ids), window):
                end = min(start + window, len(ids))
                logits = model(torch.tensor([sequence[max(0, end - window):end]])).logits[0, -(end - start):]
                nll += F.cross_entropy(logits, torch.tensor(ids[start:end]), reduction="sum").item()
            words += len(text.split())
            size += len(text.encode())
    value = dict(zip(table.metric, table.value))
    assert value["bits_per_byte"] == pytest.approx(nll / size / math.log(2), rel=1e-5)
    assert value["byte_perplexity"] == pytest.approx(math.exp(nll / size), rel=1e-5)
    assert value["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-4)


def test_vocabulary_mismatch_fails_before_evaluating(tokenizer, documents):
    small = build_model("delta_net", "tiny", vocab_size=len(tokenizer) - 10, seed=0)
    with pytest.raises(ConfigError, match=rf"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                                          rf"{len(tokenizer) - 10}"):
        evaluate_model(small, tokenizer, documents, evaluate_settings({}))


def test_hub_tasks_offline_name_the_task(monkeypatch, model, tokenizer, documents):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"hub task\(s\) piqa, wikitext need network access .* HF_DATASETS_OFFLINE"):
        evaluate_model(model, tokenizer, documents, evaluate_settings({"hub_tasks": ["piqa", "wikitext"]}))


# ------------------------------------------------------------------------------------ length extrapolation

def test_length_extrapolation_is_the_mean_windowed_loss(tmp_path, model, tokenizer, documents):
    context, factor, length = 16, 3, 48
    tokens = token_stream(tokenizer, documents)
    slots = len(tokens) // (length + 1)
    np.save(tmp_path / "test.npy", tokens)
    curve = length_extrapolation(model, np.load(tmp_path / "test.npy", mmap_mode="r"), context, factor, slots, "cpu")
    assert list(curve.position) == list(range(1, length + 1)) and (curve.sequences == slots).all()
    assert np.isfinite(curve.loss).all()
    windows = torch.as_tensor(tokens[:slots * (length + 1)]).view(slots, length + 1)  # every slot is used
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    expected = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    np.testing.assert_allclose(curve.loss, expected.numpy(), rtol=1e-5)


def test_length_extrapolation_needs_a_long_enough_stream(model):
    with pytest.raises(ConfigError, match=r"needs evaluate.extrapolation_sequences = 8 windows of .* = 4 x 64 \+ 1 = "
                                          r"257 tokens \(2056 in all\), but the held-out token stream has only 1000"):
        length_extrapolation(model, np.zeros(1000, dtype=np.int64), 64, 4, 8, "cpu")


# ------------------------------------------------------------------------------------ CLI

def test_cli_writes_both_tables(tmp_path, model, tokenizer, documents, capsys):
    save_checkpoint(model, tmp_path / "checkpoint", new_info("delta_net", "tiny", stage="test", seed=0))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    np.save(tmp_path / "test.npy", token_stream(tokenizer, documents))
    args = ["--checkpoint", str(tmp_path / "checkpoint"), "--tokenizer", str(tmp_path / "tokenizer"),
            "--heldout", str(tmp_path / "test.jsonl"), "--heldout-tokens", str(tmp_path / "test.npy"),
            "--context", "32", "--name", "tiny", "--method", "l1", "--ratio", "0.25",
            "--out", str(tmp_path / "eval.csv"), "--extrapolation", str(tmp_path / "extrapolation.csv"),
            "--device", "cpu"]
    assert main(args + ["--spec", json.dumps({**SETTINGS, "max_length": 128})]) == 0
    results, curve = pd.read_csv(tmp_path / "eval.csv"), pd.read_csv(tmp_path / "extrapolation.csv")
    assert list(results.columns[:8]) == ["model", "method", "ratio", "task", "metric", "value", "stderr", "n"]
    assert set(zip(results.task, results.metric)) == METRICS and np.isfinite(results.value).all()
    assert np.isfinite(results.stderr).all()
    assert list(curve.columns[:6]) == ["model", "method", "ratio", "position", "loss", "sequences"]
    assert len(curve) == 2 * 32 and (curve.method == "l1").all()
    assert "[evaluate] assoc_recall: 30 samples" in capsys.readouterr().out

    assert main(args + ["--spec", json.dumps({"tasks": ["lambada"]})]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "config key 'evaluate.tasks.0': 'lambada' is not allowed; allowed values: " \
        "heldout_perplexity, heldout_last_word, assoc_recall" in error

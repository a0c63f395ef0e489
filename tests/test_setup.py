"""The locked set-up: requirements.lock against pyproject.toml, scripts/env.sh installing from it,
the package-versions param of the model rules, and hub revisions resolved and recorded (every hub
call mocked: no network)."""
import json
import os
import re
import subprocess
import sys
import tomllib
import types
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import keyred.provenance as provenance
from conftest import REPO
from keyred.config import ConfigError

LOCK = REPO / "requirements.lock"
PIN = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][0-9A-Za-z.!]*)")
SHA = "0123456789abcdef0123456789abcdef01234567"


def locked() -> dict[str, Version]:
    """{canonical name: version} of the lock; every line a comment or a plain name==version."""
    pins = {}
    for number, line in enumerate(LOCK.read_text().splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        match = PIN.fullmatch(line)
        assert match, f"requirements.lock line {number} is not name==version: {line!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"{name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(text) for text in project["dependencies"] + project["optional-dependencies"]["test"]]


# ------------------------------------------------------------------------------- the lock

def test_lock_pins_every_package_with_no_build_or_platform_label():
    pins = locked()
    assert len(pins) > 50
    assert not [name for name in pins if name.startswith(("nvidia-", "cuda-"))]   # torch brings its own
    assert not [name for name, version in pins.items() if version.local]         # torch==2.13.0, not +cpu
    assert {"pip", "setuptools"} <= set(pins)          # env.sh installs with --no-build-isolation


def test_lock_satisfies_every_requirement_of_pyproject():
    pins = locked()
    for requirement in project_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), (str(requirement), str(pins[name]))


def test_torch_range_is_the_tested_releases():
    torch = next(r for r in project_requirements() if r.name == "torch")
    assert torch.specifier.contains("2.11.0") and torch.specifier.contains("2.13.0")
    assert not torch.specifier.contains("2.10.0") and not torch.specifier.contains("2.14.0")
    # PyPI's Linux build of torch 2.13.0 requires triton==3.7.1: the lock holds it, so the same lock
    # installs beside the CPU build and beside PyPI's CUDA build (whose nvidia-* wheels it leaves out)
    assert locked()["triton"] == Version("3.7.1")


def test_lock_is_closed_under_the_requirements_of_what_it_pins():
    """Every requirement (for this platform, no extras) of each locked package installed here at its
    locked version is pinned too, at a version it allows."""
    pins, checked = locked(), 0
    for name, version in pins.items():
        try:
            installed = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if Version(installed.version).public != version.public:
            continue                                   # this venv is not (yet) the locked one here
        checked += 1
        for text in installed.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            dependency = canonicalize_name(requirement.name)
            assert dependency in pins, f"{name} {version} needs {requirement}, which the lock does not pin"
            assert requirement.specifier.contains(pins[dependency], prereleases=True), \
                f"{name} {version} needs {requirement}; the lock pins {pins[dependency]}"
    assert checked > 50


# ----------------------------------------------------------------------------- env.sh

@pytest.fixture
def fake_venv(tmp_path):
    """A venv whose python records its arguments (and the files it is given with --requirement or
    --constraint) in calls.log instead of running: what env.sh installs, without installing."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\nlog="$(dirname "$0")/../calls.log"\necho "CALL $*" >> "$log"\n'
                      'previous=""\nfor word in "$@"; do\n'
                      '  case "$previous" in --requirement|--constraint) sed "s/^/  /" "$word" >> "$log";; esac\n'
                      '  previous="$word"\ndone\n')
    python.chmod(0o755)
    return venv


def source_env(venv, **env):
    subprocess.run(["bash", "-c", "source scripts/env.sh"], cwd=REPO, check=True, capture_output=True, text=True,
                   env={**os.environ, "KEYRED_VENV": str(venv), **env})
    log = venv / "calls.log"
    text = log.read_text() if log.exists() else ""
    log.unlink(missing_ok=True)
    return text


def test_env_installs_the_lock_then_keyred_without_resolving(fake_venv):
    calls = source_env(fake_venv)
    lines = calls.splitlines()
    commands = [line for line in lines if line.startswith("CALL ")]
    pins = [line for line in LOCK.read_text().splitlines() if PIN.fullmatch(line)]
    torch = next(pin for pin in pins if pin.startswith("torch=="))
    # pip and setuptools at their pins, then torch with its own dependencies, constrained by the lock
    assert re.search(r"--no-deps (pip|setuptools)==\S+ (pip|setuptools)==", commands[0])
    assert commands[1].endswith(torch) and "--constraint" in commands[1] and "--no-deps" not in commands[1]
    # the rest of the lock, without torch, and nothing resolved
    assert "--no-deps --no-build-isolation --requirement" in commands[2]
    given = [line.strip() for line in lines[lines.index(commands[2]) + 1:] if line.startswith("  ")]
    assert given[-len(pins) + 1:] == [pin for pin in pins if pin != torch]
    assert commands[3].endswith(f"--no-deps --no-build-isolation --editable {REPO}")
    assert commands[4].endswith("-m pip check")
    # nothing again while pyproject.toml and the lock stay the same
    assert source_env(fake_venv) == ""


def test_env_reinstalls_when_the_lock_or_torch_changes(fake_venv, tmp_path):
    source_env(fake_venv)
    other = tmp_path / "other.lock"
    other.write_text(LOCK.read_text().replace("\npytest==", "\n# a changed lock\npytest=="))
    assert "--requirement" in source_env(fake_venv, KEYRED_LOCK=str(other))
    calls = source_env(fake_venv, KEYRED_LOCK=str(other), KEYRED_TORCH="torch==2.11.0")
    assert re.search(r"--constraint \S+ torch==2\.11\.0$", calls, flags=re.MULTILINE)
    assert "--constraint" not in source_env(fake_venv, KEYRED_TORCH="")   # keep the installed torch


# ------------------------------------------------------------------------ package versions

def test_versions_digest_follows_the_installed_releases(monkeypatch):
    releases = {"torch": "2.13.0+cpu", "triton": "3.7.1", "flash-linear-attention": "0.6.0", "fla-core": "0.6.0",
                "transformers": "5.24.0", "peft": "0.21.2", "pandas": "3.1.1"}
    monkeypatch.setattr(metadata, "version", lambda name: releases[name])
    digest, with_peft = provenance.package_versions_digest(), provenance.package_versions_digest("peft")
    assert re.fullmatch(r"[0-9a-f]{16}", digest) and with_peft != digest
    releases["pandas"] = "9.9"                                     # not a model package
    assert provenance.package_versions_digest() == digest
    releases["torch"] = "2.13.0+cu130"                             # another build of the same release
    assert provenance.package_versions_digest() != digest
    releases["torch"] = "2.13.0+cpu"
    releases["peft"] = "0.22.0"
    assert provenance.package_versions_digest() == digest and provenance.package_versions_digest("peft") != with_peft


def test_versions_of_a_missing_package(monkeypatch):
    def version(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", version)
    assert set(provenance.package_versions().values()) == {provenance.NOT_INSTALLED}


def test_provenance_stays_light():
    code = "import sys, keyred.provenance as p; p.package_versions_digest(); " \
           "print([m for m in ('torch', 'fla', 'transformers', 'huggingface_hub') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


MODEL_STAGES = ("train", "evaluate", "reduce", "track", "track_reduce", "analyse", "bench", "recall_train", "recall_reduce")


def test_every_rule_that_runs_a_model_has_the_versions_param():
    checked = 0
    for file in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.split(r"^(?=rule \w+:)", file.read_text(), flags=re.MULTILINE)[1:]:
            stages = re.findall(r"-m keyred\.stages\.(\w+)", block)
            has_versions = "versions=package_versions_digest(" in block
            assert has_versions == bool(set(stages) & set(MODEL_STAGES)), (file.name, block.splitlines()[0])
            checked += has_versions
    assert checked >= 9


# --------------------------------------------------------------------------- hub revisions

def no_network(*args, **kwargs):
    raise AssertionError("the hub was asked")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """huggingface_hub with repo_info answering SHA (and recording its calls) and a local hub cache."""
    import huggingface_hub
    from huggingface_hub import constants

    calls = []

    def repo_info(self, repo_id, revision=None, repo_type=None, **kwargs):
        calls.append((repo_id, revision, repo_type))
        return types.SimpleNamespace(sha=SHA)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def commit(repo_id="org/model", revision=None, repo_type="model"):
    return provenance.hub_commit(repo_id, revision, repo_type=repo_type, name_key="x.name", revision_key="x.revision")


def test_hub_commit_asks_the_hub_once(hub):
    assert commit("org/data", "v1", "dataset") == SHA
    assert hub == [("org/data", "v1", "dataset")]
    assert commit(revision=SHA) == SHA and len(hub) == 1       # a full sha is its own commit


def test_hub_commit_names_the_key_of_a_missing_revision_or_repository(hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    for error, key in ((RevisionNotFoundError, "x.revision"), (RepositoryNotFoundError, "x.name")):
        def repo_info(self, *args, error=error, **kwargs):
            raise error("not found", response=types.SimpleNamespace(headers={}, status_code=404, request=None))

        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", repo_info)
        with pytest.raises(ConfigError, match=rf"config key '{key}'"):
            commit(revision="v9")


def test_hub_commit_offline_reads_the_hub_cache(hub, monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert commit() is None                                    # neither the hub nor the cache knows it
    refs = tmp_path / "hub" / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA)
    assert commit() == SHA and commit(revision="v1") is None

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", unreachable)
    assert commit() == SHA


def test_hub_corpus_reads_and_records_the_commit(hub, monkeypatch, tmp_path):
    import datasets

    from keyred.data.corpus import build_corpus, corpus_settings

    loads = []

    def load_dataset(name, config, split, **kwargs):
        loads.append((name, config, split, kwargs))
        return [{"text": f"Document number {i}. " * 20} for i in range(40)]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    settings = corpus_settings({"source": "hub", "hub_dataset": "org/text", "hub_revision": "v2",
                                "token_budget": 100000})
    summary = build_corpus(settings, tmp_path / "corpus")
    assert hub == [("org/text", "v2", "dataset")]
    assert loads[0][3] == {"revision": SHA, "streaming": True}
    assert summary["hub_commit"] == SHA and summary["settings"]["hub_revision"] == "v2"
    assert json.loads((tmp_path / "corpus" / "corpus.json").read_text())["hub_commit"] == SHA


def test_hub_tokenizer_loads_and_records_the_commit(hub, monkeypatch, tmp_path):
    import transformers

    from keyred.data.tokenizer import build_tokenizer, tokenizer_settings, train_bpe

    local = train_bpe(["some text to learn a few merges from"] * 4, tokenizer_settings({"vocab_size": 300}))
    loads = []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda name, **kwargs: loads.append((name, kwargs)) or local)
    info = build_tokenizer(tokenizer_settings({"kind": "hub", "hub_name": "org/tok"}), None, tmp_path / "tok")
    assert loads == [("org/tok", {"revision": SHA})] and hub == [("org/tok", None, "model")]
    assert info["hub_commit"] == SHA and info["settings"]["hub_revision"] is None
    assert json.loads((tmp_path / "tok" / "tokenizer_info.json").read_text())["hub_commit"] == SHA


def test_offline_defaults_ask_no_hub(monkeypatch, tmp_path):
    """The default corpus source and tokenizer kind never reach huggingface_hub."""
    import huggingface_hub

    from keyred.data.corpus import collect_documents, corpus_settings
    from keyred.data.tokenizer import build_tokenizer, tokenizer_settings

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", no_network)
    document = tmp_path / "a.txt"
    document.write_text("A plain document of a few words. " * 20)
    documents, counts = collect_documents(corpus_settings({"source": "files", "files": [str(document)]}))
    assert "hub_commit" not in counts
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.jsonl").write_text(json.dumps({"text": documents[0]}) + "\n")
    info = build_tokenizer(tokenizer_settings({"vocab_size": 300}), tmp_path / "corpus", tmp_path / "tok")
    assert "hub_commit" not in info


def test_hub_checkpoint_loads_and_records_the_commit(hub, monkeypatch, tmp_path, packed_wikipedia):
    import keyred.fla.models as models
    from keyred.checkpoints import read_info

    tiny = models.build_model("delta_net", "tiny", vocab_size=300)
    loads = []
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained",
                        lambda name, **kwargs: loads.append((name, kwargs)) or tiny)
    model, info = models.load_checkpoint("org/delta", revision="v3", key="models.hub.pretrained")
    assert hub == [("org/delta", "v3", "model")] and loads[0][1]["revision"] == SHA
    assert info.stage == "hub" and info.extra == {"revision": "v3", "commit": SHA}

    # the train stage records both in the checkpoint's keyred.json
    import keyred.stages.train as train

    rows = [dict(step=0, loss=float("nan"), lr=0.0, tokens_per_s=float("nan"), elapsed_s=0.0, val_loss=5.0,
                 tokens=0, unigram_val_loss=6.0)]
    given = []
    monkeypatch.setattr(train, "score_pretrained",
                        lambda name, choice, *args: given.append(choice) or (model, rows))
    spec = {"model": {"family": "delta_net", "size": "tiny", "pretrained": "org/delta", "revision": "v3"},
            "train": {}}
    assert train.main(["--name", "hub", "--spec", json.dumps(spec), "--packed", str(packed_wikipedia / "packed"),
                       "--device", "cpu",
                       "--out", str(tmp_path / "checkpoint"), "--losses", str(tmp_path / "loss.csv")]) == 0
    assert given[0].revision == SHA                            # loaded at the commit the hub named
    extra = read_info(tmp_path / "checkpoint").extra
    assert extra["pretrained_revision"] == "v3" and extra["pretrained_commit"] == SHA

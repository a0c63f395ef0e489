"""Word problems: prefix products, distinct seeded sequences, clamping, CSV round trip and errors."""

import itertools
import warnings

import numpy as np
import pytest

from keyred.data import word_problems
from keyred.data.groups import build_group, lexicographic_permutations
from keyred.data.word_problems import (all_sequences, make_word_problems, prefix_products, read_word_problems,
                                       sample_sequences, write_word_problems)
from keyred.stages.word_problems import main


def slow_prefix_products(compose, sequence):
    """Pure-Python reference: target_t = target_(t-1) o x_t."""
    targets, product = [], None
    for element in sequence:
        product = element if product is None else compose(product, element)
        targets.append(product)
    return targets


@pytest.mark.parametrize("name", ["S3", "A5", "Z7", "A4_x_Z5"])
def test_prefix_products_match_pure_python(name):
    group = build_group(name)
    sequences = np.random.default_rng(1).integers(0, group.order, size=(40, 25))
    expected = [slow_prefix_products(group.compose, row) for row in sequences.tolist()]
    assert prefix_products(group, sequences).tolist() == expected


def test_prefix_products_against_permutations_not_the_table():
    """S4 reference composes permutation tuples directly, a(b(i)), without the Cayley table."""
    group = build_group("S4")
    permutations = [tuple(p) for p in lexicographic_permutations(4)]
    index = {p: i for i, p in enumerate(permutations)}

    def compose(a, b):
        return index[tuple(permutations[a][permutations[b][i]] for i in range(4))]

    sequences = np.random.default_rng(2).integers(0, 24, size=(20, 30))
    expected = [slow_prefix_products(compose, row) for row in sequences.tolist()]
    assert prefix_products(group, sequences).tolist() == expected


def test_prefix_products_shapes():
    group = build_group("S3")
    single = np.array([[3], [5]])
    assert prefix_products(group, single).tolist() == [[3], [5]]
    targets = prefix_products(group, np.array([[1, 2, 3]]))
    assert targets.shape == (1, 3) and targets.dtype == np.int16 and targets.flags.c_contiguous
    with pytest.raises(ValueError, match="2-D"):
        prefix_products(group, np.array([1, 2, 3]))


@pytest.mark.parametrize("name, length, samples", [
    ("S5", 64, 3000),     # i.i.d. draws, duplicates improbable
    ("Z2", 12, 1000),     # 4096 sequences: i.i.d. draws with many duplicates drawn again
    ("Z2", 11, 1000),     # 2048 sequences: a sample of all codes without replacement
    ("A4_x_Z5", 3, 500),
])
def test_sequences_distinct_in_range_and_seeded(name, length, samples):
    group = build_group(name)
    first = sample_sequences(group, length, samples, seed=0)
    assert first.shape == (samples, length) and first.dtype == np.int16
    assert first.min() >= 0 and first.max() < group.order
    assert len({tuple(row) for row in first.tolist()}) == samples
    assert np.array_equal(first, sample_sequences(group, length, samples, seed=0))
    assert not np.array_equal(first, sample_sequences(group, length, samples, seed=1))


def test_elements_roughly_uniform():
    group = build_group("S3")
    counts = np.bincount(sample_sequences(group, 50, 2000, seed=3).ravel(), minlength=6)
    expected = 50 * 2000 / 6
    assert (abs(counts - expected) < 5 * np.sqrt(expected)).all()


def test_clamped_to_all_sequences_with_a_warning():
    group = build_group("Z2")
    with pytest.warns(UserWarning, match=r"clamped to \|G\|\^k = 8"):
        sequences = sample_sequences(group, 3, 100, seed=0)
    assert sequences.tolist() == [list(p) for p in itertools.product(range(2), repeat=3)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")        # exactly |G|^k asked for: all of them, no warning
        assert np.array_equal(sample_sequences(group, 3, 8, seed=0), all_sequences(group, 3))


def test_bad_sizes_refused():
    with pytest.raises(ValueError, match="length and samples must be >= 1 and seed >= 0"):
        sample_sequences(build_group("S3"), 0, 10, seed=0)
    with pytest.raises(ValueError, match="seed >= 0"):
        sample_sequences(build_group("S3"), 2, 10, seed=-1)
    with pytest.raises(ValueError, match="too many to list"):
        all_sequences(build_group("S5"), 512)


@pytest.mark.parametrize("name, length, samples", [("S3", 3, 20), ("Z60", 7, 50), ("S5", 40, 300),
                                                   ("S1", 4, 5), ("A4_x_Z5", 2, 3600)])
def test_files_round_trip_exactly(tmp_path, name, length, samples):
    group = build_group(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # S1 and A4_x_Z5 clamp
        inputs, targets = make_word_problems(group, length, samples, seed=7)
    path = tmp_path / "data.csv"
    write_word_problems(path, inputs, targets, seed=7)
    read_inputs, read_targets = read_word_problems(path, group)
    assert np.array_equal(read_inputs, inputs) and np.array_equal(read_targets, targets)
    assert read_inputs.dtype == np.int16
    assert [p.name for p in tmp_path.iterdir()] == ["data.csv"]        # no temporary file left behind


def test_file_format(tmp_path):
    group = build_group("S3")
    path = tmp_path / "s3.csv"
    inputs = np.array([[3, 1, 5], [0, 2, 2]])
    write_word_problems(path, inputs, prefix_products(group, inputs), seed=12)
    assert path.read_text() == "seed,input,target\n12,3 1 5,3 2 4\n12,0 2 2,0 2 0\n"


def test_reading_in_small_blocks(tmp_path, monkeypatch):
    group = build_group("Z60")
    inputs, targets = make_word_problems(group, 9, 200, seed=0)
    path = tmp_path / "z60.csv"
    write_word_problems(path, inputs, targets, seed=0)
    monkeypatch.setattr(word_problems, "READ_BLOCK_BYTES", 100)
    read_inputs, read_targets = read_word_problems(path, group)
    assert np.array_equal(read_inputs, inputs) and np.array_equal(read_targets, targets)
    lines = path.read_text().splitlines()
    lines[150] = lines[150].replace(" ", "  ", 1)
    path.write_text("\n".join(lines))          # and no newline at the end
    with pytest.raises(ValueError, match="line 151: empty value"):
        read_word_problems(path, group)


GOOD = "seed,input,target\n0,3 1 5,3 2 4\n0,0 2 2,0 2 0\n"


@pytest.mark.parametrize("text, problem", [
    ("seed,input\n0,3 1 5\n", r"must name the columns seed,input,target \(missing: \['target'\]"),
    ("seed,input,target,extra\n0,3,3,1\n", r"unexpected: \['extra'\]"),
    ("", "missing"),
    ("seed,input,target\n", "no rows after the header"),
    (GOOD + "0,1 1 1 1,1 0 1 0\n", "line 4: input and target have 4 elements, expected 3 .*ragged"),
    (GOOD + "0,1 1,1 0\n", "line 4: input and target have 2 elements, expected 3"),
    (GOOD + "0,1 1 1,1 0\n", "line 4: input has 3 elements but target has 2"),
    (GOOD + "0,1 1 1\n", "line 4: 2 fields, expected 3"),
    (GOOD + "0 1,1 1 1,1 0 1\n", "line 4: seed must be one integer"),
    (GOOD + "0,1 6 1,1 0 1\n", r"line 4: input index 6 at position 1 is out of range for S3 \(indices 0..5\)"),
    (GOOD + "0,1 1 1,1 0 9\n", "line 4: target index 9 at position 2 is out of range"),
    (GOOD + "0,1 a 1,1 0 1\n", "line 4: unexpected character 'a'"),
    (GOOD + "0,1 -1 1,1 0 1\n", "line 4: unexpected character '-'"),
    ("seed,input,target\n0,3 1 5,3 2 4\n\n0,0 2 2,0 2 0\n", "line 3: empty value"),
    (GOOD.replace("3 2 4", "3 2 5"), "line 2: target is not the prefix product of input under S3"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"bad.csv.*{problem}"):
        read_word_problems(path, build_group("S3"))


def test_good_file_reads(tmp_path):
    path = tmp_path / "good.csv"
    path.write_text(GOOD)
    inputs, targets = read_word_problems(path, build_group("S3"))
    assert inputs.tolist() == [[3, 1, 5], [0, 2, 2]] and targets.tolist() == [[3, 2, 4], [0, 2, 0]]


def test_cli_writes_the_same_data_as_the_library(tmp_path, capsys):
    path = tmp_path / "out" / "a4z5.csv"
    assert main(["--group", "A4_x_Z5", "--length", "16", "--samples", "300", "--seed", "5", "--out", str(path)]) == 0
    group = build_group("A4_x_Z5")
    inputs, targets = read_word_problems(path, group)
    expected_inputs, expected_targets = make_word_problems(group, 16, 300, seed=5)
    assert np.array_equal(inputs, expected_inputs) and np.array_equal(targets, expected_targets)
    assert "[word_problems] wrote" in capsys.readouterr().out


def test_cli_bad_group_name(tmp_path, capsys):
    assert main(["--group", "S3xZ2", "--length", "4", "--samples", "10", "--out", str(tmp_path / "x.csv")]) == 2
    assert "group names are S<n>, A<n>, Z<n>" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()

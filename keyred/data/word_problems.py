"""Group word problems: random element sequences, their prefix products, and CSV files of them.

A sample is a sequence x_1..x_k of element indices of a group G (see keyred.data.groups); its target at
position t is the prefix product x_1 o x_2 o ... o x_t. Sequences in one set are distinct and drawn
uniformly at random (seeded); when fewer than the requested number exist (|G|^k < samples), the set
is all |G|^k of them, with a warning. Lengths of different sets are independent: a test set may be
longer than the training set (length generalisation, k_test > k) or shorter (k_test < k, which only
tests positions seen in training); nothing here assumes either.

File format (CSV, one sample a row): columns `seed,input,target`; `input` and `target` are the k
element indices separated by single spaces, `seed` is the generation seed. For example (S3, k = 3):

    seed,input,target
    0,3 1 5,3 2 4

`keyred word_problems` (keyred.stages.word_problems) writes such a file.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from keyred.data.groups import INDEX_DTYPE, Group
from keyred.io import atomic_file

COLUMNS = ("seed", "input", "target")
ENUMERATE_WHEN_AT_MOST = 4    # sample without replacement from all |G|^k codes when |G|^k <= 4 * samples
ROWS_PER_CHUNK = 4096         # rows encoded at a time when writing a file
READ_BLOCK_BYTES = 1 << 24    # bytes parsed at a time (whole lines) when reading one
MAX_ENUMERATED = 10**8        # all_sequences refuses more rows than this

Log = Callable[[str], None] | None


def prefix_products(group: Group, sequences: np.ndarray) -> np.ndarray:
    """Targets [N, k] for sequences [N, k]: targets[:, t] = x_1 o ... o x_(t+1), left to right."""
    sequences = np.asarray(sequences)
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be 2-D [N, k], got shape {sequences.shape}")
    by_position = np.ascontiguousarray(sequences.T, dtype=INDEX_DTYPE)     # [k, N]: contiguous columns
    targets = np.empty_like(by_position)
    if by_position.shape[0] == 0:
        return targets.T.copy()
    product = targets[0] = by_position[0]
    for t in range(1, by_position.shape[0]):
        product = targets[t] = group.table[product, by_position[t]]
    return np.ascontiguousarray(targets.T)


def count_sequences(group: Group, length: int) -> int:
    """|G|^length, the number of distinct sequences (an exact Python int)."""
    return group.order ** length


def all_sequences(group: Group, length: int) -> np.ndarray:
    """Every sequence [|G|^length, length], in lexicographic (itertools.product) order."""
    if count_sequences(group, length) > MAX_ENUMERATED:
        raise ValueError(f"{group.name}, length {length}: {group.order}^{length} sequences are too many to list "
                         f"(at most {MAX_ENUMERATED})")
    return _decode(np.arange(count_sequences(group, length), dtype=np.int64), group.order, length)


def sample_sequences(group: Group, length: int, samples: int, seed: int, log: Log = None) -> np.ndarray:
    """`samples` distinct sequences [samples, length] of uniform random elements (int16), seeded.

    When fewer exist (|G|^length < samples) returns all of them in lexicographic order and warns.
    Large |G|^length: i.i.d. draws, duplicate rows (found exactly by sorting rows as raw bytes) drawn
    again until none is left.
    """
    if length < 1 or samples < 1 or seed < 0:
        raise ValueError(f"length and samples must be >= 1 and seed >= 0, got length {length}, samples {samples}, "
                         f"seed {seed}")
    log = log or (lambda message: None)
    total = count_sequences(group, length)
    if total <= samples:
        if total < samples:
            warnings.warn(f"{group.name}, length {length}: only {total} distinct sequences exist, fewer than "
                          f"the {samples} asked for; clamped to |G|^k = {total} (all of them)", stacklevel=2)
        return all_sequences(group, length)
    rng = np.random.default_rng(seed)
    if total <= ENUMERATE_WHEN_AT_MOST * samples:
        codes = rng.choice(total, size=samples, replace=False)
        return _decode(codes.astype(np.int64), group.order, length)
    sequences = rng.integers(0, group.order, size=(samples, length), dtype=INDEX_DTYPE)
    while len(repeats := _repeated_rows(sequences)):
        log(f"[word_problems] drawing {len(repeats)} duplicate sequences again")
        sequences[repeats] = rng.integers(0, group.order, size=(len(repeats), length), dtype=INDEX_DTYPE)
    return sequences


def _decode(codes: np.ndarray, order: int, length: int) -> np.ndarray:
    """Base-`order` digits [len(codes), length] of integer codes, most significant digit first."""
    digits = np.empty((len(codes), length), dtype=INDEX_DTYPE)
    for position in range(length - 1, -1, -1):
        codes, digits[:, position] = np.divmod(codes, order)
    return digits


def _repeated_rows(rows: np.ndarray) -> np.ndarray:
    """Indices of rows equal to an earlier row of `rows` [N, k]."""
    rows = np.ascontiguousarray(rows)
    as_bytes = rows.view(np.dtype((np.void, rows.itemsize * rows.shape[1]))).ravel()
    _, first = np.unique(as_bytes, return_index=True)
    repeated = np.ones(len(rows), dtype=bool)
    repeated[first] = False
    return np.flatnonzero(repeated)


def make_word_problems(group: Group, length: int, samples: int, seed: int,
                       log: Log = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets), both [N, length] int16: sample_sequences and their prefix_products."""
    inputs = sample_sequences(group, length, samples, seed, log)
    return inputs, prefix_products(group, inputs)


# ----------------------------------------------------------------------------------------- files

def write_word_problems(path: str | Path, inputs: np.ndarray, targets: np.ndarray, seed: int,
                        log: Log = None) -> None:
    """Write inputs and targets [N, k] (non-negative indices) as a `seed,input,target` CSV, atomically."""
    inputs, targets = np.asarray(inputs), np.asarray(targets)
    if inputs.ndim != 2 or inputs.shape != targets.shape or inputs.shape[1] == 0:
        raise ValueError(f"inputs and targets must both be [N, k] with k >= 1, got {inputs.shape} and {targets.shape}")
    if min(inputs.min(initial=0), targets.min(initial=0)) < 0 or seed < 0:
        raise ValueError("element indices and the seed must be non-negative")
    log = log or (lambda message: None)
    largest = int(max(inputs.max(initial=0), targets.max(initial=0)))
    glyphs, glyph_kept = _digit_glyphs(largest)
    prefix = np.frombuffer(f"{int(seed)},".encode(), dtype=np.uint8)
    rows, written, start = len(inputs), 0, time.perf_counter()
    with atomic_file(path) as tmp, open(tmp, "wb") as file:
        file.write((",".join(COLUMNS) + "\n").encode())
        for first in range(0, rows, ROWS_PER_CHUNK):
            chunk = slice(first, first + ROWS_PER_CHUNK)
            written += file.write(_encode_rows(prefix, inputs[chunk], targets[chunk], glyphs, glyph_kept))
            done = min(first + ROWS_PER_CHUNK, rows)
            if done == rows or (first // ROWS_PER_CHUNK) % 8 == 7:
                elapsed = time.perf_counter() - start
                log(f"[word_problems] wrote {done}/{rows} rows, {written / 1e6:.1f} MB, elapsed {elapsed:.1f}s "
                    f"eta {elapsed / done * (rows - done):.1f}s")


def _digit_glyphs(largest: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ASCII digits [largest + 1, width] of 0..largest and which of them are used."""
    width = len(str(largest))
    values = np.arange(largest + 1)
    glyphs = np.zeros((largest + 1, width), dtype=np.uint8)
    kept = np.zeros((largest + 1, width), dtype=bool)
    for place in range(width):            # place 0 = units, in the last column
        column = width - 1 - place
        glyphs[:, column] = ord("0") + values // 10**place % 10
        kept[:, column] = (values >= 10**place) | (place == 0)
    return glyphs, kept


def _encode_rows(prefix: np.ndarray, inputs: np.ndarray, targets: np.ndarray,
                 glyphs: np.ndarray, glyph_kept: np.ndarray) -> bytes:
    """CSV lines `<prefix><input>,<target>\\n` for rows [n, k], built as one masked byte array."""
    n, k = inputs.shape
    width = glyphs.shape[1]
    values = np.concatenate([inputs, targets], axis=1)                    # [n, 2k]
    cells = np.empty((n, 2 * k, width + 1), dtype=np.uint8)               # digits, then a separator
    kept = np.empty((n, 2 * k, width + 1), dtype=bool)
    cells[:, :, :width] = glyphs[values]
    kept[:, :, :width] = glyph_kept[values]
    cells[:, :, width] = ord(" ")
    cells[:, k - 1, width] = ord(",")
    cells[:, 2 * k - 1, width] = ord("\n")
    kept[:, :, width] = True
    line = np.concatenate([np.broadcast_to(prefix, (n, len(prefix))), cells.reshape(n, -1)], axis=1)
    line_kept = np.concatenate([np.ones((n, len(prefix)), dtype=bool), kept.reshape(n, -1)], axis=1)
    return line[line_kept].tobytes()


def read_word_problems(path: str | Path, group: Group) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) [N, k] int16 from a `seed,input,target` CSV made for `group`.

    Raises ValueError naming the file and the first problem: missing or unexpected columns, a
    malformed or ragged row, an index outside 0..|G|-1, or a target that is not the prefix product
    of its input under `group`.
    """
    path = Path(path)
    with open(path, "rb") as file:
        header = file.readline().decode("utf-8", errors="replace").rstrip("\n")
        columns = header.split(",")
        missing = [name for name in COLUMNS if name not in columns]
        unexpected = [name for name in columns if name not in COLUMNS]
        if missing or unexpected or len(columns) != len(COLUMNS):
            raise ValueError(f"{path}: header {header!r} must name the columns {','.join(COLUMNS)} "
                             f"(missing: {missing or 'none'}; unexpected: {unexpected or 'none'})")
        parser = _RowParser(path, columns, group)
        leftover = b""
        while block := file.read(READ_BLOCK_BYTES):
            block = leftover + block
            end = block.rfind(b"\n") + 1
            if end:
                parser.parse(block[:end])
            leftover = block[end:]
        if leftover:
            parser.parse(leftover + b"\n")
    inputs, targets = parser.result()
    wrong = np.flatnonzero((prefix_products(group, inputs) != targets).any(axis=1))
    if len(wrong):
        raise ValueError(f"{path}: line {wrong[0] + 2}: target is not the prefix product of input under "
                         f"{group.name} ({len(wrong)} rows like this; a file made for another group?)")
    return inputs, targets


class _RowParser:
    """Parses blocks of whole CSV lines; keeps the input and target fields as [rows, k] int16.

    The first row fixes the layout (k, and so where commas and spaces fall); every later row must
    repeat it exactly, which one comparison per block checks. A row that does not is described
    in words by `_row_problem`.
    """

    def __init__(self, path: Path, columns: list[str], group: Group):
        self.path, self.columns, self.group = path, columns, group
        self.line = 2                                  # file line number of the next block's first line
        self.length: int | None = None                 # k, fixed by the first row
        self.layout: np.ndarray | None = None          # separator after each value of a row [1 + 2k]
        self.parts: dict[str, list[np.ndarray]] = {"input": [], "target": []}

    def fail(self, line: int, problem: str):
        raise ValueError(f"{self.path}: line {line}: {problem}")

    def parse(self, block: bytes) -> None:
        """Parse whole lines (`block` ends with a newline)."""
        data = np.frombuffer(block, dtype=np.uint8)
        is_digit = (data >= ord("0")) & (data <= ord("9"))
        separators = np.flatnonzero(~is_digit)                  # every value ends at one
        kinds = data[separators]
        allowed = (kinds == ord(" ")) | (kinds == ord(",")) | (kinds == ord("\n"))
        if not allowed.all():
            position = separators[np.argmin(allowed)]
            self.fail(self._line_at(block, position), f"unexpected character {chr(data[position])!r} "
                                                      f"(allowed: digits, ',', ' ', newlines)")
        starts = np.concatenate([[0], separators[:-1] + 1])
        lengths = separators - starts
        if (lengths == 0).any() or lengths.max() > 18:
            bad = np.argmax((lengths == 0) | (lengths > 18))
            self.fail(self._line_at(block, separators[bad]), "value with more than 18 digits" if lengths[bad]
                      else "empty value (a blank line, or two separators in a row)")
        if self.layout is None:
            first_row = block[:block.index(b"\n") + 1]
            if problem := self._row_problem(first_row):
                self.fail(self.line, problem)
            self.layout = kinds[:np.argmax(kinds == ord("\n")) + 1].copy()
        row_width = len(self.layout)
        rows = len(kinds) // row_width
        line_ends = np.flatnonzero(kinds == ord("\n"))
        if len(kinds) % row_width or len(line_ends) != rows or \
                not (kinds.reshape(rows, row_width) == self.layout).all():
            bad = np.argmax((np.diff(line_ends, prepend=-1) != row_width)
                            | (np.arange(len(line_ends)) * row_width + row_width - 1 != line_ends))
            if bad == 0 and len(kinds) % row_width == 0 and len(line_ends) == rows:
                bad = np.argmax((kinds.reshape(rows, row_width) != self.layout).any(axis=1))
            line_start = 0 if bad == 0 else separators[line_ends[bad - 1]] + 1
            line_bytes = block[line_start:separators[line_ends[bad]] + 1]
            self.fail(self.line + bad, self._row_problem(line_bytes) or "layout differs from the first row")
        values = np.zeros(len(separators), dtype=np.int64 if lengths.max() > 9 else np.int32)
        for place in range(int(lengths.max())):
            digit = data[np.maximum(separators - 1 - place, 0)] - np.uint8(ord("0"))
            values += np.where(lengths > place, digit, 0).astype(values.dtype) * 10**place
        self._keep(values.reshape(rows, row_width))
        self.line += rows

    def _keep(self, rows: np.ndarray) -> None:
        """Range-check and keep the input and target fields of parsed rows [n, 1 + 2k]."""
        offset = 0
        for name in self.columns:
            width = 1 if name == "seed" else self.length
            if name != "seed":
                field_values = rows[:, offset:offset + width]
                if (field_values >= self.group.order).any():
                    bad_row, bad_position = np.argwhere(field_values >= self.group.order)[0]
                    self.fail(self.line + bad_row, f"{name} index {field_values[bad_row, bad_position]} at "
                                                   f"position {bad_position} is out of range for {self.group.name} "
                                                   f"(indices 0..{self.group.order - 1})")
                self.parts[name].append(field_values.astype(INDEX_DTYPE))
            offset += width

    def _row_problem(self, line: bytes) -> str | None:
        """What is wrong with one row (fields, counts, ragged length), or None; fixes k on the first row."""
        fields = line.decode("ascii", errors="replace").rstrip("\n").split(",")
        if len(fields) != len(self.columns):
            return f"{len(fields)} fields, expected {len(self.columns)} ({','.join(self.columns)})"
        counts = {name: len(field.split(" ")) for name, field in zip(self.columns, fields)}
        if counts["seed"] != 1:
            return f"seed must be one integer, found {counts['seed']} values"
        if counts["input"] != counts["target"]:
            return f"input has {counts['input']} elements but target has {counts['target']}"
        if self.length is None:
            self.length = counts["input"]
        elif counts["input"] != self.length:
            return f"input and target have {counts['input']} elements, expected {self.length} like the first row " \
                   f"(ragged rows)"
        return None

    def _line_at(self, block: bytes, position: int) -> int:
        return self.line + block.count(b"\n", 0, position)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if self.length is None:
            raise ValueError(f"{self.path}: no rows after the header")
        return np.concatenate(self.parts["input"]), np.concatenate(self.parts["target"])

"""Finite groups as Cayley tables: symmetric S_n, alternating A_n, cyclic Z_n and direct products.

Names: ``S<n>``, ``A<n>``, ``Z<n>`` (n >= 1) and direct products of these joined by ``_x_``, any
number of factors (``A4_x_Z5``, ``Z2_x_Z2_x_S3``). A group may have at most MAX_ORDER = 5040
elements, so that its table (int16, 50 MB at the limit) is cheap to build and keep: S_n and A_n up
to n = 7, Z_n up to n = 5040.

Elements are numbered 0..|G|-1 in the order of the DeltaProduct reference data:
- S_n: the permutations of 1..n in lexicographic order of their one-line notation (identity first);
- A_n: the even permutations, in S_n's order;
- Z_n: the powers g^0, g^1, ..., g^(n-1) of a generator (index i is g^i, composition adds mod n);
- G_1 x G_2 x ...: tuples in itertools.product order of the factors' elements (the first factor
  varies slowest), composed componentwise.
Composition is (a o b)(i) = a(b(i)): b acts first. `table[a, b]` is the index of a o b.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import re

import numpy as np

MAX_ORDER = 5040
INDEX_DTYPE = np.int16          # holds every element index, since MAX_ORDER < 2**15
PRODUCT_SEPARATOR = "_x_"
NAME_GRAMMAR = (f"group names are S<n>, A<n>, Z<n> (n >= 1, no leading zeros) or direct products of "
                f"these joined by {PRODUCT_SEPARATOR}, like A4_x_Z5; the group may have at most "
                f"{MAX_ORDER} elements (S_n and A_n up to n = 7, Z_n up to n = {MAX_ORDER})")
FACTOR_PATTERN = "([SAZ])([1-9][0-9]*)"
# A whole name (the config schema's pattern of state_tracking.groups; the order limit is checked here).
NAME_PATTERN = f"^{FACTOR_PATTERN}({PRODUCT_SEPARATOR}{FACTOR_PATTERN})*$"
_FACTOR_NAME = re.compile(FACTOR_PATTERN)


@dataclasses.dataclass(frozen=True, eq=False)
class Group:
    """A finite group: `table` [|G|, |G|] with table[a, b] = a o b, `inverse` [|G|], `labels` [|G|].

    Labels: one-line notation for permutations ("132" maps 1->1, 2->3, 3->2), the exponent for
    Z_n ("3" is g^3), tuples "(132, 3)" for products. The arrays are read-only.
    """

    name: str
    table: np.ndarray
    identity: int
    inverse: np.ndarray
    labels: tuple[str, ...]

    @property
    def order(self) -> int:
        return self.table.shape[0]

    @property
    def is_abelian(self) -> bool:
        return bool((self.table == self.table.T).all())

    def compose(self, a: int, b: int) -> int:
        """Index of a o b (b acts first)."""
        return int(self.table[a, b])


def parse_group_name(name: str) -> list[tuple[str, int]]:
    """Factors of a group name as (family, n) pairs: "A4_x_Z5" -> [("A", 4), ("Z", 5)].

    Raises ValueError, showing the name grammar, when the name is malformed or the group too large.
    """
    if not isinstance(name, str):
        raise ValueError(f"group name must be a string, got {name!r}; {NAME_GRAMMAR}")
    factors = []
    for part in name.split(PRODUCT_SEPARATOR):
        match = _FACTOR_NAME.fullmatch(part)
        if match is None:
            raise ValueError(f"unknown group name {name!r} (cannot read {part!r}); {NAME_GRAMMAR}")
        factors.append((match[1], int(match[2])))
    order = 1
    for family, n in factors:
        # n > MAX_ORDER is too large for every family (A_1, A_2 are trivial but need no big n)
        order *= _factor_order(family, n) if n <= MAX_ORDER else MAX_ORDER + 1
        if order > MAX_ORDER:
            raise ValueError(f"group {name!r} is too large: more than {MAX_ORDER} elements; {NAME_GRAMMAR}")
    return factors


def group_order(name: str) -> int:
    """|G| for a group name, without building the table."""
    return math.prod(_factor_order(family, n) for family, n in parse_group_name(name))


def _factor_order(family: str, n: int) -> int:
    if family == "S":
        return math.factorial(n)
    if family == "A":
        return max(1, math.factorial(n) // 2)
    return n


@functools.cache
def build_group(name: str) -> Group:
    """The group with this name (cached: the same Group object for the same name)."""
    factors = [_build_factor(family, n) for family, n in parse_group_name(name)]
    table, labels = factors[0]
    for factor_table, factor_labels in factors[1:]:
        table = _direct_product_table(table, factor_table)
        labels = tuple(f"{left}, {right}" for left, right in itertools.product(labels, factor_labels))
    if len(factors) > 1:
        labels = tuple(f"({label})" for label in labels)
    table = table.astype(INDEX_DTYPE)
    # e o x0 = x0 holds only for the identity e (cancellation), so column 0 finds it
    identity = int(np.flatnonzero(table[:, 0] == 0)[0])
    _, inverse = np.nonzero(table == identity)           # one hit per row, rows in order
    inverse = inverse.astype(INDEX_DTYPE)
    table.setflags(write=False)
    inverse.setflags(write=False)
    return Group(name=name, table=table, identity=identity, inverse=inverse, labels=labels)


def _build_factor(family: str, n: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Cayley table [m, m] and labels of S_n, A_n or Z_n."""
    if family == "Z":
        powers = np.arange(n)
        return (powers[:, None] + powers[None, :]) % n, tuple(str(power) for power in range(n))
    permutations = lexicographic_permutations(n, even_only=family == "A")
    labels = tuple("".join(str(image + 1) for image in permutation) for permutation in permutations)
    return _permutation_table(permutations), labels


def lexicographic_permutations(n: int, even_only: bool = False) -> np.ndarray:
    """Permutations of 0..n-1 in one-line notation [m, n], lexicographic order (identity first)."""
    permutations = np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)
    if even_only:
        first, second = np.triu_indices(n, k=1)
        inversions = (permutations[:, first] > permutations[:, second]).sum(axis=1)
        permutations = permutations[inversions % 2 == 0]
    return permutations


def _permutation_table(permutations: np.ndarray) -> np.ndarray:
    """table[a, b] = index of a o b for a closed set of permutations [m, n] in lexicographic order."""
    m, n = permutations.shape
    digit_weights = n ** np.arange(n - 1, -1, -1)
    codes = permutations @ digit_weights                  # ascending: base-n reading of one-line notation
    table = np.empty((m, m), dtype=np.int64)
    columns_per_chunk = max(1, 2**21 // (m * n))
    for start in range(0, m, columns_per_chunk):
        right = permutations[start:start + columns_per_chunk]          # [c, n]
        composed = permutations[:, right]                             # [m, c, n]: a(b(i))
        table[:, start:start + len(right)] = np.searchsorted(codes, composed @ digit_weights)
    return table


def _direct_product_table(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Componentwise table of left x right [l*r, l*r]; element (x, y) has index x * r + y."""
    l, r = left.shape[0], right.shape[0]
    combined = left[:, None, :, None].astype(np.int64) * r + right[None, :, None, :]
    return combined.reshape(l * r, l * r)

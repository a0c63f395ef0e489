"""Groups as Cayley tables: axioms, orders, element order and known compositions."""

import itertools
import math
import re

import numpy as np
import pytest

from keyred.data.groups import MAX_ORDER, NAME_PATTERN, build_group, group_order, lexicographic_permutations

SMALL = ["S1", "S2", "S3", "S4", "S5", "A1", "A2", "A3", "A4", "A5", "Z1", "Z2", "Z7", "Z60",
         "A4_x_Z5", "Z2_x_Z3", "Z2_x_Z2_x_S3"]          # |G| <= 120: associativity checked exhaustively
LARGE = ["S6", "A6", "A7", "Z5040", "S3_x_A5"]
S3_ORDER = ["123", "132", "213", "231", "312", "321"]


def is_even(one_line: str) -> bool:
    inversions = sum(a > b for a, b in itertools.combinations(one_line, 2))
    return inversions % 2 == 0


@pytest.mark.parametrize("name", SMALL + LARGE)
def test_closure_identity_inverses(name):
    group = build_group(name)
    table, everything = group.table, np.arange(group.order)
    assert table.shape == (group.order, group.order) and len(group.labels) == group.order
    # closure and cancellation: every row and column is a permutation of the elements
    assert (np.sort(table, axis=1) == everything).all() and (np.sort(table, axis=0) == everything[:, None]).all()
    assert group.identity == 0
    assert (table[group.identity] == everything).all() and (table[:, group.identity] == everything).all()
    assert (table[everything, group.inverse] == group.identity).all()
    assert (table[group.inverse, everything] == group.identity).all()


@pytest.mark.parametrize("name", SMALL)
def test_associativity_exhaustive(name):
    table = build_group(name).table.astype(np.int64)
    a, b, c = np.meshgrid(*[np.arange(len(table))] * 3, indexing="ij", sparse=True)
    assert (table[table[a, b], c] == table[a, table[b, c]]).all()


@pytest.mark.parametrize("name", LARGE + ["S7"])
def test_associativity_sampled(name):
    group = build_group(name)
    a, b, c = np.random.default_rng(0).integers(0, group.order, size=(3, 20_000))
    assert (group.table[group.table[a, b], c] == group.table[a, group.table[b, c]]).all()


@pytest.mark.parametrize("n", range(1, 8))
def test_orders_of_each_family(n):
    assert group_order(f"S{n}") == math.factorial(n)
    assert group_order(f"A{n}") == (math.factorial(n) // 2 if n >= 2 else 1)
    assert group_order(f"Z{n}") == n
    if n <= 5:
        assert build_group(f"S{n}").order == math.factorial(n)
        assert build_group(f"A{n}").order == max(1, math.factorial(n) // 2)
        assert build_group(f"Z{n}").order == n


def test_product_orders_multiply():
    assert build_group("A4_x_Z5").order == 12 * 5
    assert build_group("Z2_x_Z2_x_S3").order == 2 * 2 * 6
    assert group_order("Z5_x_Z7_x_A5") == 5 * 7 * 60
    assert group_order("Z5040") == group_order("S7") == MAX_ORDER


def test_s3_order_and_known_compositions():
    s3 = build_group("S3")
    assert list(s3.labels) == S3_ORDER
    index = {label: i for i, label in enumerate(S3_ORDER)}
    # (a o b)(i) = a(b(i)), worked by hand in one-line notation
    assert s3.compose(index["132"], index["213"]) == index["312"]   # 1->2->3, 2->1->1, 3->3->2
    assert s3.compose(index["213"], index["132"]) == index["231"]   # 1->1->2, 2->3->3, 3->2->1
    assert s3.compose(index["231"], index["231"]) == index["312"]   # a 3-cycle squared
    assert s3.compose(index["231"], index["312"]) == index["123"]   # mutually inverse 3-cycles
    assert s3.compose(index["321"], index["321"]) == index["123"]   # a transposition squared
    assert s3.inverse[index["231"]] == index["312"]
    assert s3.table[1, 2] == 4 and s3.table[2, 1] == 3


@pytest.mark.parametrize("name", ["S4", "A4", "A5"])
def test_permutation_tables_compose_right_to_left(name):
    group = build_group(name)
    n = int(name[1:])
    permutations = [tuple(p) for p in lexicographic_permutations(n, even_only=name[0] == "A")]
    index = {p: i for i, p in enumerate(permutations)}
    for a, b in itertools.product(range(group.order), repeat=2):
        composed = tuple(permutations[a][permutations[b][i]] for i in range(n))
        assert group.table[a, b] == index[composed]


@pytest.mark.parametrize("n", range(1, 7))
def test_symmetric_group_lexicographic_and_alternating_even_in_that_order(n):
    symmetric, alternating = build_group(f"S{n}"), build_group(f"A{n}")
    expected = ["".join(map(str, p)) for p in itertools.permutations(range(1, n + 1))]
    assert list(symmetric.labels) == expected
    assert list(alternating.labels) == [label for label in expected if is_even(label)]
    assert all(is_even(label) for label in alternating.labels)


def test_alternating_group_closed_inside_symmetric():
    symmetric, alternating = build_group("S5"), build_group("A5")
    in_symmetric = np.array([symmetric.labels.index(label) for label in alternating.labels])
    products = symmetric.table[np.ix_(in_symmetric, in_symmetric)]
    assert set(products.ravel()) == set(in_symmetric)
    # A5's own table is S5's restricted to the even permutations
    assert (in_symmetric[alternating.table] == products).all()


@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_cyclic_group_generated_by_one(n):
    group = build_group(f"Z{n}")
    element, powers = group.identity, []
    for _ in range(n):
        powers.append(element)
        element = group.compose(element, 1 % n)
    assert powers == list(range(n)) and element == group.identity
    a, b = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    assert (group.table == (a + b) % n).all()


def test_abelian_or_not():
    assert not build_group("A5").is_abelian
    assert not build_group("S3").is_abelian
    assert not build_group("A4_x_Z5").is_abelian
    for name in ["Z1", "Z2", "Z7", "Z60", "Z2_x_Z3", "A3", "S2"]:
        assert build_group(name).is_abelian, name


def test_product_is_componentwise_in_itertools_product_order():
    product, left, right = build_group("A4_x_Z5"), build_group("A4"), build_group("Z5")
    pairs = list(itertools.product(range(left.order), range(right.order)))
    assert list(product.labels) == [f"({left.labels[x]}, {right.labels[y]})" for x, y in pairs]
    for i, (x1, y1) in enumerate(pairs):
        for j, (x2, y2) in enumerate(pairs):
            assert pairs[product.table[i, j]] == (left.table[x1, x2], right.table[y1, y2])


def test_groups_are_cached_and_read_only():
    group = build_group("S4")
    assert build_group("S4") is group
    with pytest.raises(ValueError):
        group.table[0, 0] = 1


MALFORMED = ["", "S", "S0", "Z0", "s3", "X3", "S3xZ2", "S3_x_", "_x_S3", "Z03", "S3 ", "S-1", "A4_X_Z5", "S3_x__x_Z2"]


@pytest.mark.parametrize("name", MALFORMED + [3])
def test_malformed_names_show_the_grammar(name):
    with pytest.raises(ValueError, match=r"S<n>, A<n>, Z<n> \(n >= 1.*joined by _x_.*at most 5040"):
        build_group(name)


def test_name_pattern_is_the_grammar_the_parser_reads():
    """NAME_PATTERN (the config schema's pattern of state_tracking.groups) matches exactly the
    names the parser reads; their size is checked by the parser alone."""
    for name in SMALL + LARGE + ["S8", "Z5041", "S7_x_Z2"]:
        assert re.fullmatch(NAME_PATTERN, name), name
    for name in MALFORMED:
        assert not re.fullmatch(NAME_PATTERN, name), name


@pytest.mark.parametrize("name", ["S8", "A8", "Z5041", "S7_x_Z2", "Z100_x_Z100", "S1000000000"])
def test_too_large_groups_are_refused(name):
    with pytest.raises(ValueError, match="too large: more than 5040 elements"):
        group_order(name)

"""Which children and keys of a tree node a sparse fetch takes: the bisection in
pttd.fetch against the plain definition, on random sorted keys and prefixes."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pttd.fetch import Fetcher

SEGMENT = st.text(alphabet="abcé/", min_size=0, max_size=4)
KEYS = st.lists(SEGMENT.map(lambda s: ("/" + s).encode()), min_size=1, max_size=30, unique=True).map(sorted)
PREFIXES = st.lists(SEGMENT.map(lambda s: "/" + s), min_size=1, max_size=3)


def fetcher(prefixes: list[str]) -> Fetcher:
    return Fetcher(None, None, None, prefixes=prefixes)


def starts(key: bytes, prefixes: list[bytes]) -> bool:
    return any(key.startswith(p) for p in prefixes)


@settings(max_examples=300, deadline=None)
@given(KEYS, PREFIXES, st.one_of(st.none(), SEGMENT.map(lambda s: ("/" + s).encode())))
def test_children_and_keys_taken_are_those_the_prefixes_reach(keys, prefixes, low):
    f = fetcher(prefixes)
    if f.prefixes is None:  # "/" among them: everything
        return
    if low is not None:
        keys = [k for k in keys if k > low] or [low + b"z"]
    ps = f.prefixes
    # child j holds the keys in (below, keys[j]]: wanted if some key of a prefix can be there
    expected_children = [
        j
        for j in range(len(keys))
        if any(
            keys[j] >= p and ((keys[j - 1] if j else low) is None or (keys[j - 1] if j else low) < p + b"\xff")
            for p in ps
        )
    ]
    assert f._wanted_children(keys, low) == expected_children
    assert f._wanted_keys(keys) == [j for j, k in enumerate(keys) if starts(k, ps)]


@settings(max_examples=300, deadline=None)
@given(KEYS, PREFIXES, st.one_of(st.none(), SEGMENT.map(lambda s: ("/" + s).encode())))
def test_an_exact_read_takes_only_the_child_that_can_hold_the_path(keys, paths, low):
    f = Fetcher(None, None, None, prefixes=paths, exact=True)
    if low is not None:
        keys = [k for k in keys if k > low] or [low + b"z"]
    ps = f.prefixes

    def below(j):
        return keys[j - 1] if j else low

    expected = [j for j in range(len(keys)) if any((below(j) is None or below(j) < p) and p <= keys[j] for p in ps)]
    assert f._wanted_children(keys, low) == expected
    assert len(expected) <= len(set(ps))  # one child per path at most
    assert f._wanted_keys(keys) == [j for j, k in enumerate(keys) if k in ps]

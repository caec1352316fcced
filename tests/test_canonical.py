"""gateway.canonical writes exactly what rfc8785 writes, and fails where it fails."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import canonical

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) - 5, max_value=2**53 + 5)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    # Control characters, quotes, backslashes, U+2028, astral and private-use code points.
    | st.text(alphabet=st.sampled_from(list('\x00\x01\x08\t\n\x0b\x0c\r\x1f"\\/\x7f\u2028\ue000\U0001f600é')))
)
_keys = st.text(max_size=6) | st.sampled_from(["a", "B", "\ue000", "\U0001f600", "é", "seq", "_"])
_values = st.recursive(
    _scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_keys, children, max_size=4),
    max_leaves=20,
)


def _assert_same_as_rfc8785(value: Any) -> None:
    try:
        expected = rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as error:
        with pytest.raises(type(error)):
            canonical.dumps(value)
    else:
        assert canonical.dumps(value) == expected


@settings(max_examples=1500, deadline=None)
@given(_values)
def test_the_same_bytes_as_rfc8785(value: Any) -> None:
    _assert_same_as_rfc8785(value)


@pytest.mark.parametrize(
    "value",
    [
        {"\ue000": 1, "\U0001f600": 2},  # UTF-16 order differs from code point order
        {"n": 2**53},  # outside the safe integer domain: an error, not digits
        {"f": 1.0, "g": 1e21, "h": 5e-324},  # ECMAScript number forms
        {"s": "\ud800"},  # a lone surrogate
        {"c": "\x00\x1f\u2028", "q": '"\\'},
        [True, None, -(2**53 - 1)],
    ],
)
def test_the_edges_of_the_fast_path(value: Any) -> None:
    _assert_same_as_rfc8785(value)

"""The shared sampling draw: temperature, top-k and nucleus (top-p), identical in both backends."""

from __future__ import annotations

import numpy as np
import pytest

from charclip.errors import CharclipError
from charclip.sampling import check_options, draw
from charclip.vocab import Vocab

PROBS = np.array([0.05, 0.5, 0.15, 0.3])  # likeliest first: 1, 3, 2, 0


def _support(top_p=None, top_k=None) -> set[int]:
    """The characters a draw can return, found by sweeping u over [0, 1)."""
    return {
        draw(np.log(PROBS), u, 1.0, top_k, top_p) for u in np.linspace(0, 1, 2001, endpoint=False)
    }


@pytest.mark.parametrize(
    "top_p, support", [(0.4, {1}), (0.7, {1, 3}), (0.9, {1, 3, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_fewest_likeliest_reaching_p(top_p, support):
    assert _support(top_p=top_p) == support


def test_top_p_renormalises_what_it_keeps():
    # Kept: 0.5 and 0.3, renormalised to 0.625 and 0.375: u below 0.625 draws 1, above it 3.
    assert (
        draw(np.log(PROBS), 0.62, 1.0, None, 0.7) == 1
        and draw(np.log(PROBS), 0.63, 1.0, None, 0.7) == 3
    )


def test_top_p_one_is_no_filter_and_combines_with_top_k():
    us = np.linspace(0, 1, 997, endpoint=False)
    assert [draw(np.log(PROBS), u, 0.8, None, 1.0) for u in us] == [
        draw(np.log(PROBS), u, 0.8, None) for u in us
    ]
    assert _support(top_p=0.9, top_k=2) == {1, 3}


@pytest.mark.parametrize("top_p", [0.0, -0.1, 1.5, float("nan")])
def test_bad_top_p_is_refused(top_p):
    with pytest.raises(CharclipError, match="--top-p must lie in"):
        check_options(Vocab.from_text("abc"), "a", 5, 1.0, None, top_p)

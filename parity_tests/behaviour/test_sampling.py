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


@pytest.mark.parametrize("length", [1, 5])
def test_generate_runs_one_step_per_character_it_needs(length):
    """The prime's characters each take a step, then every drawn character but the last is fed
    back: the last one's logits would never be drawn from, so no step is spent on them."""
    from charclip.sampling import generate

    vocab = Vocab.from_text("abc")
    fed = []

    def step(token, state):
        fed.append(token)
        return np.array([0.0, 5.0, 0.0]), state

    text = generate(step, vocab, "ab", length, temperature=1e-3, seed=0)
    assert len(text) == 2 + length
    assert len(fed) == 2 + length - 1, fed
    assert fed[2:] == [vocab.encode(c)[0] for c in text[2:-1]]

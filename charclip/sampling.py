"""The random draw of sampling, shared by both backends.

A backend turns a character and a hidden state into next-character logits;
this module turns logits into a character with NumPy float64 arithmetic and one
seeded generator, so the same checkpoint, prime and seed give the same text in
PyTorch and in JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from charclip.errors import CharclipError
from charclip.vocab import Vocab

MAX_LENGTH = 10**7  # characters per sample: hours of one-character steps already; more is a typo


def check_options(
    vocab: Vocab,
    prime: str,
    length: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None = None,
) -> None:
    if not prime:
        raise CharclipError("--prime must hold at least one character")
    vocab.encode(prime, what="the prime text")
    if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= MAX_LENGTH:
        raise CharclipError(f"--length must be an integer from 0 to {MAX_LENGTH:,}, got {length!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CharclipError(f"--temperature must be a positive finite number, got {temperature!r}")
    if top_k is not None and not (1 <= top_k <= len(vocab)):
        raise CharclipError(
            f"--top-k must lie between 1 and the vocabulary size {len(vocab)}, got {top_k}"
        )
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise CharclipError(f"--top-p must lie in (0, 1], got {top_p!r}")


def draw(
    logits: np.ndarray, u: float, temperature: float, top_k: int | None, top_p: float | None = None
) -> int:
    """Index of the next character: inverse-CDF of softmax(logits / temperature) at u in [0, 1).

    top_k keeps the k likeliest characters; top_p (nucleus sampling, Holtzman et al. 2020)
    keeps the fewest likeliest whose probabilities add up to at least p. Both renormalise.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(logits).all():
        raise CharclipError(
            "the model's next-character scores are not finite (NaN or inf): the checkpoint's "
            "parameters hold non-finite values, so there is nothing to sample"
        )
    # Every extreme below is handled explicitly (overflow to -inf, underflow to 0), so NumPy's floating-point
    # warnings would only be noise on the console.
    with np.errstate(all="ignore"):
        return _draw(logits, u, temperature, top_k, top_p)


def _draw(
    logits: np.ndarray, u: float, temperature: float, top_k: int | None, top_p: float | None
) -> int:
    z = logits / temperature
    if not np.isfinite(
        z
    ).all():  # a tiny temperature overflowed: shift first, the softmax is the same
        z = (logits - logits.max()) / temperature  # the largest becomes 0, the rest -inf at worst
    if top_k is not None and top_k < len(z):
        kth = np.sort(z)[-top_k]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(z - z.max())
    p = p / p.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(
            -p, kind="stable"
        )  # likeliest first; ties in index order, the same everywhere
        keep = np.searchsorted(np.cumsum(p[order]), top_p) + 1  # the smallest prefix reaching top_p
        p[order[keep:]] = 0.0
        p = p / p.sum()
    cdf = np.cumsum(p)
    return int(min(np.searchsorted(cdf, u, side="right"), len(z) - 1))


def generate(
    step: Callable[[int, object], tuple[np.ndarray, object]],
    vocab: Vocab,
    prime: str,
    length: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    emit: Callable[[str], None] | None = None,
) -> str:
    """Feed the prime, then sample `length` characters one at a time, feeding each back.

    `emit`, if given, receives the prime and then each character as soon as it is drawn (the
    CLI streams them to stdout, so an interrupted sample keeps what was drawn).

    `step(token, state) -> (logits, state)` is the backend's one-character
    forward pass (state None means zeros).
    """
    check_options(vocab, prime, length, temperature, top_k, top_p)
    rng = np.random.default_rng(seed)
    state = None
    for token in vocab.encode(prime, what="the prime text"):
        logits, state = step(int(token), state)
    if emit is not None:
        emit(prime)
    out = []
    for i in range(length):
        token = draw(logits, rng.random(), temperature, top_k, top_p)
        out.append(token)
        if emit is not None:
            emit(vocab.decode([token]))
        if i + 1 < length:  # the last character's logits would never be drawn from
            logits, state = step(token, state)
    return prime + vocab.decode(out)

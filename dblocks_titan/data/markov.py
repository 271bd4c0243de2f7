"""A seeded order-k Markov source over text8's 27 symbols, with its exact entropy rate.

A synthetic corpus whose best achievable loss is known: a model trained on it should approach
:meth:`MarkovSource.entropy_rate` (per character, with infinite context) or, on ``L``-character chunks
that start without context, :meth:`MarkovSource.entropy_per_char` ``(L)``. Served by
:class:`~dblocks_titan.data.text8.Text8DataLoader` as ``--dataloader.dataset markov``.

States are the last ``k`` symbols ``(c_1, ..., c_k)`` (oldest first), numbered ``s = sum_i c_i 27^(k-i)``
with ids from :data:`~dblocks_titan.data.chars.ALPHABET`; the next state after symbol ``c`` is
``(s * 27 + c) mod 27^k``.
"""

from __future__ import annotations

import bisect
from functools import lru_cache

import numpy as np

from .chars import ALPHABET, CharTokenizer, SPLITS

N_SYMBOLS = len(ALPHABET)  # 27

MARKOV_CONCENTRATION = 0.1
"""Dirichlet concentration of every transition row in ``markov_text``. A row's expected entropy is
psi(27a+1) - psi(a+1) = 1.59 nats (2.3 bits) at a = 0.1 (a = 1: 2.89 nats; ln 27 = 3.30)."""

MARKOV_SPLIT_CHARS = {"train": 2_000_000, "validation": 100_000, "test": 100_000}
"""Characters sampled for each split of ``markov_text``: 7,812 / 390 / 390 chunks of 256."""


class MarkovSource:
    """An order-``order`` chain whose transition rows ``P(. | s)`` are independent draws from a symmetric
    Dirichlet(``concentration``) over the 27 symbols (``np.random.default_rng(seed)``, state by state).
    Small concentrations give peaked, low-entropy rows; large ones approach the uniform (ln 27 nats).
    ``order`` is 1..3 (27^3 = 19,683 states, 531k transition probabilities)."""

    def __init__(self, order: int, seed: int, concentration: float = MARKOV_CONCENTRATION):
        if not 1 <= order <= 3:
            raise ValueError(f"Markov order is {order}; use 1, 2 or 3 (27^order states)")
        if not concentration > 0:
            raise ValueError(f"Dirichlet concentration must be positive, got {concentration}")
        rng = np.random.default_rng(seed)
        self._set(rng.dirichlet(np.full(N_SYMBOLS, concentration), size=N_SYMBOLS**order), order)

    @classmethod
    def from_transitions(cls, transitions: np.ndarray) -> MarkovSource:
        """A chain with given rows: ``transitions`` [27^k, 27], each row a distribution over the next symbol."""
        transitions = np.asarray(transitions, dtype=np.float64)
        order = round(np.log(transitions.shape[0]) / np.log(N_SYMBOLS))
        if transitions.shape != (N_SYMBOLS**order, N_SYMBOLS) or not 1 <= order <= 3:
            raise ValueError(f"transitions must be [27^k, 27] with k in 1..3, got {list(transitions.shape)}")
        if (transitions < 0).any() or not np.allclose(transitions.sum(1), 1, atol=1e-9):
            raise ValueError("every transition row must be a probability distribution (non-negative, sums to 1)")
        source = cls.__new__(cls)
        source._set(transitions / transitions.sum(1, keepdims=True), order)
        return source

    def _set(self, transitions: np.ndarray, order: int) -> None:
        self.order = order
        self.n_states = N_SYMBOLS**order
        self.transitions = transitions  # [n_states, 27], rows sum to 1
        self.stationary = self._stationary()  # [n_states]

    def _step(self, pi: np.ndarray) -> np.ndarray:
        """One step of the state distribution: pi'(rest, c) = sum_a pi(a, rest) P(c | a, rest)."""
        rest = self.n_states // N_SYMBOLS
        p = self.transitions.reshape(N_SYMBOLS, rest, N_SYMBOLS)  # [oldest, rest, next]
        return np.einsum("ar,arc->rc", pi.reshape(N_SYMBOLS, rest), p).reshape(-1)

    def _stationary(self, tol: float = 1e-13, max_iter: int = 200_000) -> np.ndarray:
        """Stationary distribution over the 27^k states by power iteration from the uniform one.

        The lazy chain (I + T)/2 has the same stationary distributions as T and is aperiodic, so this also
        converges for periodic chains (e.g. a deterministic cycle). Dirichlet rows are all positive, so their
        chain has a unique stationary distribution and mixes in a few dozen steps."""
        pi = np.full(self.n_states, 1.0 / self.n_states)
        for _ in range(max_iter):
            new = 0.5 * (pi + self._step(pi))
            new /= new.sum()
            if np.abs(new - pi).sum() < tol:
                residual = np.abs(self._step(new) - new).sum()
                if residual > 1e-12:
                    raise RuntimeError(f"stationary distribution: residual |pi T - pi|_1 = {residual:.1e}")
                return new
            pi = new
        raise RuntimeError(f"stationary distribution did not converge in {max_iter} steps; the chain mixes too slowly")

    def entropy_rate(self) -> float:
        """Exact entropy rate in nats per character: H = sum_s pi(s) H(P(. | s))."""
        return float(self.stationary @ _row_entropy(self.transitions))

    def entropy_per_char(self, seq_len: int) -> float:
        """Entropy per character of a window of ``seq_len`` consecutive characters, H(X_1..X_L) / L, in nats:
        the best loss on chunks that start without context. For L >= k it is (H(pi) + (L - k) H) / L."""
        k = self.order
        if seq_len < k:  # marginal of the first seq_len symbols of a state
            marginal = self.stationary.reshape(N_SYMBOLS**seq_len, -1).sum(1)
            return _entropy(marginal) / seq_len
        return (_entropy(self.stationary) + (seq_len - k) * self.entropy_rate()) / seq_len

    def sample(self, n_chars: int, seed) -> str:
        """``n_chars`` characters of the chain, started in its stationary distribution (so every position,
        and every chunk, is distributed alike). ``seed``: anything ``np.random.default_rng`` takes."""
        rng = np.random.default_rng(seed)
        state = int(rng.choice(self.n_states, p=self.stationary))
        first = [(state // N_SYMBOLS ** (self.order - 1 - i)) % N_SYMBOLS for i in range(self.order)]
        cumulative = np.cumsum(self.transitions, axis=1)
        cumulative[:, -1] = 1.0  # guard against round-off
        rows = cumulative.tolist()
        out = first[:n_chars]
        for u in rng.random(max(0, n_chars - self.order)).tolist():  # a Python loop: ~1 s per 2M characters
            c = bisect.bisect_right(rows[state], u)
            out.append(c)
            state = (state * N_SYMBOLS + c) % self.n_states
        return "".join(ALPHABET[c] for c in out)

    def mean_nll(self, text: str) -> float:
        """Mean negative log-likelihood in nats of each character after the first k, given its k predecessors
        (a sample's value is close to :meth:`entropy_rate`)."""
        ids = CharTokenizer().encode_to_tensor(text).numpy().astype(np.int64)
        k = self.order
        states = np.zeros(len(ids) - k, dtype=np.int64)
        for i in range(k):
            states = states * N_SYMBOLS + ids[i : len(ids) - k + i]
        return float(-np.log(self.transitions[states, ids[k:]]).mean())


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _row_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy in nats of each row of ``p`` (0 log 0 = 0)."""
    return -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)


@lru_cache(maxsize=4)
def markov_source(order: int = 1, seed: int = 0) -> MarkovSource:
    """The chain behind ``markov_text(.., order, seed)`` (concentration :data:`MARKOV_CONCENTRATION`)."""
    return MarkovSource(order, seed, MARKOV_CONCENTRATION)


def markov_text(split: str, *, order: int = 1, seed: int = 0) -> str:
    """:data:`MARKOV_SPLIT_CHARS` ``[split]`` characters of ``markov_source(order, seed)``; each split is an
    independent sample (rng seed ``[seed, split index]``), so the splits share the chain but no text."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    return markov_source(order, seed).sample(MARKOV_SPLIT_CHARS[split], seed=[seed, SPLITS.index(split)])

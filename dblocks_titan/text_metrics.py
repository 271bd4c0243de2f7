"""Sample-quality metrics on generated token ids (issue 5): diversity, repetition, entropy, the
generative-perplexity formula, and MAUVE on feature vectors.

A sample is a sequence of token ids: a list of ints or a 1-D LongTensor; ``samples`` is an iterable
of them (a 2-D tensor works too: its rows are the samples). N-grams never cross sample boundaries.
"""

from __future__ import annotations

import math
from collections import Counter

import torch


def _ids(sample) -> list[int]:
    """One sample as a list of ints."""
    if isinstance(sample, torch.Tensor):
        if sample.dim() != 1:
            raise ValueError(f"a sample must be a 1-D tensor of token ids, got shape {tuple(sample.shape)}")
        return sample.tolist()
    return [int(t) for t in sample]


def _ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    """The ``len(ids) − n + 1`` contiguous n-grams of ``ids`` (none when ``n > len(ids)``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def distinct_n(samples, n: int) -> float:
    """distinct-n (Li et al., 2016): |unique n-grams over all samples| / |n-grams over all samples|;
    0.0 when there are no n-grams."""
    grams = [g for s in samples for g in _ngrams(_ids(s), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def seq_rep_n(samples, n: int) -> float:
    """seq-rep-n (Welleck et al., 2019): per sample, 1 − |unique n-grams| / |n-grams|, i.e. the
    fraction of its n-grams that already occurred earlier in the same sample; averaged over the
    samples that have at least one n-gram; 0.0 when none has."""
    reps = []
    for s in samples:
        grams = _ngrams(_ids(s), n)
        if grams:
            reps.append(1.0 - len(set(grams)) / len(grams))
    return sum(reps) / len(reps) if reps else 0.0


def unigram_entropy(samples) -> float:
    """Entropy in nats of the empirical token distribution pooled over all samples:
    H = −Σ_v p_v·ln p_v, p_v = count(v) / total tokens; 0.0 when there are no tokens."""
    counts = Counter(t for s in samples for t in _ids(s))
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()) if total else 0.0


def unigram_log_probs(documents, vocab_size: int) -> torch.Tensor:
    """Add-one-smoothed unigram model [V] (fp64 log-probabilities) of the label stream of ``documents``
    (each a list of token ids as titan's loaders encode it, BOS … EOS; its labels are ids[1:]):
    ``log p_v = log((count_v + 1) / (total + V))``."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for ids in documents:
        labels = torch.as_tensor(ids[1:], dtype=torch.long)
        counts += torch.bincount(labels, minlength=vocab_size)[:vocab_size].double()
    return ((counts + 1) / (counts.sum() + vocab_size)).log()


def generative_perplexity(nll_sum: float, num_tokens: int) -> float:
    """Generative perplexity of samples scored by a reference model: exp(nll_sum / num_tokens), with
    ``nll_sum`` the summed −ln p_ref (nats) over the ``num_tokens`` scored tokens."""
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return math.exp(nll_sum / num_tokens)


def sample_metrics(samples) -> dict[str, float]:
    """distinct-1/2/3, seq-rep-2/3/4, unigram entropy (nats) and mean length (tokens per sample;
    0.0 for no samples) of ``samples``."""
    samples = [_ids(s) for s in samples]
    return {
        **{f"distinct_{n}": distinct_n(samples, n) for n in (1, 2, 3)},
        **{f"seq_rep_{n}": seq_rep_n(samples, n) for n in (2, 3, 4)},
        "unigram_entropy": unigram_entropy(samples),
        "mean_length": sum(map(len, samples)) / len(samples) if samples else 0.0,
    }


def mauve(p_features, q_features, *, num_buckets: int | str = "auto", seed: int = 25, kmeans_num_redo: int = 5,
          kmeans_max_iter: int = 500) -> float:
    """MAUVE (Pillutla et al., 2021) between sample sets P and Q given one feature vector per sample,
    [n_p, d] and [n_q, d] (tensors or arrays), with the ``mauve-text`` package:

    1. the L2-normalised features of P ∪ Q are PCA-reduced (90 % of the variance) and clustered by
       k-means into ``num_buckets`` buckets ("auto": max(2, round(min(n_p, n_q)/10)));
    2. p, q = the bucket histograms of P and Q; r_λ = λ·p + (1 − λ)·q;
    3. MAUVE = area under the divergence curve ``{(e^{−5·KL(q‖r_λ)}, e^{−5·KL(p‖r_λ)}) : λ ∈ (0, 1)}``.

    1 when P and Q fill the buckets alike, toward 0 when they share none. ``kmeans_num_redo``
    restarts of at most ``kmeans_max_iter`` iterations, seeded with ``seed``.
    """
    try:
        import mauve as mauve_text
    except ImportError:
        raise ImportError("MAUVE needs the mauve-text package: pip install 'dblocks_titan[eval]'") from None
    out = mauve_text.compute_mauve(
        p_features=_float32_array(p_features), q_features=_float32_array(q_features), num_buckets=num_buckets,
        seed=seed, kmeans_num_redo=kmeans_num_redo, kmeans_max_iter=kmeans_max_iter, device_id=-1, verbose=False,
    )
    return float(out.mauve)


def mauve_over_clusterings(p_features, q_features, *, clusterings: int, seed: int = 25,
                           **kwargs) -> tuple[float, float]:
    """(mean, std) of :func:`mauve` over ``clusterings`` k-means seeds ``seed``, ``seed + 1``, …: the samples
    and features stay the same, only the buckets move. One clustering of 1000 samples of 50 tokens
    moves MAUVE by about ±0.1 from seed to seed (0.51 … 0.77 over 8 seeds on one sample set, the long
    pair's twin), more than most differences between models, so the eval reports the mean (std = the
    spread of one clustering, not the mean's error; population std, 0 for one clustering)."""
    scores = torch.tensor([mauve(p_features, q_features, seed=seed + i, **kwargs) for i in range(clusterings)],
                          dtype=torch.float64)
    return float(scores.mean()), float(scores.std(correction=0))


def _float32_array(features):
    """Features as the float32 numpy array [n, d] that faiss's k-means takes."""
    return torch.as_tensor(features).detach().float().cpu().numpy()


def hf_text_features(texts: list[str], model_name: str, *, max_len: int = 1024, batch_size: int = 8):
    """MAUVE's own featurization (the paper's setting with ``gpt2-large``): the final hidden state at the
    last token of each text under ``model_name``, a Hugging Face model name or local folder loaded by
    mauve-text through ``transformers`` → array [n, d]. Offline only with a local folder."""
    from mauve.compute_mauve import get_features_from_input

    device_id = 0 if torch.cuda.is_available() else -1
    return get_features_from_input(None, None, texts, model_name, max_len, device_id, "p", batch_size)

"""Sample-quality metrics (issue 5) on crafted token-id samples whose answers are worked out by hand,
and MAUVE on crafted feature clouds."""

import math

import pytest
import torch

from dblocks_titan.text_metrics import (
    distinct_n,
    generative_perplexity,
    mauve,
    mauve_over_clusterings,
    sample_metrics,
    seq_rep_n,
    unigram_entropy,
)

TOL = 1e-12
CYCLE = [1, 2, 3] * 3  # 9 tokens, 3 distinct n-grams for every n <= 7


def test_distinct_n_single_sample():
    assert distinct_n([[1, 2, 3, 4]], 1) == pytest.approx(1.0, abs=TOL)
    assert distinct_n([[1, 2, 3, 4]], 2) == pytest.approx(1.0, abs=TOL)
    assert distinct_n([[1, 1, 1, 1]], 1) == pytest.approx(1 / 4, abs=TOL)
    assert distinct_n([[1, 1, 1, 1]], 2) == pytest.approx(1 / 3, abs=TOL)
    assert distinct_n([[1, 1, 1, 1]], 3) == pytest.approx(1 / 2, abs=TOL)
    assert distinct_n([CYCLE], 2) == pytest.approx(3 / 8, abs=TOL)


def test_distinct_n_pools_samples_without_crossing_them():
    assert distinct_n([[1, 2], [2, 1]], 1) == pytest.approx(2 / 4, abs=TOL)
    assert distinct_n([[1, 2], [2, 1]], 2) == pytest.approx(2 / 2, abs=TOL)
    # 2 bigrams, both (1, 2); joining the samples would add (2, 1) and give 2/3
    assert distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(1 / 2, abs=TOL)


def test_distinct_n_edge_cases():
    assert distinct_n([], 1) == 0.0
    assert distinct_n([[]], 1) == 0.0
    assert distinct_n([[1, 2, 3, 4]], 5) == 0.0  # n longer than the sample
    assert distinct_n([[1, 2, 3], [4, 4, 4, 4]], 4) == pytest.approx(1 / 1, abs=TOL)  # short sample adds none
    with pytest.raises(ValueError):
        distinct_n([[1, 2]], 0)


def test_seq_rep_n_cycle():
    # cycle of 3 over 9 tokens: n-grams = 9 − n + 1, unique = 3
    assert seq_rep_n([CYCLE], 1) == pytest.approx(1 - 3 / 9, abs=TOL)
    assert seq_rep_n([CYCLE], 2) == pytest.approx(1 - 3 / 8, abs=TOL)
    assert seq_rep_n([CYCLE], 3) == pytest.approx(1 - 3 / 7, abs=TOL)
    assert seq_rep_n([CYCLE], 4) == pytest.approx(1 - 3 / 6, abs=TOL)
    assert seq_rep_n([[1, 2, 3, 4]], 2) == 0.0
    assert seq_rep_n([[5, 5, 5, 5, 5]], 2) == pytest.approx(1 - 1 / 4, abs=TOL)


def test_seq_rep_n_averages_per_sample():
    # (5/8 + 0) / 2; [7] has no bigram and is left out of the mean
    assert seq_rep_n([CYCLE, [1, 2, 3, 4], [7]], 2) == pytest.approx(5 / 16, abs=TOL)
    # per-sample, not pooled: two identical repeat-free samples have rep 0
    assert seq_rep_n([[1, 2, 3], [1, 2, 3]], 2) == 0.0


def test_seq_rep_n_edge_cases():
    assert seq_rep_n([], 2) == 0.0
    assert seq_rep_n([[]], 2) == 0.0
    assert seq_rep_n([[1, 2, 3]], 4) == 0.0


def test_unigram_entropy():
    assert unigram_entropy([[0, 1, 2, 3, 4]]) == pytest.approx(math.log(5), abs=TOL)
    assert unigram_entropy([[0, 1], [2, 3]]) == pytest.approx(math.log(4), abs=TOL)  # pooled
    assert unigram_entropy([CYCLE]) == pytest.approx(math.log(3), abs=TOL)
    assert unigram_entropy([[7, 7, 7]]) == 0.0
    # p = (2/3, 1/3): H = ln 3 − (2/3) ln 2
    assert unigram_entropy([[1, 1, 2]]) == pytest.approx(math.log(3) - 2 / 3 * math.log(2), abs=TOL)
    assert unigram_entropy([]) == 0.0
    assert unigram_entropy([[], []]) == 0.0


def test_generative_perplexity():
    assert generative_perplexity(0.0, 7) == 1.0
    assert generative_perplexity(5 * math.log(10), 5) == pytest.approx(10.0, abs=1e-12)
    assert generative_perplexity(4 * math.log(27), 4) == pytest.approx(27.0, abs=1e-12)
    with pytest.raises(ValueError):
        generative_perplexity(1.0, 0)


def test_tensors_equal_lists():
    lists = [CYCLE, [1, 1, 2, 5]]
    tensors = [torch.tensor(s) for s in lists]
    assert sample_metrics(tensors) == sample_metrics(lists)
    assert sample_metrics(torch.tensor([CYCLE, CYCLE])) == sample_metrics([CYCLE, CYCLE])  # rows are samples
    with pytest.raises(ValueError):
        sample_metrics([torch.zeros(2, 2, dtype=torch.long)])


def test_sample_metrics():
    m = sample_metrics(iter([CYCLE]))  # a one-shot iterable is read once
    expected = {
        "distinct_1": 3 / 9,
        "distinct_2": 3 / 8,
        "distinct_3": 3 / 7,
        "seq_rep_2": 1 - 3 / 8,
        "seq_rep_3": 1 - 3 / 7,
        "seq_rep_4": 1 - 3 / 6,
        "unigram_entropy": math.log(3),
        "mean_length": 9.0,
    }
    assert m.keys() == expected.keys()
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=TOL), k
    assert sample_metrics([[1, 2], [3, 4, 5, 6]])["mean_length"] == 3.0
    assert sample_metrics([]) == {k: 0.0 for k in expected}


def clouds(centers: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """n feature vectors [n, d]: a random center of ``centers`` [k, d] plus N(0, 0.5²) noise each."""
    pick = torch.randint(0, len(centers), (n,), generator=generator)
    return centers[pick] + 0.5 * torch.randn(n, centers.shape[1], generator=generator)


def test_mauve_is_one_for_the_same_distribution_and_near_zero_for_unrelated_samples():
    g = torch.Generator().manual_seed(0)
    centers, other = 3 * torch.randn(4, 16, generator=g), 3 * torch.randn(4, 16, generator=g)
    p, q, unrelated = clouds(centers, 60, g), clouds(centers, 60, g), clouds(other, 60, g)
    score = lambda a, b: mauve(a, b, num_buckets=8, kmeans_num_redo=1, kmeans_max_iter=50)  # noqa: E731
    assert score(p, p) == pytest.approx(1.0, abs=1e-6)
    assert score(p, q) > 0.9  # two draws of one distribution
    assert score(p, unrelated) < 0.1
    assert score(p.numpy(), q.double()) == pytest.approx(score(p, q))  # arrays or tensors, any float dtype


def test_mauve_over_clusterings_is_the_mean_and_spread_of_one_clustering_per_seed():
    g = torch.Generator().manual_seed(1)
    centers = 3 * torch.randn(6, 16, generator=g)
    p, q = clouds(centers, 80, g), clouds(centers[:4], 80, g)  # q misses two of p's clusters
    kw = dict(num_buckets=6, kmeans_num_redo=1, kmeans_max_iter=50)
    singles = [mauve(p, q, seed=s, **kw) for s in (7, 8, 9)]
    mean, std = mauve_over_clusterings(p, q, clusterings=3, seed=7, **kw)
    assert mean == pytest.approx(sum(singles) / 3)
    assert std == pytest.approx(float(torch.tensor(singles).std(correction=0)))
    assert mauve_over_clusterings(p, q, clusterings=1, seed=7, **kw) == (pytest.approx(singles[0]), 0.0)
    assert 0.1 < mean < 0.95  # the missing clusters show

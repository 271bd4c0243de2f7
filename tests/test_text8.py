"""dblocks_titan.data.text8 and .markov: char tokenizer, text8 reading and split, chunk dataloader, Markov source.

Fast and offline: the 100M-character text8 stand-in is written once per module to a temporary directory.
"""

import json
import math
import zipfile

import numpy as np
import pytest
import torch

from dblocks_titan.data import CharTokenizer, Text8DataLoader, normalize, read_text8
from dblocks_titan.data import text8 as t8
from dblocks_titan.data.chars import ALPHABET
from dblocks_titan.data.datasets import SHAKESPEARE_VALIDATION_TITLES
from dblocks_titan.data.markov import MARKOV_SPLIT_CHARS, MarkovSource, markov_source, markov_text

TOK = CharTokenizer()


def _loader(dataset="shakespeare_text8", split="validation", *, path=None, rank=0, world=1, seq_len=256, batch=4, **kw):
    """A Text8DataLoader built as titan builds one (one pass unless infinite=True is passed)."""
    config = Text8DataLoader.Config(dataset=dataset, dataset_path=path, split=split, **{"infinite": False, **kw})
    tokenizer = CharTokenizer.Config().build(tokenizer_path="ignored")  # as titan's Trainer builds it
    return config.build(dp_world_size=world, dp_rank=rank, tokenizer=tokenizer, seq_len=seq_len, local_batch_size=batch)


# ---- tokenizer and normalisation ------------------------------------------------------------------


def test_tokenizer_ids_and_round_trip():
    assert TOK.get_vocab_size() == 28 and TOK.mask_id == 27 and TOK.bos_id is None and TOK.eos_id is None
    assert TOK.encode(" az") == [0, 1, 26] and TOK.encode("b", add_bos=True, add_eos=True) == [2]
    text = "the quick brown fox jumps over the lazy dog"
    assert TOK.decode(TOK.encode(text)) == text
    assert TOK.decode(torch.tensor([20, 27, 5])) == "t_e"  # [MASK] reads as '_'
    assert TOK.encode_to_tensor(text).dtype == torch.uint8
    with pytest.raises(ValueError, match="outside"):
        TOK.decode([28])


@pytest.mark.parametrize(
    "text, char, offset", [("abc É", "É", 4), ("ab1cÉ", "1", 2), ("Hello", "H", 0), ("a\nb", "\\n", 1)]
)
def test_tokenizer_error_names_first_bad_character(text, char, offset):
    with pytest.raises(ValueError) as e:
        TOK.encode(text)
    msg = str(e.value)
    assert "\n" not in msg and f"character '{char}' at offset {offset} " in msg and "normalize" in msg


def test_normalize():
    assert normalize("  Hello, World!\n\tIt's 1984 -- É ok  ") == "hello world it s ok"
    assert normalize("") == normalize("123 !!") == ""
    assert normalize("already text") == "already text"


# ---- text8 files and the standard split -----------------------------------------------------------


def _marker(offset):
    return "".join("abcdefghij"[int(d)] for d in f"{offset:09d}")  # 9 letters naming the offset


@pytest.fixture(scope="module")
def text8_files(tmp_path_factory):
    """A text8-sized file (100M chars: 'x' and spaces, with offset-naming markers at the split edges), plain
    and zipped."""
    data = bytearray(b"xxx " * (t8.TEXT8_CHARS // 4))
    marked = [0, 90_000_000 - 9, 90_000_000, 95_000_000 - 9, 95_000_000, t8.TEXT8_CHARS - 9]
    for off in marked:
        data[off : off + 9] = _marker(off).encode()
    root = tmp_path_factory.mktemp("text8")
    (root / "text8").write_bytes(data)
    with zipfile.ZipFile(root / "text8.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.writestr("text8", bytes(data))
    return root


def test_standard_split_sizes_and_offsets(text8_files):
    text = read_text8(str(text8_files / "text8"))
    assert len(text) == t8.TEXT8_CHARS
    train, val, test = (t8.split_text8(text, s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (90_000_000, 5_000_000, 5_000_000)
    assert train.startswith(_marker(0)) and train.endswith(_marker(90_000_000 - 9))
    assert val.startswith(_marker(90_000_000)) and val.endswith(_marker(95_000_000 - 9))
    assert test.startswith(_marker(95_000_000)) and test.endswith(_marker(t8.TEXT8_CHARS - 9))


def test_zip_and_file_url_read_the_same_text(text8_files):
    plain = read_text8(str(text8_files / "text8"))
    assert read_text8(str(text8_files / "text8.zip")) == plain
    assert read_text8(f"file://{text8_files}/text8.zip") == plain


def test_wrong_size_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="has 100,000,000 characters but this text has 12"):
        t8.split_text8("a" * 12, "train")
    (tmp_path / "text8").write_text("abc def\n")
    assert read_text8(f"file://{tmp_path}/text8") == "abc def"  # the trailing newline is dropped
    with pytest.raises(FileNotFoundError) as e:
        read_text8(str(tmp_path / "nope" / "text8.zip"))
    assert "nope/text8.zip" in str(e.value) and "--dataloader.dataset_path" in str(e.value)
    assert "\n" not in str(e.value)
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("enwik8", "abc")
    with pytest.raises(ValueError, match="no member 'text8'"):
        read_text8(str(tmp_path / "other.zip"))


def test_text8_loader_needs_a_path_and_a_char_tokenizer(text8_files):
    with pytest.raises(ValueError, match="needs --dataloader.dataset_path"):
        _loader("text8")
    with pytest.raises(FileNotFoundError, match="--dataloader.dataset_path"):
        _loader("text8", path=str(text8_files / "missing.zip"))
    with pytest.raises(ValueError, match="unknown --dataloader.dataset"):
        Text8DataLoader.Config(dataset="text9")
    with pytest.raises(ValueError, match="unset --dataloader.dataset_path"):
        _loader("markov", path="x")
    config = Text8DataLoader.Config(dataset="shakespeare_text8", split="validation")
    with pytest.raises(ValueError, match="CharTokenizer"):
        config.build(dp_world_size=1, dp_rank=0, tokenizer=object(), seq_len=256, local_batch_size=4)
    x, _ = next(iter(_loader("text8", "test", path=str(text8_files / "text8.zip"))))
    assert TOK.decode(x["input"][0]).startswith(_marker(95_000_000))


# ---- dataloader -----------------------------------------------------------------------------------


def test_batches_are_consecutive_chunks_with_labels_equal_input():
    corpus = t8.embedded_text8("validation")
    seen = []
    for x, labels in _loader(batch=8):
        assert x["input"].dtype == torch.long and x["input"].shape[1] == 256
        assert torch.equal(labels, x["input"]) and labels is not x["input"]
        seen += [TOK.decode(row) for row in x["input"]]
    assert x["input"].shape[0] <= 8 and len(seen) == len(corpus) // 256  # one pass, the partial tail dropped
    assert seen == [corpus[i * 256 : (i + 1) * 256] for i in range(len(seen))]


def test_full_batches_shape():
    x, labels = next(iter(_loader(batch=4)))
    assert x["input"].shape == labels.shape == (4, 256)


def test_dp_ranks_are_disjoint_and_equal():
    corpus = t8.embedded_text8("validation")
    n = len(corpus) // 256
    per_rank = [[TOK.decode(row) for x, _ in _loader(rank=rank, world=2, batch=16) for row in x["input"]]
                for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == n // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert per_rank[1][:3] == [corpus[i * 256 : (i + 1) * 256] for i in (1, 3, 5)]  # chunk i -> rank i % 2


def test_validation_is_the_same_every_build():
    a, b = (next(iter(_loader(infinite=inf)))[0]["input"] for inf in (False, True))
    assert torch.equal(a, b)


def _small_corpus(tmp_path, n_words=900):
    """A JSONL of two works: a training one of ~n_words*5 characters and a held-out one."""
    rng = np.random.default_rng(0)
    words = [''.join(rng.choice(list("abcdefghij"), size=4)) for _ in range(n_words)]
    path = tmp_path / "works.jsonl"
    records = [{"title": "Train Work", "text": " ".join(words).upper()},
               {"title": SHAKESPEARE_VALIDATION_TITLES[0], "text": "Held out, really."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path), normalize(" ".join(words))


def test_train_shuffles_each_epoch_and_resumes_exactly(tmp_path):
    path, text = _small_corpus(tmp_path)
    n = len(text) // 64  # 70 chunks; batches of 16 -> epoch 1 starts inside batch 5
    chunks = {text[i * 64 : (i + 1) * 64]: i for i in range(n)}

    def indices(batch):
        return [chunks[TOK.decode(r)] for r in batch[0]["input"]]

    loader = _loader(split="train", path=path, seq_len=64, batch=16, infinite=True)
    it = iter(loader)
    order = sum((indices(next(it)) for _ in range(9)), [])  # 144 = two epochs and a bit
    assert sorted(order[:n]) == sorted(order[n : 2 * n]) == list(range(n))
    assert order[:n] != order[n : 2 * n] and order[:n] != list(range(n))
    for k in (0, 3, 6):  # resume at the start, inside epoch 0, and in epoch 1
        first = _loader(split="train", path=path, seq_len=64, batch=16, infinite=True)
        it = iter(first)
        for _ in range(k):
            next(it)
        state = first.state_dict()
        resumed = _loader(split="train", path=path, seq_len=64, batch=16, infinite=True)
        resumed.load_state_dict(state)
        assert indices(next(iter(resumed))) == indices(next(it)) == order[16 * k : 16 * (k + 1)]


def test_markov_dataset_loader():
    x, labels = next(iter(_loader("markov", "validation", markov_order=2, batch=2)))
    assert x["input"].shape == (2, 256) and torch.equal(x["input"], labels)
    text = markov_text("validation", order=2)
    assert TOK.decode(x["input"][1]) == text[256:512]


# ---- embedded corpus ------------------------------------------------------------------------------


def test_embedded_text8_corpus():
    train, val, test = (t8.embedded_text8(s) for s in ("train", "validation", "test"))
    print(f"embedded text8-style corpus: train {len(train):,}, validation {len(val):,}, test {len(test):,} chars")
    assert test == val  # documented: the held-out works serve as both
    assert 5_000_000 < len(train) < 6_500_000 and 250_000 < len(val) < 400_000
    for text in (train, val):
        assert set(text) == set(ALPHABET) and "  " not in text and text == text.strip()
    assert val.startswith("macbeth") and "areopagitica" in val and "to be or not to be" in train
    macbeth_line = "to morrow and to morrow and to morrow creeps in this petty pace"
    assert macbeth_line in val and macbeth_line not in train


# ---- Markov source --------------------------------------------------------------------------------


def _dense_stationary(source):
    """Reference: the stationary distribution from the dense state-transition matrix (least squares)."""
    s, k = source.n_states, source.order
    t = np.zeros((s, s))
    for state in range(s):
        for c in range(27):
            t[state, (state * 27 + c) % s] += source.transitions[state, c]
    a = np.vstack([t.T - np.eye(s), np.ones((1, s))])
    b = np.zeros(s + 1)
    b[-1] = 1
    return np.linalg.lstsq(a, b, rcond=None)[0]


def test_markov_rows_and_exact_entropy_of_random_chains():
    for order in (1, 2):
        source = MarkovSource(order, seed=3, concentration=0.3)
        assert source.transitions.shape == (27**order, 27)
        assert np.allclose(source.transitions.sum(1), 1, atol=1e-12)
        assert np.allclose(source.stationary, _dense_stationary(source), atol=1e-10)
        rows = source.transitions
        h = -(rows * np.log(rows)).sum(1)
        assert abs(source.entropy_rate() - _dense_stationary(source) @ h) < 1e-9


def test_markov_entropy_of_hand_made_chains():
    uniform = MarkovSource.from_transitions(np.full((27, 27), 1 / 27))
    assert abs(uniform.entropy_rate() - math.log(27)) < 1e-12
    assert abs(uniform.entropy_per_char(256) - math.log(27)) < 1e-12
    cycle = MarkovSource.from_transitions(np.eye(27)[np.roll(np.arange(27), -1)])  # a -> b -> ... -> ' ' -> a
    assert cycle.entropy_rate() == 0 and abs(cycle.entropy_per_char(27) - math.log(27) / 27) < 1e-12
    assert cycle.sample(30, seed=0)[1:4] in (ALPHABET * 3)
    # space -> one of the 26 letters uniformly, any letter -> space: pi(space) = 1/2, so H = ln(26) / 2.
    p = np.zeros((27, 27))
    p[0, 1:] = 1 / 26
    p[1:, 0] = 1
    alternating = MarkovSource.from_transitions(p)
    assert abs(alternating.stationary[0] - 0.5) < 1e-12
    assert abs(alternating.entropy_rate() - math.log(26) / 2) < 1e-12
    # the same chain written as order 2 (the next symbol depends on the last one only): same rate
    alternating2 = MarkovSource.from_transitions(np.tile(p, (27, 1)))
    assert abs(alternating2.entropy_rate() - math.log(26) / 2) < 1e-12
    assert abs(alternating2.entropy_per_char(2) - math.log(52) / 2) < 1e-12  # 52 equally likely pairs


def test_markov_sample_log_loss_matches_entropy_rate():
    for order in (1, 2):
        source = MarkovSource(order, seed=0, concentration=0.1)
        nll = source.mean_nll(source.sample(200_000, seed=1))
        assert abs(nll / source.entropy_rate() - 1) < 0.02, (order, nll, source.entropy_rate())


def test_markov_seeds_reproducible_and_splits_distinct():
    a, b, c = MarkovSource(2, 5, 0.1), MarkovSource(2, 5, 0.1), MarkovSource(2, 6, 0.1)
    assert np.array_equal(a.transitions, b.transitions) and not np.array_equal(a.transitions, c.transitions)
    assert a.sample(1000, seed=1) == b.sample(1000, seed=1) != a.sample(1000, seed=2)
    val = markov_text("validation")
    assert len(val) == MARKOV_SPLIT_CHARS["validation"] and set(val) <= set(ALPHABET)
    assert val == markov_text("validation") != markov_text("test")
    print(f"markov entropy rates (nats/char): order 1 {markov_source(1, 0).entropy_rate():.6f}, "
          f"order 2 {markov_source(2, 0).entropy_rate():.6f}")
    with pytest.raises(ValueError, match="use 1, 2 or 3"):
        MarkovSource(4, 0, 0.1)

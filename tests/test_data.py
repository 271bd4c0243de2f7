"""dblocks_titan.data: embedded corpus and split, titan's dataloader on our datasets, tokenizer adapters.

Fast and offline: small files written per test; the HF datasets cache goes to a temporary directory.
"""

import base64
import gzip
import json

import datasets
import pytest
import sentencepiece as spm
import torch
from torchtitan.components.tokenizer import HuggingFaceTokenizer
from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataLoader

from dblocks_titan.data import TOKENIZER_DIR, SentencePieceTokenizer, TiktokenTokenizer, register_datasets
from dblocks_titan.data import datasets as dd

LINE = "To be, or not to be: that is the question:\n  Whether 'tis nobler in the mind to suffer"


@pytest.fixture(autouse=True)
def _hf_cache(tmp_path_factory, monkeypatch):
    """Keep the Arrow caches that Dataset.from_generator writes out of ~/.cache."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache"))


@pytest.fixture(scope="module")
def hf_tok():
    return HuggingFaceTokenizer(tokenizer_path=TOKENIZER_DIR)


def _loader(tokenizer, dataset, path=None, *, rank=0, world=1, seq_len=64, batch=4):
    config = HuggingFaceTextDataLoader.Config(dataset=dataset, dataset_path=path, infinite=False)
    return config.build(dp_world_size=world, dp_rank=rank, tokenizer=tokenizer, seq_len=seq_len, local_batch_size=batch)


def _write_owt(path, docs):
    lines = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs))
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(lines.encode()))
    else:
        path.write_text(lines)


DOCS = [f"Document {i}: the quick brown fox jumps over the lazy dog. " * 3 for i in range(200)]


# ---- corpus and split ----------------------------------------------------------------------------


def test_registered_idempotently():
    register_datasets()
    register_datasets()
    for name in ("shakespeare", "owt", "lm1b", "text"):
        assert name in DATASETS and f"{name}_validation" in DATASETS
    assert DATASETS["shakespeare"].path == dd.SHAKESPEARE_PATH


def test_shakespeare_split_by_work():
    train = dd.load_shakespeare(dd.SHAKESPEARE_PATH, "train")
    val = dd.load_shakespeare(dd.SHAKESPEARE_PATH, "validation")
    assert len(train) + len(val) == 49 and set(train.column_names) == {"title", "author", "text"}
    assert set(val["title"]) == set(dd.SHAKESPEARE_VALIDATION_TITLES)
    assert not set(train["title"]) & set(val["title"])
    n_train, n_val = (sum(map(len, ds["text"])) for ds in (train, val))
    assert 0.03 < n_val / (n_train + n_val) < 0.07, (n_train, n_val)
    assert {"William Shakespeare", "John Milton"} <= set(train["author"])
    hamlet = train[train["title"].index("Hamlet")]["text"]
    assert hamlet.startswith("HAMLET, PRINCE OF DENMARK") and "To be, or not to be" in hamlet


# ---- titan's dataloader on our datasets ------------------------------------------------------------


def test_shakespeare_batches_are_shifted_within_documents(hf_tok):
    inputs, labels = next(iter(_loader(hf_tok, "shakespeare")))
    x, pos = inputs["input"], inputs["positions"]
    assert x.shape == labels.shape == pos.shape == (4, 64) and x.dtype == torch.long
    assert x[0, 0] == hf_tok.bos_id and hf_tok.decode(x[0].tolist()).startswith("ALL'S WELL THAT ENDS WELL")
    same_doc = pos[:, 1:] != 0  # position 0 starts a new document
    assert torch.equal(labels[:, :-1][same_doc], x[:, 1:][same_doc])
    assert (labels[:, :-1][~same_doc] == hf_tok.eos_id).all()  # a document's last target is its eos


def test_validation_loader_and_dp_ranks_differ(hf_tok):
    val_x = next(iter(_loader(hf_tok, "shakespeare_validation")))[0]["input"]
    assert hf_tok.decode(val_x[0].tolist()).startswith("MACBETH")
    r0, r1 = (next(iter(_loader(hf_tok, "shakespeare", rank=r, world=2)))[0]["input"] for r in (0, 1))
    assert not torch.equal(r0, r1)


@pytest.mark.parametrize("name", ["owt.jsonl", "owt.jsonl.gz"])
def test_owt_jsonl(tmp_path, hf_tok, name):
    path = tmp_path / name
    _write_owt(path, DOCS)
    train, val = (dd.load_owt(str(path), split) for split in ("train", "validation"))
    assert train.column_names == ["text"] and (len(train), len(val)) == (198, 2)  # last 1% = 2 docs
    assert val["text"] == DOCS[-2:] and train["text"] == DOCS[:-2]
    x = next(iter(_loader(hf_tok, "owt", f"file://{path}", seq_len=16)))[0]["input"]
    assert x.shape == (4, 16) and hf_tok.decode(x[0].tolist()).startswith("Document 0:")


def test_checkpoint_resume(tmp_path, hf_tok):
    """Map-style datasets resume from titan's saved sample_idx + token buffers."""
    path = tmp_path / "owt.jsonl"
    _write_owt(path, DOCS)
    loader = _loader(hf_tok, "owt", str(path), seq_len=16)
    batches = iter(loader)
    for _ in range(5):
        next(batches)
    state = loader.state_dict()
    expected = next(batches)[0]["input"]
    resumed = _loader(hf_tok, "owt", str(path), seq_len=16)
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))[0]["input"], expected)


def test_owt_cache_follows_file_changes(tmp_path):
    path = tmp_path / "owt.jsonl"
    _write_owt(path, DOCS[:10])
    assert len(dd.load_owt(str(path), "train")) == 9
    _write_owt(path, DOCS[:50])
    assert len(dd.load_owt(str(path), "train")) == 49


def test_lm1b_file_glob_and_release_dir(tmp_path, hf_tok):
    sentences = [f"Sentence number {i} ." for i in range(300)]
    (tmp_path / "news.txt").write_text("\n".join(sentences) + "\n")
    train, val = (dd.load_lm1b(str(tmp_path / "news.txt"), s) for s in ("train", "validation"))
    assert train["text"] == sentences[:297] and val["text"] == sentences[297:]
    assert len(dd.load_lm1b(str(tmp_path / "*.txt"), "validation")) == 3

    root = tmp_path / "1-billion-word-language-modeling-benchmark-r13output"
    for split, lines in [("train", sentences[:200]), ("validation", sentences[200:])]:
        shard = root / dd.LM1B_SPLIT_GLOBS[split].replace("??", "01")
        shard.parent.mkdir(parents=True)
        shard.write_text("\n".join(lines) + "\n")
    assert dd.load_lm1b(str(root), "train")["text"] == sentences[:200]
    assert dd.load_lm1b(str(root), "validation")["text"] == sentences[200:]
    x = next(iter(_loader(hf_tok, "lm1b_validation", str(root), seq_len=8)))[0]["input"]
    assert hf_tok.decode(x[0].tolist()).startswith("Sentence number 200")


def test_a_text_corpus_is_its_own_split_whole(tmp_path, hf_tok):
    """``text``/``text_validation``: every document of the path in both splits; a plain file is one
    document, verbatim (blank lines kept); each line of a .jsonl(.gz) one document."""
    book = "CHAPTER I.\n\nIt was a dark and stormy night.\n\n  The rain fell in torrents.\n" * 40
    (tmp_path / "a_book.txt").write_text(book)
    _write_owt(tmp_path / "b_docs.jsonl.gz", DOCS[:3])
    for split in ("train", "validation"):
        assert dd.load_text(str(tmp_path / "*"), split)["text"] == [book, *DOCS[:3]]
    x = next(iter(_loader(hf_tok, "text_validation", str(tmp_path / "a_book.txt"), seq_len=16, batch=1)))[0]["input"]
    assert hf_tok.decode(x[0].tolist()).startswith("CHAPTER I.\n\nIt was a dark")
    with pytest.raises(ValueError, match=r"dataset 'text_validation' needs --dataloader.dataset_path pointing at text"):
        _loader(hf_tok, "text_validation")
    (tmp_path / "c_bad.jsonl").write_text('{"text": "ok"}\n{"title": 1}\n')
    with pytest.raises(dd.RecordError, match=r"c_bad\.jsonl line 2 is not a record with string field\(s\) 'text'"):
        dd.load_text(str(tmp_path / "c_bad.jsonl"), "train")


def test_missing_paths_give_clear_errors(tmp_path, hf_tok):
    with pytest.raises(ValueError, match=r"dataset 'owt' needs --dataloader.dataset_path pointing at"):
        _loader(hf_tok, "owt")
    with pytest.raises(ValueError, match=r"dataset 'lm1b_validation' needs --dataloader.dataset_path"):
        _loader(hf_tok, "lm1b_validation")
    missing = str(tmp_path / "nope.jsonl.gz")
    with pytest.raises(FileNotFoundError, match=rf"no file at '{missing}'; point --dataloader.dataset_path"):
        _loader(hf_tok, "owt", missing)
    with pytest.raises(FileNotFoundError, match="no file at"):
        dd.load_lm1b(str(tmp_path / "*.none"), "train")


# ---- tokenizers ------------------------------------------------------------------------------------


def test_embedded_hf_tokenizer(hf_tok):
    # 4096 ids in all: <|bos|> = 0, <|eos|> = 1, 256 bytes, 3838 merges
    assert hf_tok.get_vocab_size() == 4096 and (hf_tok.bos_id, hf_tok.eos_id) == (0, 1)
    ids = hf_tok.encode(LINE, add_bos=True, add_eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and ids.count(0) == ids.count(1) == 1
    assert hf_tok.decode(ids) == LINE and len(ids) < len(LINE) / 2.5  # trained on this corpus: compresses
    assert hf_tok.encode("hi", add_bos=True, add_eos=True) == [0, hf_tok.token_to_id("hi"), 1]


def _tiny_tiktoken(path):
    """256 single-byte ranks + 3 merges, in the `.tiktoken` format: base64(token) rank, one per line."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for r, t in enumerate(tokens)))
    return path


def test_tiktoken_adapter_on_local_ranks(tmp_path):
    path = _tiny_tiktoken(tmp_path / "gpt2.tiktoken")
    tok = TiktokenTokenizer.Config(path=str(path)).build(tokenizer_path="./tests/assets/tokenizer")
    assert tok.get_vocab_size() == 260 and tok.bos_id == tok.eos_id == 259  # <|endoftext|> = len(ranks)
    assert tok.encode("the", add_bos=False) == [258, 259]
    text = "Whether 'tis nobler — naïve <|endoftext|> as text"
    ids = tok.encode(text)
    assert ids[0] == ids[-1] == 259 and 259 not in ids[1:-1]
    assert tok.decode(ids[1:-1]) == text
    # config.path unset: --hf_assets_path may be the file or a directory holding gpt2.tiktoken
    by_dir = TiktokenTokenizer.Config().build(tokenizer_path=str(tmp_path))
    assert by_dir.encode(text) == ids


def test_tiktoken_adapter_errors(tmp_path, monkeypatch):
    path = _tiny_tiktoken(tmp_path / "x.tiktoken")
    with pytest.raises(ValueError, match="--tokenizer.encoding"):
        TiktokenTokenizer.Config(path=str(path), encoding="cl100k_base").build(tokenizer_path=None)
    with pytest.raises(FileNotFoundError, match="--tokenizer.path"):
        TiktokenTokenizer.Config(path=str(tmp_path / "none.tiktoken")).build(tokenizer_path=None)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr("tiktoken.get_encoding", offline)
    with pytest.raises(RuntimeError, match="offline set --tokenizer.path"):
        TiktokenTokenizer.Config().build(tokenizer_path=str(tmp_path / "empty_dir"))


def test_sentencepiece_adapter(tmp_path):
    works = [json.loads(line) for line in dd.iter_lines(dd.SHAKESPEARE_PATH, "shakespeare")]
    lines = [line for line in works[6]["text"][:8000].split("\n") if line.strip()]  # a few KB of Hamlet
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "sp"),
        model_type="bpe",
        vocab_size=350,  # >= 3 meta + 256 byte pieces + the ~60 characters seen
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    tok = SentencePieceTokenizer.Config(path=str(tmp_path / "sp.model")).build(tokenizer_path="unused")
    assert tok.get_vocab_size() == 350 and (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode(LINE + " — naïve")
    assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
    assert tok.decode(ids) == LINE + " — naïve"  # unseen characters go through byte fallback
    (tmp_path / "sp.model").rename(tmp_path / "tokenizer.model")
    by_dir = SentencePieceTokenizer.Config().build(tokenizer_path=str(tmp_path))  # --hf_assets_path dir
    assert by_dir.encode(LINE) == tok.encode(LINE)
    with pytest.raises(FileNotFoundError, match="--tokenizer.path"):
        SentencePieceTokenizer.Config().build(tokenizer_path=str(tmp_path / "nowhere"))

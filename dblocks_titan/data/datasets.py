"""Text datasets added to torchtitan's ``DATASETS`` registry, for its own ``HuggingFaceTextDataLoader``.

Name (``--dataloader.dataset``) and what ``--dataloader.dataset_path`` means:

- ``shakespeare`` / ``shakespeare_validation``: the embedded corpus (49 public-domain works of Shakespeare and
  Milton, see ``assets/README.md``), or another JSONL of ``{"title", "text"}`` works. Split by work:
  validation is the works named in :data:`SHAKESPEARE_VALIDATION_TITLES` (~5% of characters), train the rest.
- ``owt`` / ``owt_validation``: OpenWebText-like JSONL, one ``{"text": ...}`` document per line (required).
  Validation is the **last** ``min(OWT_VALIDATION_MAX_DOCS, max(1, int(OWT_VALIDATION_FRACTION * n)))``
  of the n documents (files in sorted order), train the n minus those.
- ``lm1b`` / ``lm1b_validation``: LM1B-style plain text, one sentence (= one document) per line (required).
  A directory is the LM1B release root and uses its own split (:data:`LM1B_SPLIT_GLOBS`); a file or glob
  holds out its last :data:`LM1B_VALIDATION_FRACTION` of sentences for validation.
- ``text`` / ``text_validation``: a corpus of your own, the whole path being the split (required): each plain
  text file is one document, each line of a ``.jsonl`` file one ``{"text": ...}`` document. Point the
  validator at a held-out corpus with ``--validator.dataloader.dataset text_validation
  --validator.dataloader.dataset_path held_out.txt`` (``--validator.steps -1``: all of it).

Every path may be local, a glob or an fsspec URL (``file://``, ``https://``, ``s3://`` with s3fs installed);
``.gz``/``.xz``/``.bz2`` (and ``.zst`` with ``zstandard`` installed) are decompressed by suffix. Files are
read once into an Arrow cache (``datasets.Dataset.from_generator``, keyed by the files' path, size and
mtime/ETag), so every dataset is map-style and memory-mapped: titan checkpoints its ``sample_idx``, splits
it across data-parallel ranks with contiguous shards, and a corpus larger than RAM still loads.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import fsspec
from datasets import Dataset
from datasets.exceptions import DatasetGenerationError
from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

SHAKESPEARE_PATH = str(Path(__file__).resolve().parents[1] / "assets/corpus/shakespeare_milton.jsonl.xz")
"""The embedded corpus: one ``{"title", "author", "text"}`` record per work (built by scripts/make_corpus.py)."""

SHAKESPEARE_VALIDATION_TITLES = ("Macbeth", "Twelfth Night", "Areopagitica")
"""Held-out works: a tragedy, a comedy and Milton's prose (4.9% of characters). Areopagitica is the one
Milton work that no other file repeats (Comus, Lycidas and the minor poems appear in several)."""

OWT_VALIDATION_FRACTION = 0.01
OWT_VALIDATION_MAX_DOCS = 5_000
"""``owt_validation`` = the last min(5000, 1%) documents (nanoGPT holds out a similar ~4k of OpenWebText)."""

LM1B_SPLIT_GLOBS = {
    "train": "training-monolingual.tokenized.shuffled/news.en-000??-of-00100",
    "validation": "heldout-monolingual.tokenized.shuffled/news.en.heldout-00000-of-00050",
}
"""Files of each split under an LM1B release root (1-billion-word-language-modeling-benchmark-r13output):
the 99 training shards, and the first held-out shard, the benchmark's usual test set."""

LM1B_VALIDATION_FRACTION = 0.01
"""A single file (or a glob) given as the LM1B path holds out its last 1% of sentences."""

_FLAG = "--dataloader.dataset_path (--validator.dataloader.dataset_path for validation)"


def _open_files(urlpath: str, dataset: str, flag: str = _FLAG) -> list[fsspec.core.OpenFile]:
    """The files a path, glob or URL names, in sorted order, opened lazily as UTF-8 text."""
    fs, path = fsspec.core.url_to_fs(urlpath)
    paths = sorted(p for p in fs.glob(path) if fs.isfile(p))  # a plain path globs to itself if it exists
    if not paths:
        raise FileNotFoundError(f"dataset {dataset!r}: no file at {urlpath!r}; point {flag} at an existing file")
    if any(p.endswith(".zst") for p in paths) and "zstd" not in fsspec.available_compressions():
        raise ImportError(f"dataset {dataset!r}: reading {urlpath!r} needs `pip install zstandard`")
    return [fsspec.core.OpenFile(fs, p, "rt", compression="infer", encoding="utf-8") for p in paths]


class RecordError(ValueError):
    """A line of a data file that is not a record of its dataset: names the file and the line."""


def numbered_lines(urlpath: str, dataset: str) -> Iterator[tuple[str, int, str]]:
    """(file, line number from 1, line without its newline) of every non-blank line of the files at
    ``urlpath``."""
    for f in _open_files(urlpath, dataset):
        yield from _file_lines(f, dataset)


def _file_lines(f: fsspec.core.OpenFile, dataset: str) -> Iterator[tuple[str, int, str]]:
    """:func:`numbered_lines` of one opened file: the one line reader of this module."""
    try:
        with f as lines:
            for number, line in enumerate(lines, 1):
                if line.strip():
                    yield f.path, number, line.rstrip("\r\n")
    except UnicodeDecodeError as e:
        raise _not_utf8(f, dataset, e) from None


def _not_utf8(f: fsspec.core.OpenFile, dataset: str, e: UnicodeDecodeError) -> RecordError:
    return RecordError(f"dataset {dataset!r}: {f.path} is not UTF-8 text (bad byte at offset {e.start})")


def iter_lines(urlpath: str, dataset: str) -> Iterator[str]:
    """Every non-blank line (without its newline) of the files at ``urlpath``."""
    return (line for _, _, line in numbered_lines(urlpath, dataset))


def json_records(urlpath: str, dataset: str, needs: tuple[str, ...] = ("text",)) -> Iterator[dict[str, Any]]:
    """Every line of the files at ``urlpath`` as a JSON object with the keys ``needs`` (a string each);
    a line that is not one is a :class:`RecordError` naming the file and the line."""
    for path, number, line in numbered_lines(urlpath, dataset):
        yield _json_record(f"dataset {dataset!r}: {path} line {number}", line, needs)


def _json_record(where: str, line: str, needs: tuple[str, ...]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(f"{where} is not JSON ({e.msg} at column {e.colno}): each line must be one "
                          f"{{{', '.join(f'{k!r}: ...' for k in needs)}}} record") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in needs):
        raise RecordError(f"{where} is not a record with string field(s) {', '.join(map(repr, needs))}")
    return record


def _records(urlpath: str, dataset: str, parse: Callable[[str, str], Iterator[dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    count = 0
    for count, record in enumerate(parse(urlpath, dataset), 1):
        yield record
    if count == 0:
        raise RecordError(f"dataset {dataset!r}: {urlpath!r} holds no records (its files are empty)")


def _shakespeare_records(urlpath: str, dataset: str) -> Iterator[dict[str, Any]]:
    return json_records(urlpath, dataset, needs=("title", "text"))


def _owt_records(urlpath: str, dataset: str) -> Iterator[dict[str, str]]:
    return ({"text": r["text"]} for r in json_records(urlpath, dataset))


def _lm1b_records(urlpath: str, dataset: str) -> Iterator[dict[str, str]]:
    return ({"text": line} for line in iter_lines(urlpath, dataset))


def _is_jsonl(path: str) -> bool:
    stem, suffix = posixpath.splitext(path)
    if suffix[1:] in fsspec.utils.compressions:  # .jsonl.gz and the like
        stem, suffix = posixpath.splitext(stem)
    return suffix == ".jsonl"


def _text_records(urlpath: str, dataset: str) -> Iterator[dict[str, str]]:
    """Each plain text file as one document; each line of a ``.jsonl`` file as one ``{"text"}`` document."""
    for f in _open_files(urlpath, dataset):
        if _is_jsonl(f.path):
            for path, number, line in _file_lines(f, dataset):
                yield {"text": _json_record(f"dataset {dataset!r}: {path} line {number}", line, ("text",))["text"]}
            continue
        try:
            with f as file:
                text = file.read()
        except UnicodeDecodeError as e:
            raise _not_utf8(f, dataset, e) from None
        if text.strip():
            yield {"text": text}


def _arrow(urlpath: str, dataset: str, parse: Callable[[str, str], Iterator[dict[str, Any]]]) -> Dataset:
    """All records of ``urlpath`` as a map-style Dataset, cached on disk until a file changes. A bad
    record is this module's one-line :class:`RecordError` (never ``datasets``' own wrapper)."""
    keys = dataset_files_key(dataset, urlpath)
    fingerprint = hashlib.sha256("\n".join([parse.__name__, *keys]).encode()).hexdigest()[:32]
    kwargs = {"urlpath": urlpath, "dataset": dataset, "parse": parse}
    try:
        return Dataset.from_generator(_records, gen_kwargs=kwargs, fingerprint=fingerprint)
    except DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, RecordError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise RecordError(str(cause)) from None


def _tail_split(ds: Dataset, split: str, fraction: float, max_docs: int | None, dataset: str) -> Dataset:
    """Validation = the last ``min(max_docs, max(1, int(fraction * n)))`` rows, train = the rows before them."""
    n = len(ds)
    if n < 2:
        raise ValueError(f"dataset {dataset!r} has {n} document(s); a train/validation split needs at least 2")
    n_val = min(max_docs or n, max(1, int(fraction * n)))
    return ds.select(range(n - n_val, n) if split == "validation" else range(n - n_val))


def _require(path: str, dataset: str, expected: str) -> None:
    if not path:
        raise ValueError(f"dataset {dataset!r} needs --dataloader.dataset_path pointing at {expected}")


def load_shakespeare(path: str, split: str) -> Dataset:
    """Works whose title is (validation) or is not (train) in SHAKESPEARE_VALIDATION_TITLES."""
    name = "shakespeare" if split == "train" else "shakespeare_validation"
    ds = _arrow(path, name, _shakespeare_records)
    is_val = [title in SHAKESPEARE_VALIDATION_TITLES for title in ds["title"]]
    if not any(is_val):
        raise ValueError(f"{path!r} holds none of the validation works {SHAKESPEARE_VALIDATION_TITLES}")
    return ds.select([i for i, v in enumerate(is_val) if v == (split == "validation")])


def load_owt(path: str, split: str) -> Dataset:
    name = "owt" if split == "train" else "owt_validation"
    _require(path, name, 'a JSONL file, glob or URL of {"text": ...} documents (.gz/.xz/.zst ok)')
    ds = _arrow(path, name, _owt_records)
    return _tail_split(ds, split, OWT_VALIDATION_FRACTION, OWT_VALIDATION_MAX_DOCS, name)


def load_lm1b(path: str, split: str) -> Dataset:
    name = "lm1b" if split == "train" else "lm1b_validation"
    _require(path, name, "the LM1B release directory, or a text file or glob with one sentence per line")
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        return _arrow(f"{path.rstrip('/')}/{LM1B_SPLIT_GLOBS[split]}", name, _lm1b_records)
    return _tail_split(_arrow(path, name, _lm1b_records), split, LM1B_VALIDATION_FRACTION, None, name)


def load_text(path: str, split: str) -> Dataset:
    """Every document of ``path`` (both splits: a split is the files it is given)."""
    name = "text" if split == "train" else "text_validation"
    _require(path, name, "text files (one document each) or .jsonl files of {\"text\": ...} documents")
    return _arrow(path, name, _text_records)


OWN = ("shakespeare", "owt", "lm1b", "text")
"""The datasets this module registers (each with its ``_validation`` split)."""


def check_dataset(name: str, path: str | None, *, tokenizer=None, seq_len: int = 1, flag: str = "--dataloader.dataset") -> None:
    """Fail fast on a dataset that cannot load, each a one-line error naming ``flag`` (the flag of the
    name, e.g. ``--validator.dataloader.dataset``) or ``flag`` + ``_path`` (of the path): unknown name,
    missing required path, no file; and for this module's datasets, a bad record (file and line), an empty split, or (with ``tokenizer``) a split shorter than
    one sequence of ``seq_len`` tokens. Loading builds the Arrow cache the dataloader then reuses."""
    if name not in DATASETS:
        raise ValueError(f"unknown {flag} {name!r}; choose one of {sorted(DATASETS)}")
    path = path or DATASETS[name].path
    own = name.removesuffix("_validation") in OWN
    if own and not path:
        raise ValueError(f"dataset {name!r} needs {flag}_path pointing at its data files")
    if path and not (own and name.startswith("lm1b") and fsspec.core.url_to_fs(path)[0].isdir(path)):
        _open_files(path, name, f"{flag}_path")
    if not own:
        return
    try:
        ds = DATASETS[name].loader(path)
    except ValueError as e:
        raise ValueError(f"{e} ({flag}_path)") from None
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} at {path!r} has an empty split: no documents ({flag}_path)")
    if tokenizer is not None:
        tokens = 0  # titan's text dataset: each document gives len(encode(text, bos, eos)) - 1 positions
        for sample in ds:
            tokens += len(tokenizer.encode(_text(sample), add_bos=True, add_eos=True)) - 1
            if tokens >= seq_len:
                return
        raise ValueError(f"dataset {name!r} at {path!r} holds {tokens} tokens, fewer than one sequence of "
                         f"training.seq_len = {seq_len}: lower --training.seq_len or use more data "
                         f"({flag}_path)")


def dataset_texts(name: str, path: str | None) -> Iterator[str]:
    """The texts of a registered dataset (``DATASETS[name]``, at ``path`` or its default), in order."""
    config = DATASETS[name]
    for sample in config.loader(path or config.path):
        yield config.sample_processor(sample)


def dataset_files_key(name: str, path: str | None) -> list[str]:
    """What identifies the data of ``DATASETS[name]`` at ``path``: each file's path and fsspec ``ukey``
    (size/mtime, or the remote ETag), as the Arrow cache keys them."""
    path = path or DATASETS[name].path
    return [f"{f.path}:{f.fs.ukey(f.path)}" for f in _open_files(path, name)]


def _text(sample: dict[str, Any]) -> str:
    return sample["text"]


def register_datasets() -> None:
    """Add (or re-add: idempotent) the eight datasets above to torchtitan's DATASETS registry."""
    for name, loader, default_path in [
        ("shakespeare", load_shakespeare, SHAKESPEARE_PATH),
        ("owt", load_owt, ""),
        ("lm1b", load_lm1b, ""),
        ("text", load_text, ""),
    ]:
        for suffix, split in [("", "train"), ("_validation", "validation")]:
            DATASETS[name + suffix] = DatasetConfig(
                path=default_path, loader=partial(loader, split=split), sample_processor=_text
            )

"""Character-level text8 for the masked-diffusion LM: tokenizer, corpus readers, splits and dataloader.

- :class:`CharTokenizer` (:mod:`.chars`): text8's 27 symbols plus [MASK]. Ids: space = 0, ``a``..``z`` = 1..26, [MASK] = 27
  (:data:`ALPHABET` in id order). No bos/eos.
- :func:`normalize`: text8 normalisation of any text. :func:`read_text8` reads ``text8`` / ``text8.zip``.
  :func:`split_text8` cuts the real file with the standard (MDLM/D3PM) split, :data:`TEXT8_SPLITS`.
- :func:`embedded_text8`: an offline text8-style corpus made from the embedded Shakespeare+Milton works.
- :class:`Text8DataLoader`: titan's dataloader over one split of ``text8``, ``shakespeare_text8`` or
  ``markov`` (:mod:`dblocks_titan.data.markov`), as non-overlapping ``seq_len``-character chunks.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch.utils.data import Dataset, Sampler
from torchtitan.components.dataloader import ParallelAwareDataloader
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger

from .chars import CharTokenizer, SPLITS
from .datasets import SHAKESPEARE_PATH, SHAKESPEARE_VALIDATION_TITLES, _open_files, json_records
from .markov import markov_text

TEXT8_CHARS = 100_000_000
TEXT8_SPLITS = {
    "train": (0, 90_000_000),
    "validation": (90_000_000, 95_000_000),
    "test": (95_000_000, 100_000_000),
}
"""Character ranges ``[start, end)`` of the standard text8 split (MDLM / D3PM convention)."""

DATASETS = ("shakespeare_text8", "text8", "markov")
"""Corpora that :class:`Text8DataLoader` serves (``--dataloader.dataset``)."""

SHUFFLE_SEED = 42
"""Training epoch ``e`` visits a rank's chunks in ``torch.randperm(n, seed SHUFFLE_SEED + e)`` order."""

_PATH_FLAG = "--dataloader.dataset_path"
# ---- corpora --------------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """text8 normalisation: lowercase; every character outside a-z becomes a space; runs of spaces become
    one; leading/trailing spaces are stripped. (Mahoney's wikifil.pl, which made text8 from Wikipedia, also
    spells digits out and drops wiki markup; this does neither.)"""
    return re.sub(r"[^a-z]+", " ", text.lower()).strip()


def read_text8(path: str) -> str:
    """The text of ``text8`` (one ~100M-character line) or ``text8.zip`` (member ``text8``); ``path`` may be
    local or an fsspec URL (``file://``, ``https://``, ``s3://``). A trailing newline, if any, is dropped."""
    files = _open_files(path, "text8")  # one-line FileNotFoundError naming the path and the flag
    if len(files) != 1:
        raise ValueError(f"text8: {path!r} matches {len(files)} files; point {_PATH_FLAG} at one text8 or text8.zip")
    f = files[0]
    try:
        if f.path.endswith(".zip"):
            with f.fs.open(f.path, "rb") as fh, zipfile.ZipFile(io.BytesIO(fh.read())) as z:
                if "text8" not in z.namelist():
                    raise ValueError(f"text8: {path!r} has no member 'text8' (it has {z.namelist()[:5]})")
                text = z.read("text8").decode("utf-8")
        else:
            with f as fh:  # text mode; .gz/.xz/.bz2 decompressed by suffix
                text = fh.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"text8: {path!r} is not UTF-8 text (bad byte at offset {e.start})") from None
    return text[:-1] if text.endswith("\n") else text


def split_text8(text: str, split: str) -> str:
    """The ``split`` slice of the real text8 (:data:`TEXT8_SPLITS`); ``text`` must be all 100,000,000 chars."""
    if split not in TEXT8_SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if len(text) != TEXT8_CHARS:
        raise ValueError(
            f"text8 has {TEXT8_CHARS:,} characters but this text has {len(text):,}; the standard split needs the "
            f"unmodified file (http://mattmahoney.net/dc/text8.zip) at {_PATH_FLAG}"
        )
    start, end = TEXT8_SPLITS[split]
    return text[start:end]


def embedded_text8(split: str, path: str = SHAKESPEARE_PATH) -> str:
    """A text8-style corpus from a JSONL of ``{"title", "text"}`` works (default: the embedded Shakespeare and
    Milton): each work :func:`normalize`-d, works joined with one space, in file order.

    Split by work, as ``shakespeare`` is: train = every work not in :data:`SHAKESPEARE_VALIDATION_TITLES`;
    validation = those held-out works. There are only three, so **test is the same text as validation**:
    report held-out numbers on this corpus as validation, never as an independent test set.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    works = list(json_records(path, "shakespeare_text8", needs=("title", "text")))
    held_out = [w["title"] in SHAKESPEARE_VALIDATION_TITLES for w in works]
    if not any(held_out):
        raise ValueError(f"{path!r} holds none of the validation works {SHAKESPEARE_VALIDATION_TITLES}")
    keep = [w["text"] for w, h in zip(works, held_out) if h == (split != "train")]
    return " ".join(filter(None, map(normalize, keep)))


@lru_cache(maxsize=6)
def split_text(dataset: str, path: str | None, split: str, markov_order: int = 1, markov_seed: int = 0) -> str:
    """The text of one split of one of :data:`DATASETS` (cached: the validator rebuilds its loader each
    time it runs, and text8 is a 100 MB read)."""
    if dataset == "text8":
        return split_text8(read_text8(path), split)
    if dataset == "shakespeare_text8":
        return embedded_text8(split, path or SHAKESPEARE_PATH)
    if dataset == "markov":
        return markov_text(split, order=markov_order, seed=markov_seed)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")


@lru_cache(maxsize=6)
def split_ids(dataset: str, path: str | None, split: str, markov_order: int = 1, markov_seed: int = 0) -> torch.Tensor:
    """:func:`split_text` encoded by the :class:`CharTokenizer` (uint8, one byte a character; cached: the
    loader's check encodes it before the model is built, the loader then reads it, the validator rebuilds
    its loader at every validation). Raises on characters outside the alphabet."""
    return CharTokenizer().encode_to_tensor(split_text(dataset, path, split, markov_order, markov_seed))


# ---- dataloader -----------------------------------------------------------------------------------


class Text8Chunks(Dataset):
    """One rank's ``seq_len``-character chunks of an encoded split, map-style.

    The split is cut into ``n = len(ids) // seq_len`` consecutive chunks (the partial tail dropped); chunk
    ``g`` is ``ids[g*seq_len : (g+1)*seq_len]``. Rank ``r`` of ``W`` owns chunks ``r, r+W, r+2W, ...``, the
    first ``n // W`` of them, so every rank has the same number (validation steps stay in lockstep) and
    ranks are disjoint. Item ``j`` is ``({"input": x}, x)``, ``x`` LongTensor [seq_len] of chunk ``j*W + r``.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, dp_rank: int, dp_world_size: int):
        self.ids, self.seq_len = ids, seq_len  # ids: uint8 [n_chars], one byte per character
        self.dp_rank, self.dp_world_size = dp_rank, dp_world_size
        self.n_chunks = ids.numel() // seq_len
        self.n_local = self.n_chunks // dp_world_size

    def chunk_index(self, j: int) -> int:
        """The global chunk number of this rank's ``j``-th chunk."""
        return j * self.dp_world_size + self.dp_rank

    def __len__(self) -> int:
        return self.n_local

    def __getitem__(self, j: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        if not 0 <= j < self.n_local:
            raise IndexError(f"chunk {j} of {self.n_local}")
        start = self.chunk_index(j) * self.seq_len
        x = self.ids[start : start + self.seq_len].long()
        # A masked-diffusion model denoises the chunk itself: the labels are the clean input.
        return {"input": x}, x


class ChunkSampler(Sampler[int]):
    """Indices ``0..n-1`` epoch after epoch: in order, or (``shuffle``) in a fresh permutation per epoch
    seeded with ``SHUFFLE_SEED + epoch``. ``infinite`` starts a new epoch when one ends; otherwise one epoch.
    Its iterator saves ``(epoch, position)``, so a StatefulDataLoader resumes at the next index."""

    def __init__(self, n: int, *, shuffle: bool, infinite: bool):
        self.n, self.shuffle, self.infinite = n, shuffle, infinite

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(SHUFFLE_SEED + epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        return _ChunkSamplerIterator(self)


class _ChunkSamplerIterator(Iterator[int]):
    def __init__(self, sampler: ChunkSampler):
        self.sampler = sampler
        self._start(epoch=0, pos=0)

    def _start(self, epoch: int, pos: int) -> None:
        self.epoch, self.pos, self._order = epoch, pos, self.sampler.order(epoch)

    def __next__(self) -> int:
        if self.pos == len(self._order):
            if not self.sampler.infinite:
                raise StopIteration
            self._start(self.epoch + 1, 0)
            logger.info(f"text8 chunks: starting epoch {self.epoch}")
        self.pos += 1
        return self._order[self.pos - 1]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._start(state_dict["epoch"], state_dict["pos"])


class Text8DataLoader(ParallelAwareDataloader):
    """Batches ``({"input": x}, labels)`` of non-overlapping ``seq_len``-character chunks of one split, x and
    labels both LongTensor [B, seq_len] and equal (a masked-diffusion model denoises the chunk itself).

    1. The split is encoded once by the :class:`CharTokenizer` into one uint8 tensor (:func:`split_ids`,
       cached); a chunk is a slice of it, so 90M characters take 90 MB.
    2. :class:`Text8Chunks` gives this rank its disjoint, equal-sized share of the chunks.
    3. :class:`ChunkSampler` orders them: the train split (with ``shuffle``) in a fresh seeded permutation
       each epoch; validation and test always in corpus order, so every build yields the same batches.
       ``infinite`` loops epochs (a batch may straddle two); otherwise one pass, the last batch maybe short.
    4. The sampler's ``(epoch, position)`` is in the StatefulDataLoader state, so checkpoints resume exactly.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(ParallelAwareDataloader.Config):
        dataset: str = "shakespeare_text8"
        """``shakespeare_text8`` (embedded, offline), ``text8`` (needs --dataloader.dataset_path) or ``markov``."""

        dataset_path: str | None = None
        """text8: the ``text8`` or ``text8.zip`` file or URL (required). shakespeare_text8: a JSONL of
        {"title", "text"} works (default: the embedded corpus). markov: must stay unset."""

        split: str = "train"
        """``train``, ``validation`` or ``test`` (text8: characters [0,90M), [90M,95M), [95M,100M))."""

        infinite: bool = True
        """Loop over the split forever (training); False: one pass, then StopIteration."""

        shuffle: bool = True
        """Train split only: visit chunks in a fresh seeded permutation each epoch; False reads them in order."""

        markov_order: int = 1
        """markov: order k of the chain (1..3); see dblocks_titan.data.markov."""

        markov_seed: int = 0
        """markov: seed of the chain's transition probabilities (and of its samples)."""

        def __post_init__(self) -> None:
            if self.dataset not in DATASETS:
                raise ValueError(f"unknown --dataloader.dataset {self.dataset!r}; choose one of {DATASETS}")
            if self.split not in SPLITS:
                raise ValueError(f"unknown --dataloader.split {self.split!r}; choose one of {SPLITS}")
            if not 1 <= self.markov_order <= 3:
                raise ValueError(f"--dataloader.markov_order is {self.markov_order}; use 1, 2 or 3")

        def check(self, seq_len: int | None = None, flag: str = "--dataloader") -> None:
            """Fail fast (before a model is built) on settings or files this loader cannot use, each a
            one-line error naming ``flag`` (``--dataloader`` or ``--validator.dataloader``); with ``seq_len``,
            also a split shorter than one sequence (the split is read and encoded now, cached for the build)."""
            Text8DataLoader.Config.__post_init__(self)  # the fields may have changed since construction
            path_flag = f"{flag}.dataset_path"
            if self.dataset == "text8":
                if not self.dataset_path:
                    raise ValueError(f"dataset 'text8' needs {path_flag} pointing at text8 or text8.zip")
                _open_files(self.dataset_path, "text8", path_flag)
            elif self.dataset == "markov" and self.dataset_path:
                raise ValueError(f"dataset 'markov' is generated, not read: unset {path_flag}")
            elif self.dataset == "shakespeare_text8" and self.dataset_path:
                _open_files(self.dataset_path, "shakespeare_text8", path_flag)
            if self.dataset == "text8" or seq_len is not None:
                ids = split_ids(self.dataset, self.dataset_path, self.split, self.markov_order, self.markov_seed)
                if seq_len is not None and ids.numel() < seq_len:
                    raise ValueError(f"{self.dataset} {self.split} has {ids.numel():,} characters, fewer than one "
                                     f"sequence of training.seq_len = {seq_len}: lower --training.seq_len or point "
                                     f"{path_flag} at more text")

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        tokenizer: BaseTokenizer,
        seq_len: int,
        local_batch_size: int,
        snapshot_every_n_steps: int | None = 1,
        **kwargs,
    ):
        config.check()
        if not isinstance(tokenizer, CharTokenizer):
            raise ValueError(
                f"Text8DataLoader needs the character tokenizer, got {type(tokenizer).__name__}: set the "
                "recipe's tokenizer to dblocks_titan.data.text8.CharTokenizer.Config()"
            )
        ids = split_ids(config.dataset, config.dataset_path, config.split, config.markov_order, config.markov_seed)
        chunks = Text8Chunks(ids, seq_len, dp_rank, dp_world_size)
        if chunks.n_local == 0:
            raise ValueError(
                f"{config.dataset} {config.split} has {ids.numel():,} characters = {chunks.n_chunks} chunks of "
                f"{seq_len}, too few for {dp_world_size} data-parallel rank(s); lower --training.seq_len"
            )
        shuffle = config.shuffle and config.split == "train"
        logger.info(
            f"{config.dataset} {config.split}: {ids.numel():,} chars, {chunks.n_chunks:,} chunks of {seq_len}, "
            f"{chunks.n_local:,} on dp rank {dp_rank}/{dp_world_size} ({'shuffled' if shuffle else 'in order'})"
        )
        super().__init__(
            chunks,
            dp_rank=dp_rank,
            dp_world_size=dp_world_size,
            sampler=ChunkSampler(chunks.n_local, shuffle=shuffle, infinite=config.infinite),
            batch_size=local_batch_size,
            num_workers=config.num_workers,
            persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
            prefetch_factor=config.prefetch_factor,
            snapshot_every_n_steps=snapshot_every_n_steps,
        )

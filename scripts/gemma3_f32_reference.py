#!/usr/bin/env python3
"""Adds a float32 oracle to tests/data/gemma3/cases.json: Hugging Face transformers running the
same GGUF (weights dequantized to float32 by transformers' GGUF loader), teacher-forced on
llama.cpp's prompt and greedy ids. By hand, after scripts/gemma3_reference.py; needs torch,
transformers, accelerate and gguf (see tests/data/gemma3/README.md).

Per case it adds:
- `f32_margins[i]`: at greedy step i, the f32 logit of llama.cpp's chosen id minus the largest
  other f32 logit (negative where the f32 evaluation prefers another id);
- `f32_last_prompt_top_logits`: the f32 logits of the last prompt position at the ids of
  `last_prompt_top_logits`.

    python scripts/gemma3_f32_reference.py [models/gemma-3-270m-q4_k_m.gguf] [tests/data/gemma3]
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM


def main() -> None:
    model = Path(sys.argv[1] if len(sys.argv) > 1 else "models/gemma-3-270m-q4_k_m.gguf")
    out = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/data/gemma3")
    m = AutoModelForCausalLM.from_pretrained(
        str(model.parent), gguf_file=model.name, dtype=torch.float32, attn_implementation="eager"
    )
    m.eval()
    cases = json.loads((out / "cases.json").read_text())
    for c in cases:
        ids = c["prompt_ids"] + c["greedy_ids"]
        with torch.no_grad():
            logits = m(torch.tensor([ids])).logits[0]
        first = len(c["prompt_ids"]) - 1
        margins = []
        for i, chosen in enumerate(c["greedy_ids"]):
            row = logits[first + i].clone()
            mine = float(row[chosen])
            row[chosen] = -float("inf")
            margins.append(mine - float(row.max()))
        last = logits[first]
        c["f32_margins"] = margins
        c["f32_last_prompt_top_logits"] = [[i, float(last[i])] for i, _ in c["last_prompt_top_logits"]]
        print(c["name"], [round(x, 2) for x in margins[:12]])
    (out / "cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n")
    meta = json.loads((out / "meta.json").read_text())
    meta["f32_oracle"] = {
        "implementation": "transformers GGUF loader, float32, eager attention",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")


if __name__ == "__main__":
    main()

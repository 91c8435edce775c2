"""Summarises runs.jsonl: greedy ids CPU vs CUDA (32 steps), and the 40% budget runs."""
import json, sys
import os
ref = json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_greedy.json")))
runs = {}
for line in open(sys.argv[1]):
    line = line.strip()
    if not line:
        continue
    try:
        j = json.loads(line)
    except Exception as e:
        print("bad line", e, line[:200]); continue
    runs[(j["model"], j["case"], j["mode"])] = j
def ids(j):
    return (j.get("r") or {}).get("ids")
def same(a, b):
    if a is None or b is None: return "n/a"
    n = 0
    for x, y in zip(a, b):
        if x != y: break
        n += 1
    return f"{n}/{max(len(a), len(b))}"
print("| model | case | mode | rc | tokens | equal to cpu | smol: equal to HF | first token ms | total ms | budget B | peak device weight B | peak<=budget | hits | misses |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for (m, c, mode), j in sorted(runs.items()):
    r = j.get("r") or {}
    st = r.get("stats") or {}
    t = r.get("timings") or {}
    cpu = ids(runs.get((m, c, "cpu"), {}))
    b, p = st.get("budget_bytes"), st.get("peak_allocated_bytes")
    ok = "" if mode == "cpu" or b is None or p is None else str(p <= b)
    print(f"| {m} | {c} | {mode} | {j['rc']} | {len(ids(j) or [])} | {'-' if mode=='cpu' else same(cpu, ids(j))} | {same(ref.get(c), ids(j)) if m == 'smol' else '-'} | "
          f"{t.get('first_token_ms', 0):.0f} | {t.get('total_ms', 0):.0f} | {b} | {p} | {ok} | {st.get('hits')} | {st.get('misses')} |")

"""Write the README's result tables from benchmarks/results/*.json (between <!-- table:NAME --> markers).

    python benchmarks/make_tables.py
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).parent))


def fidelity_table() -> str:
    from default_model_fidelity import summary

    data = json.loads((RESULTS / "default_model_fidelity.json").read_text())
    rows, meta = data["rows"], data["meta"]
    table = summary(rows)
    lines = [
        f"Profile `{meta['profile']}` (sink {meta['sink_size']}, local {meta['local_size']}); device {meta['device']}, "
        f"{meta['dtype']}, commit `{meta['commit'][:10]}`, {meta['date'][:10]}.",
        "",
        "| streaming fraction | prompt tokens | passkey correct, dense | passkey correct, sparse | same answer | first-token KL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for s in (s for s in table if "length" in s):
        lines.append(
            f"| {s['streaming_fraction']} | {s['length']} | {s['dense_correct']}/{s['cells']} | "
            f"{s['sparse_correct']}/{s['cells']} | {s['same_answer']}/{s['cells']} | {s['mean_first_token_kl']:.4f} |"
        )
    lines += [
        "",
        "| streaming fraction | text tokens | next-token top-1 agreement | mean KL(dense \\|\\| sparse), nats |",
        "| --- | --- | --- | --- |",
    ]
    for s in (s for s in table if "text_tokens" in s):
        lines.append(f"| {s['streaming_fraction']} | {s['text_tokens']} | {s['top1_agreement']:.3f} | {s['mean_kl']:.4f} |")
    lines += ["", "![fidelity](benchmarks/results/default_model_fidelity.png)"]
    return "\n".join(lines)


def prefill_table() -> str:
    data = json.loads((RESULTS / "prefill.json").read_text())
    rows, meta = data["rows"], data["meta"]
    dense = {r["L"]: r["ms"] for r in rows if r["case"] == "dense"}
    lines = [
        f"{meta['device']}, {meta['dtype']}, 32 query / 8 KV heads, head_dim 128, batch 1, causal; "
        f"torch {meta['packages']['torch']}, triton {meta['packages']['triton']}; commit `{meta['commit'][:10]}`. "
        "Medians of `triton.testing.do_bench`; density = computed share of the causal matrix.",
        "",
        "| L | case | density | ours, ms | SDPA dense, ms | FlexAttention, ms | ours / SDPA | ours / (density x our dense) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        flex = f"{r['flex_ms']:.2f}" if r.get("flex_ms") else "n/a"
        lines.append(
            f"| {r['L'] // 1024}K | {r['case']} | {r['density']:.3f} | {r['ms']:.2f} | {r['sdpa_ms']:.2f} | {flex} | "
            f"{r['ms'] / r['sdpa_ms']:.2f} | {r['ms'] / (r['density'] * dense[r['L']]):.2f} |"
        )
    lines += ["", "![prefill](benchmarks/results/prefill.png)"]
    return "\n".join(lines)


TABLES = {"fidelity": fidelity_table, "prefill": prefill_table}


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md has no <!-- table:{name} --> ... <!-- /table:{name} --> section")
        text = pattern.sub(lambda m: m.group(1) + make() + "\n" + m.group(2), text)
    readme.write_text(text)
    print("README.md tables updated:", ", ".join(TABLES))


if __name__ == "__main__":
    main()

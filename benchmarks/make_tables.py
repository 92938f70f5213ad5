"""Write the result tables of README.md and docs/*.md from benchmarks/results/*.json (between <!-- table:NAME -->
markers).

    python benchmarks/make_tables.py            # rewrite them
    python benchmarks/make_tables.py --check    # fail where a committed table is not what the results make (CI)
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # benchmarks.fidelity: the summaries two tables share with their scripts
from benchmarks.common import short_device  # noqa: E402


def fidelity_table() -> str:
    from benchmarks.fidelity.default_model_fidelity import summary

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
    lines += ["", "![prefill](benchmarks/results/prefill.png)", ""]
    chunked = json.loads((RESULTS / "chunked_prefill_gpu.json").read_text())
    for r in chunked["rows"]:
        if r["test"] == "chunked_equals_one_shot":
            lines.append(f"Chunked prefill through `generate(prefill_chunk_size={r['chunk']})` on a 2-layer model of the "
                         f"8B shape at {r['L']} tokens: same tokens as one-shot prefill: {r['tokens_equal']}, "
                         f"largest first-step logit difference {r['max_first_logit_diff']:.3g} (logits up to "
                         f"{r['logit_scale']:.3g}, bf16).")
    lines += ["", "| 128K prompt, Llama-3-8B shape, chunks of 8K | streaming fraction | prefill + 4 tokens, s | "
              "peak GPU memory, GiB | of which weights | KV cache, GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in chunked["rows"]:
        if r["test"] == "8b_chunked_prefill":
            lines.append(f"| {r['device']} ({r['gpu_gib']:.0f} GiB) | {r['streaming_fraction']} | {r['seconds']:.1f} | "
                         f"{r['peak_gib']:.1f} | {r['weights_gib']:.1f} | {r['cache_gib']:.1f} |")
    return "\n".join(lines)


def decode_table() -> str:
    data = json.loads((RESULTS / "decode.json").read_text())
    rows, meta = data["rows"], data["meta"]
    settings = meta["settings"]
    lines = [
        f"{meta['device']}, {meta['dtype']}, Llama-3-8B shape, batch 1; ours: streaming fraction "
        f"{settings['streaming_fraction']}, sink {settings['sink_size']}, decode window {settings['decode_local_size']}, "
        f"budget {settings['token_budget']}, reuse {settings['reuse_interval']}; torch {meta['packages']['torch']}, "
        f"transformers {meta['packages']['transformers']}; commit `{meta['commit'][:10]}`.",
        "",
        "| L | ours, step from Python, ms | SDPA, ms | SDPA / ours | ours, GPU only, ms | SDPA, GPU only, ms | "
        "SDPA / ours, GPU only | one selection, ms (GPU only) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in rows if r["kind"] == "layer_step"):
        lines.append(f"| {r['L'] // 1024}K | {r['step_ms']:.3f} | {r['sdpa_step_ms']:.3f} | {r['speedup']:.2f} | "
                     f"{r['kernel_ms']:.4f} | {r['sdpa_kernel_ms']:.4f} | {r['kernel_speedup']:.1f} | "
                     f"{r['selection_ms']:.3f} ({r['selection_kernel_ms']:.4f}) |")
    lines += [
        "",
        "| L | stock (sdpa + DynamicCache), tokens/s | ours, all heads dense, tokens/s | ours, sparse, tokens/s | "
        "sparse / stock | sparse / own dense | KV bytes, sparse / stock |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    fmt = lambda values: " / ".join(f"{v:.1f}" for v in values)  # noqa: E731
    for r in (r for r in rows if r["kind"] == "generate"):
        lines.append(f"| {r['L'] // 1024}K | {fmt(r['stock_tokens_per_s_all'])} | {fmt(r['own_dense_tokens_per_s_all'])} | "
                     f"{fmt(r['tokens_per_s_all'])} | {r['tokens_per_s'] / r['stock_tokens_per_s']:.2f} | "
                     f"{r['tokens_per_s'] / r['own_dense_tokens_per_s']:.2f} | {r['kv_bytes'] / r['stock_kv_bytes']:.3f} |")
    lines += ["", "![decode](benchmarks/results/decode.png)"]
    return "\n".join(lines)


def decode_fidelity_table() -> str:
    data = json.loads((RESULTS / "decode_fidelity.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lines = [
        f"Device {meta['device']}, {meta['dtype']}, reuse {meta['reuse_interval']}, pages of {meta['page_size']}; "
        f"commit `{meta['commit'][:10]}`, {meta['date'][:10]}.",
        "",
        "| heads | token budget | prompt tokens | passkey correct, dense | passkey correct, sparse | same answer |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    groups = dict.fromkeys((r["heads"], r["token_budget"], r["length"]) for r in rows)
    for heads, budget, length in groups:
        cell = [r for r in rows if (r["heads"], r["token_budget"], r["length"]) == (heads, budget, length)]
        lines.append(f"| {heads} | {budget} | {length} | {sum(r['dense_correct'] for r in cell)}/{len(cell)} | "
                     f"{sum(r['sparse_correct'] for r in cell)}/{len(cell)} | "
                     f"{sum(r['dense_answer'] == r['sparse_answer'] for r in cell)}/{len(cell)} |")
    return "\n".join(lines)


def sample_attention_table() -> str:
    data = json.loads((RESULTS / "sample_attention.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lines = [
        f"{meta['device']}, {meta['dtype']}, Llama-3-8B attention shape, synthetic inputs ({meta['inputs']}); "
        f"rw {meta['rw']}, r_row {meta['r_row']}; commit `{meta['commit'][:10]}`. `ms` includes the selection.",
        "",
        "| L | case | density | ms | selection, ms | SDPA, ms | our dense, ms | ms / SDPA | ms / (density x our dense) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in (r for r in rows if r["case"] != "crossover"):
        lines.append(f"| {r['L'] // 1024}K | {r['case']} | {r['density']:.3f} | {r['ms']:.1f} | {r['selection_ms']:.1f} | "
                     f"{r['sdpa_ms']:.1f} | {r['dense_ms']:.1f} | {r['ms'] / r['sdpa_ms']:.2f} | "
                     f"{r['ms'] / (r['density'] * r['dense_ms']):.2f} |")
    cross = [r for r in rows if r["case"] == "crossover"]
    lines += ["", "Crossover (alpha 0.95, selection included, against our dense kernel): " + ", ".join(
        f"{r['L'] // 1024}K {r['ms']:.1f} vs {r['dense_ms']:.1f} ms" for r in cross)
        + f"; SampleAttention faster from: {meta['crossover_length'] or 'none of these lengths'}.",
        "", "![sample attention](benchmarks/results/sample_attention.png)"]
    return "\n".join(lines)


def sample_attention_fidelity_table() -> str:
    data = json.loads((RESULTS / "sample_attention_fidelity.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lines = [
        f"Every head dense, SampleAttention from the first token (dense_below 0), rw {meta['rw']}, r_row {meta['r_row']}, "
        f"{meta['criterion']} criterion; device {meta['device']}, commit `{meta['commit'][:10]}`.",
        "",
        "| alpha | prompt tokens | passkey correct, dense | passkey correct, sparse | same answer | first-token KL |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    passkey = [r for r in rows if r["kind"] == "passkey"]
    for alpha, length in dict.fromkeys((r["alpha"], r["length"]) for r in passkey):
        cell = [r for r in passkey if (r["alpha"], r["length"]) == (alpha, length)]
        lines.append(f"| {alpha} | {length} | {sum(r['dense_correct'] for r in cell)}/{len(cell)} | "
                     f"{sum(r['sparse_correct'] for r in cell)}/{len(cell)} | "
                     f"{sum(r['dense_answer'] == r['sparse_answer'] for r in cell)}/{len(cell)} | "
                     f"{sum(r['kl'] for r in cell) / len(cell):.4f} |")
    lines += ["", "| alpha | text tokens | top-1 agreement | mean KL, nats | density chosen (mean over layers, min-max) |",
              "| --- | --- | --- | --- | --- |"]
    for r in (r for r in rows if r["kind"] == "agreement"):
        lines.append(f"| {r['alpha']} | {r['tokens']} | {r['top1_agreement']:.3f} | {r['mean_kl']:.4f} | "
                     f"{r['density_mean']:.3f} ({r['density_min']:.3f}-{r['density_max']:.3f}) |")
    return "\n".join(lines)


def eval_table() -> str:
    """The evaluation harness on the default model (benchmarks/results/eval_{needle,passkey,ppl}.json)."""
    grids = {task: json.loads((RESULTS / f"eval_{task}.json").read_text()) for task in ("needle", "passkey")}
    ppl = json.loads((RESULTS / "eval_ppl.json").read_text())
    meta = grids["passkey"]["meta"]
    settings = meta["settings"]
    lines = [
        f"Default model, shipped profile ({meta['streaming_kv_heads']} KV heads stream; sink {settings['sink_size']}, "
        f"local {settings['local_size']}, token budget {settings['token_budget']}; profile method: "
        f"{meta['profile_method']}), {meta['device']}, {meta['dtype'].removeprefix('torch.')}, torch "
        f"{meta['packages']['torch']}, transformers {meta['packages']['transformers']}, commit `{meta['commit'][:10]}`, "
        f"{meta['date'][:10]}:",
        "",
        "| task | prompt tokens | depths | correct, dense | correct, sparse | same answer text | mean first-token KL (max) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, data in grids.items():
        rows = data["rows"]
        for length in sorted({r["length"] for r in rows}):
            mine = [r for r in rows if r["length"] == length]
            kls = [r["kl"] for r in mine]
            lines.append(
                f"| {task} | {mine[0]['prompt_tokens']} | {', '.join(str(r['depth']) for r in mine)} | "
                f"{sum(r['dense_correct'] for r in mine)}/{len(mine)} | {sum(r['sparse_correct'] for r in mine)}/{len(mine)} | "
                f"{sum(r['dense_answer'] == r['sparse_answer'] for r in mine)}/{len(mine)} | "
                f"{sum(kls) / len(kls):.4f} ({max(kls):.4f}) |")
    lines += ["", "| text tokens | perplexity, dense | perplexity, sparse | next-token top-1 agreement | "
                  "mean KL(dense \\|\\| sparse), nats |", "| --- | --- | --- | --- | --- |"]
    for r in ppl["rows"]:
        lines.append(f"| {r['tokens']} | {r['dense_ppl']:.2f} | {r['sparse_ppl']:.2f} ({100 * (r['ppl_ratio'] - 1):+.1f}%) | "
                     f"{r['top1_agreement']:.3f} | {r['mean_kl']:.4f} |")
    lines += ["", "![needle](benchmarks/results/eval_needle.png)", "![passkey](benchmarks/results/eval_passkey.png)",
              "![ppl](benchmarks/results/eval_ppl.png)"]
    return "\n".join(lines)


def profile_comparison_table() -> str:
    from benchmarks.fidelity.profile_comparison import summarize

    data = json.loads((RESULTS / "profile_comparison.json").read_text())
    rows, meta = data["rows"], data["meta"]
    labels = list(meta["profiles"])
    fractions = sorted({r["fraction"] for r in rows})
    summary = summarize(rows, labels, fractions)
    prompts = len({(r["length"], r["depth"]) for r in rows})
    lengths = sorted({r["prompt_tokens"] for r in rows})
    lines = [f"{meta['task']}; {prompts} prompts of {lengths[0]}-{lengths[-1]} tokens; {meta['device']}, {meta['dtype']}, "
             f"commit `{meta['commit'][:10]}`, {meta['date'][:10]}. Each cell: answers correct, answers as right or "
             "wrong as dense, mean first-answer-token KL(dense || sparse).", "",
             "| " + summary[0].replace(" | ", " | ") + " |", "| --- " * (len(fractions) + 1) + "|"]
    lines += ["| " + line + " |" for line in summary[1:-1]]
    lines += ["", f"Dense: {summary[-1].split(': ')[1]}. Profiles:", ""]
    for label, info in meta["profiles"].items():
        lines.append(f"- `{label}`: {info['method']} (`{info['command']}`)")
    lines += ["", "![profile comparison](benchmarks/results/profile_comparison.png)"]
    return "\n".join(lines)


def multi_gpu_table() -> str:
    data = json.loads((RESULTS / "multi_gpu.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lines = [f"{meta['model']}, {meta['device']}, commit `{meta['commit'][:10]}`, {meta['date'][:10]} "
             "(`meta.runs` holds each run's own). Each against the same model patched on one GPU:", "",
             "| mode | dtype | max logit diff, patched (stock) | greedy tokens identical, short / 4K prompt (stock) | "
             "decode tokens/s patched, 1 GPU -> 2 GPUs (stock) |", "| --- | --- | --- | --- | --- |"]
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    for r in rows:
        dtype = r["dtype"] + (", FP8 pages" if r.get("kv_dtype") == "fp8" else "")
        if r.get("error"):
            lines.append(f"| {r['mode']} | {dtype} | error: {r['error']} | | |")
            continue
        lines.append(
            f"| {r['mode']} | {dtype} | {r['patched_max_logit_diff']:.3g} ({r['stock_max_logit_diff']:.3g}) | "
            f"{yes(r['patched_short_tokens_identical'])} / {yes(r['patched_long_tokens_identical'])} "
            f"({yes(r['stock_short_tokens_identical'])} / {yes(r.get('stock_long_tokens_identical'))}) | "
            f"{r['patched_decode_tokens_per_s_one_gpu']:.0f} -> {r['patched_decode_tokens_per_s_two_gpus']:.0f} "
            f"({r['stock_decode_tokens_per_s_one_gpu']:.0f} -> {r['stock_decode_tokens_per_s_two_gpus']:.0f}) |")
    return "\n".join(lines)


def _row_device(row: dict, runs: dict, meta: dict) -> str:
    """The card a row ran on: its own field, else its run's, else the file's."""
    return row.get("device") or runs.get(row.get("run"), {}).get("device") or meta["device"]


def e2e_table(name: str = "e2e.json") -> str:
    data = json.loads((RESULTS / name).read_text())
    rows, meta = data["rows"], data["meta"]
    runs = meta["runs"]
    bases = {}  # (config, L, batch, run) -> row, and (config, L, batch) -> the last row of any run
    for r in rows:
        if r["config"] in ("stock", "stock_static_compile"):
            card = _row_device(r, runs, meta)
            bases[(r["config"], r["L"], r["batch"], r.get("run"))] = r
            bases[(r["config"], r["L"], r["batch"], card)] = r
    other_run = False
    first = next(iter(runs.values()))
    run_settings = first.get("settings") or meta.get("settings", {})
    settings = run_settings.get("patched_streaming50") or run_settings.get("patched_default") or {}
    cards = [_row_device(r, runs, meta) for r in rows]
    devices = sorted(dict.fromkeys(cards), key=lambda d: -cards.count(d))  # the card of most rows first
    if len(devices) > 1:  # a second card's rows carry its name; ratios stay within one card
        where = f"{devices[0]} (rows marked with another card: " + ", ".join(devices[1:]) + ")"
    else:
        where = devices[0]
    packages = {(v["packages"]["torch"], v["packages"]["transformers"], v["packages"]["triton"]) for v in runs.values()}
    versions = "; ".join(f"torch {t}, transformers {tf}, triton {tr}" for t, tf, tr in sorted(packages))
    lines = [
        f"{where}, {meta['dtype']}, {meta['model']}, {meta['layers']} layers; {versions}; "
        f"{len(runs)} run{'s' if len(runs) != 1 else ''} ({', '.join(sorted({v['commit'][:10] for v in runs.values()}))}). "
        f"Patched settings: sink {settings.get('sink_size')}, local {settings.get('local_size')}, decode window "
        f"{settings.get('decode_local_size')}, token budget {settings.get('token_budget')}, reuse "
        f"{settings.get('reuse_interval')}. TTFT: median of the calls after a cold one; decode: "
        f"{first['decode_formula']}, N = {first['new_tokens']}, lengths seen for the first time (stock: repeated "
        "lengths in brackets, where cuDNN reuses its plans); tokens/s: batch x 1000 / decode ms; memory: peak "
        "allocated, and allocated after return minus before the call. Each x column is this row's figure divided "
        "by stock's (sdpa + DynamicCache) or stock compiled's (static cache + its automatic decode compile): below "
        "1 is faster or smaller. Patched rows of runs before decode steps were replayed from a CUDA graph by "
        "default say *eager decode*; `compile` of a patched row is the capture of its decode graph.",
        "",
        "| prompt | batch | configuration | TTFT, s | x stock | first call, s | decode, ms/token | tokens/s | x stock "
        "| x stock compiled | peak, GiB | x stock | after return |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = f"{r['L'] // 1024}K" if r["L"] < 2**20 else f"{r['L'] // 2**20}M"
        label = r["config"]
        if label.startswith("patched") and "decode_graphs" not in r.get("settings", {"decode_graphs": None}):
            label += " (eager decode)"
        card = _row_device(r, runs, meta)
        if card != devices[0]:
            label += f", **{short_device(card)}**"
        if r["status"] != "ok":
            why = r.get("reason", r.get("error", ""))
            lines.append(f"| {size} | {r['batch']} | {label} | {r['status']} | | | | | | | | | {why} |")
            continue

        def base(config):
            """The baseline row of this shape: same run, else another run (marked), else None."""
            nonlocal other_run
            found = bases.get((config, r["L"], r["batch"], r.get("run")))
            if found is None and (config, r["L"], r["batch"], card) in bases:
                other_run = True
                return bases[(config, r["L"], r["batch"], card)], "†"
            return found, ""

        def ratio(key, config="stock"):
            row, mark = base(config)
            if row is None or row is r:
                return ""
            if row["status"] != "ok":
                return row["status"]
            return f"{r[key] / row[key]:.2f}{mark}" if r.get(key) and row.get(key) else ""

        decode = r.get("decode_ms_per_token")
        decode_text = f"{decode:.1f}" if decode else "n/a"
        if r.get("decode_ms_per_token_repeated"):
            decode_text += f" ({r['decode_ms_per_token_repeated']:.1f})"
        if r.get("compile_s"):
            decode_text += f", compile {r['compile_s']:.2g} s"
        rate = f"{1000 * r['batch'] / decode:.0f}" if decode else ""
        back = r["after_return_gib"] - r["before_gib"]
        cold = f"{r['ttft_cold_s']:.2f}" if r.get("ttft_cold_s") else ""
        lines.append(
            f"| {size} | {r['batch']} | {label} | {r['ttft_s']:.2f} | {ratio('ttft_s')} | {cold} | {decode_text} | {rate} | "
            f"{ratio('decode_ms_per_token')} | {ratio('decode_ms_per_token', 'stock_static_compile')} | "
            f"{r['peak_gib']:.1f} | {ratio('peak_gib')} | {back * 1024:+.0f} MiB |")
    if other_run:
        lines += ["", "† against the baseline row of another run (ratios are otherwise taken within one run)."]
    lines += ["", f"![generate() against stock](benchmarks/results/{Path(name).stem}.png)"]
    return "\n".join(lines)


def decode_sequence_table() -> str:
    """Issue 35's sequence: one process, configurations one after another, decode as (t65 - t1) / 64."""
    data = json.loads((RESULTS / "decode_sequence.json").read_text())
    rows, meta = data["rows"], data["meta"]
    fresh = json.loads((RESULTS / "decode_sequence_fresh_process.json").read_text())["rows"]
    lines = [
        f"{meta['device']}, bfloat16, Llama-3-8B shape, random weights, {meta['layers']} layers; torch "
        f"{meta['packages']['torch']}, transformers {meta['packages']['transformers']}, triton "
        f"{meta['packages']['triton']}; commit `{meta['commit'][:10]}`; one process, configurations in this order, "
        "patched and unpatched between them (`python benchmarks/e2e/decode_sequence.py`). Decode: (t65 - t1) / 64 of a "
        "65-token `generate()`, the first such call of the configuration (first-use kernel compiles and the graph's "
        "warm-up and capture included), then a second call; steady: median step from the 10th on.",
        "",
        "| prompt | configuration | TTFT, s | first call's TTFT, s | decode, ms/token | x stock | second call | "
        "steady | first step, ms | graph steps |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    stock = {r["L"]: r for r in rows if r["config"] == "stock"}
    for r in rows:
        ratio = r["decode_ms_per_token"] / stock[r["L"]]["decode_ms_per_token"] if r["L"] in stock else None
        graph = r.get("last_call") or {}
        steps = f"{graph['graph_steps']}/{graph['decode_steps']}" if graph else "stock"
        lines.append(
            f"| {r['L'] // 1024}K | {r['config']} | {r['ttft_s']:.2f} | {r['ttft_first_s']:.2f} | "
            f"{r['decode_ms_per_token']:.1f} | {ratio:.2f} | {r['decode_ms_per_token_again']:.1f} | "
            f"{r['steady_ms_per_token']:.1f} | {r['first_steps_ms'][0]:.0f} | {steps} |")
    for r in fresh:
        lines.append(
            f"| {r['L'] // 1024}K | {r['config']}, a second process (Triton's disk cache warm) | {r['ttft_s']:.2f} | "
            f"{r['ttft_first_s']:.2f} | {r['decode_ms_per_token']:.1f} | | {r['decode_ms_per_token_again']:.1f} | "
            f"{r['steady_ms_per_token']:.1f} | {r['first_steps_ms'][0]:.0f} | "
            f"{r['last_call']['graph_steps']}/{r['last_call']['decode_steps']} |")
    return "\n".join(lines)


def page_oracle_table() -> str:
    """Quest's bound against the oracle (page_selection_oracle.json) and the estimator variants measured beside
    it (page_selection_quest_lp8.json, page_selection_quest_per_head.json), when present."""
    data = json.loads((RESULTS / "page_selection_oracle.json").read_text())
    rows, meta = data["rows"], data["meta"]
    variants = {}
    for name, kind, label in (("page_selection_quest_lp8", "quest", "Quest, logical pages of 8"),
                              ("page_selection_quest_per_head", "quest_per_head", "Quest per query head"),
                              ("page_selection_quest_recent", "quest_recent", "Quest + newest pages (1/4)")):
        path = RESULTS / f"{name}.json"
        if path.exists():
            variants[label] = ({(r["L"], r["budget"]): r for r in json.loads(path.read_text())["rows"]}, kind)
    head = ["prompt tokens", "budget", "cells (dense right)", "Quest: same answers", "oracle: same answers",
            "Quest: mass recall", "oracle: mass recall"]
    for label in variants:
        head += [f"{label}: same answers", f"{label}: mass recall"]
    lines = [
        f"Device {meta['device']}, {meta['dtype']}, every head dense (page selection alone), pages of "
        f"{meta['page_size']} with logical pages of {meta['logical_page_size']}, {meta['new_tokens']} new tokens; "
        f"held-out text (reporting half); commit `{meta['commit'][:10]}`, {meta['date'][:10]}.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    for r in rows:
        cells = [f"{r['L']}", f"{r['budget']} ({r['budget'] / r['L']:.2f})", f"{r['cells']} ({r['dense_correct']})",
                 f"{r['quest_same_answers']}/{r['cells']}", f"{r['oracle_same_answers']}/{r['cells']}",
                 f"{r['quest_mass_recall']:.3f}", f"{r['oracle_mass_recall']:.3f}"]
        for by_key, kind in variants.values():
            v = by_key.get((r["L"], r["budget"]))
            cells += [f"{v[kind + '_same_answers']}/{v['cells']}", f"{v[kind + '_mass_recall']:.3f}"] if v else ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "![page selection against the oracle](benchmarks/results/page_selection_oracle.png)"]
    return "\n".join(lines)


def heldout_table() -> str:
    """The shipped profile at its defaults on the text it was fitted on (the story's evaluation half) and on
    text neither the fit nor the choice of its fraction saw (heldout_fidelity.json), side by side."""
    data = json.loads((RESULTS / "heldout_fidelity.json").read_text())
    rows, meta = data["rows"], data["meta"]
    roles = {"story": "fit: the genre the profile was fitted on (the story's evaluation half)",
             "reporting": "held out: the reporting half of CPython's reference manual",
             "alice": "held out: Alice's Adventures in Wonderland (public-domain fiction)",
             "lcet10": "held out: the LC workshop proceedings of 1992 (public-domain discussion)"}
    selections = [s for s in SELECTIONS if any(_selection(r) == s for r in rows)]
    fp8 = any(r.get("kv_dtype") == "fp8" and r["setting"] == "default budget" for r in rows)
    lines = [
        f"Default model, profile `{Path(meta['profile']).name}` at its default streaming fraction "
        f"{meta['streaming_fraction']}; {meta['cells_per_text']} passkey and needle prompts per text (1K, 2K and "
        f"4K tokens, 5 depths, 2 offsets); device {meta['device']}, {meta['dtype']}, "
        + (", ".join(f"{name}: commit `{run['commit'][:10]}`" for name, run in meta["runs"].items())
           if meta.get("runs") else f"commit `{meta['commit'][:10]}`, {meta['date'][:10]}")
        + ". Lost: prompts dense attention answers right and the patched model does not.",
        "",
        "| text | dense right | lost, default budget | lost at 1K / 2K / 4K | first-token KL | next-token KL, 4096 "
        "tokens | " + ("lost, default budget, FP8 pages | " if fp8 else "")
        + " | ".join(f"budget 1/4, {SELECTIONS[s]}: dense-right kept" for s in selections) + " |",
        "| --- | --- | --- | --- | --- | --- | " + ("--- | " if fp8 else "") + " | ".join("---" for _ in selections) + " |",
    ]
    for text in dict.fromkeys(r["text"] for r in rows):
        main = next(r for r in rows if r["text"] == text and r["setting"] == "default budget"
                    and r.get("kv_dtype", "auto") == "auto")
        fp8_row = next((r for r in rows if r["text"] == text and r["setting"] == "default budget"
                        and r.get("kv_dtype") == "fp8"), None)
        fp8_cell = ("" if fp8_row is None else
                    f"{fp8_row['lost']} (lost where model-dtype pages keep: "
                    f"{sum(f and not a for f, a in zip(fp8_row['cell_lost'], main['cell_lost']))}) | ") if fp8 else ""
        per = len(main["cell_lost"]) // len(main["lengths"])
        by_length = " / ".join(str(sum(main["cell_lost"][i * per:(i + 1) * per])) for i in range(len(main["lengths"])))
        kept = [_quarter_kept([r for r in rows if r["text"] == text and _selection(r) == s])
                for s in selections]
        lines.append(f"| {roles.get(text, text)} | {main['dense_correct']}/{main['cells']} | {main['lost']} | "
                     f"{by_length} | {main['first_token_kl']:.4f} | {main['text_kl']:.4f} | " + fp8_cell
                     + " | ".join(kept) + " |")
    return "\n".join(lines)


def late_keys_table() -> str:
    """Late passkeys (depths 0.7-0.95, 2K and 4K, five key seeds) on held-out text of three genres, per setting
    (late_keys.json)."""
    data = json.loads((RESULTS / "late_keys.json").read_text())
    rows, meta = data["rows"], data["meta"]
    names = {"reporting": "CPython's reference manual (reporting half)", "alice": "Alice in Wonderland (fiction)",
             "lcet10": "LC workshop proceedings (discussion)"}
    runs = ", ".join(f"`{run['commit'][:10]}`" for run in meta.get("runs", {}).values()) or f"`{meta['commit'][:10]}`"
    first = rows[0]
    settings = ", ".join(f"{k} {v}" for k, v in meta["profile_settings"].items())
    lines = [
        f"Default model, profile `{Path(meta['profile']).name}` ({settings}); passkeys at depths "
        f"{', '.join(map(str, first['depths']))} of each "
        f"length, {len(first['seeds'])} key seeds; device {meta['device']}, {meta['dtype']}, commits {runs} "
        "(`python benchmarks/fidelity/late_keys.py`). Lost: prompts dense attention answers right and the patched "
        "model does not; key distance: tokens from the key's end to the prompt's end.",
        "",
        "| text | setting | length | dense right | lost | lost cells (depth, seed: key distance) | first-token KL | "
        "next-token KL, 4096 tokens |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = {name: i for i, name in enumerate(names)}
    for r in sorted(rows, key=lambda r: (order.get(r["text"], 9), r["variant"] != "shipped", r["variant"], r["L"])):
        lost = "; ".join(f"{c['depth']}, {c['seed']}: {c['key_distance']}" for c in r["lost_cells"]) or "none"
        profile, _, variant = r["variant"].rpartition(": ")
        setting = "profile defaults" if variant == "shipped" else ", ".join(f"{k} {v}" for k, v in r["settings"].items())
        setting = f"`{profile}` profile: {setting}" if profile else f"shipped profile: {setting}"
        lines.append(f"| {names.get(r['text'], r['text'])} | {setting} | {r['L'] // 1024}K | {r['dense_correct']}/"
                     f"{r['cells']} | {r['lost']} | {lost} | {r['first_token_kl']:.4f} | {r['text_kl']:.4f} |")
    cells = {k: v for k, v in meta.get("head_mass", {}).items() if "top" in v}
    if cells:
        lines += ["", "Which heads read the key (`--heads`: dense attention's share of the prompt's last query on the "
                  "key's tokens, per KV head, mean over its query heads; *s*: labelled streaming by the shipped profile "
                  "at its fraction):", "",
                  "| cell | key distance | dense right | heads reading the key most (layer.head: share) | share of all "
                  "heads' reading on streaming heads | rank of the first streaming head |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, cell in cells.items():
            top = ", ".join(f"{layer}.{head}{' *s*' if streams else ''}: {share:.2f}"
                            for layer, head, share, streams in cell["top"][:4])
            lines.append(f"| {name} | {cell['key_distance']} | {'yes' if cell['dense_correct'] else 'no'} | {top} | "
                         f"{cell['streaming_share']:.1%} | {cell['first_streaming_rank'] + 1} |")
    return "\n".join(lines)


SELECTIONS = {"bound": "Quest's bound alone", "two-stage": "two stages (default)", "oracle": "oracle pages",
              "two-stage, pages of 16": "two stages, pages of 16", "two-stage, fp8": "two stages, FP8 pages"}


def _selection(row: dict) -> str:
    """A heldout row's column: its page selection, and its page storage where that is not the model's dtype."""
    storage = row.get("kv_dtype", "auto")
    return row.get("selection", "bound") + ("" if storage == "auto" else f", {storage}")


def _quarter_kept(rows: list[dict]) -> str:
    """Dense-right cells kept at a budget of 1/4 (per length, and in all), from one text's rows of one selection."""
    parts = [r for r in rows if "L" in r and r["setting"].startswith("budget ") and r["setting"] != "budget 1/4"]
    if not parts:
        return "not run"
    right = sum(r["dense_correct"] for r in parts)
    kept = right - sum(r["lost"] for r in parts)
    per_length = ", ".join(f"{r['L'] // 1024}K {r['dense_correct'] - r['lost']}/{r['dense_correct']}"
                           for r in sorted(parts, key=lambda r: r["L"]))
    return f"{kept}/{right} ({kept / right:.0%}: {per_length})" if right else per_length


def window_layers_table() -> str:
    data = json.loads((RESULTS / "window_layers.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lines = [f"{meta['device']}, {meta['dtype']}, commit `{meta['commit'][:10]}`, {meta['date'][:10]}; one prefill "
             f"attention call of one layer, median of {meta['repeats']} "
             "(`python benchmarks/kernels/bench_window_layers.py`):",
             "", "| layer | prompt | stock | stock, ms | sparse_attn_hf, ms | speed-up | SDPA without the term, ms | "
             "max abs diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "ours_ms" not in r:
            lines.append(f"| {r['case']} | {r['L'] // 1024}K | {r.get('status', '')} | | | | | |")
            continue
        stock = f"{r['stock_ms']:.2f}" if isinstance(r["stock_ms"], float) else r["stock_ms"]
        speed = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        sdpa = f"{r['sdpa_ms']:.2f}" if "sdpa_ms" in r else ""
        error = f"{r['max_abs_error']:.3g}" if "max_abs_error" in r else ""
        lines.append(f"| {r['case']} | {r['L'] // 1024}K | {r['stock']} | {stock} | {r['ours_ms']:.2f} | {speed} | "
                     f"{sdpa} | {error} |")
    return "\n".join(lines)


def decode_selection_table() -> str:
    """Page selection's cost per layer from a CUDA graph (decode_selection.json), by the bound alone and in two
    stages, on a selecting and on a reusing step, and what it adds to a token of 32 layers at reuse 4."""
    data = json.loads((RESULTS / "decode_selection.json").read_text())
    rows, meta = data["rows"], data["meta"]
    reuse = meta["settings"]["reuse_interval"]
    lines = [f"{meta['device']}, {meta['dtype']}, Llama-3-8B shape, batch 1, 4 dense KV heads, budget "
             f"{meta['settings']['token_budget']}; commit `{meta['commit'][:10]}`, {meta['date'][:10]} "
             "(`python benchmarks/kernels/bench_decode.py --lengths 0 --layer-lengths 32768 131072`). Microseconds per "
             f"layer, GPU only (replayed from a CUDA graph); per token: 32 layers, one selecting step in {reuse}.", "",
             "| L | bound: selecting step, us | bound: reusing step, us | two stages: selecting step, us | two stages: "
             "reusing step, us | per token, bound, ms | per token, two stages, ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        per_token = {n: 32 * (r[f"shortlist{n}_select_kernel_ms"] + (reuse - 1) * r[f"shortlist{n}_reuse_kernel_ms"])
                     / reuse for n in (1, 4)}
        lines.append(f"| {r['L'] // 1024}K | " + " | ".join(
            f"{1000 * r[f'shortlist{n}_{kind}_kernel_ms']:.1f}" for n in (1, 4) for kind in ("select", "reuse"))
            + f" | {per_token[1]:.2f} | {per_token[4]:.2f} |")
    return "\n".join(lines)


def sample_attention_heldout_table() -> str:
    """SampleAttention on held-out text against the same model with it off (sample_attention_heldout.json)."""
    data = json.loads((RESULTS / "sample_attention_heldout.json").read_text())
    rows, meta = data["rows"], data["meta"]
    lengths = sorted({r["L"] for r in meta["records"]})
    lines = [f"Default model, the shipped profile's streaming heads, SampleAttention from {meta['dense_below']} tokens, "
             f"against the same model with it off; {meta['text']}; prompts of {', '.join(map(str, lengths))} tokens; "
             f"device {meta['device']}, commit `{meta['commit'][:10]}` ({_command(meta['command'])}).", "",
             "| alpha | prompts | right with it off | of those kept | same answers | first-token KL, mean | "
             "next-token KL, mean over the text |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['alpha']} | {r['cells']} | {r['reference_correct']} | {r['kept']} ({r['kept_share']:.0%}) | "
                     f"{r['same_answers']} | {r['first_token_kl_mean']:.4f} | {r['text_kl_mean']:.3f} "
                     f"({r['text_tokens']} tokens) |")
    return "\n".join(lines)


def _command(recorded: str) -> str:
    """A result's recorded command, in backticks, and where its script lives now if it has moved since (the record
    stays as it ran: benchmarks/ was regrouped into e2e/, kernels/, fidelity/, NOTES.md maps the paths)."""
    text = f"`python {recorded}`"
    script = recorded.split()[0] if recorded else ""
    root = Path(__file__).resolve().parent.parent
    if script.startswith("benchmarks/") and not (root / script).exists():
        moved = sorted((root / "benchmarks").glob(f"*/{Path(script).name}"))
        if moved:
            text += f", now `{moved[0].relative_to(root).as_posix()}`"
    return text


def _run_line(meta: dict, what: str) -> str:
    packages = meta.get("packages", {})
    return (f"{meta['device']}, {what}; torch {packages.get('torch')}, transformers {packages.get('transformers')}, "
            f"triton {packages.get('triton')}; commit `{str(meta['commit'])[:10]}` ({_command(meta['command'])}).")


def first_call_table() -> str:
    """A fresh process's first generate() against a warm one (first_call.json), a process per variant."""
    data = json.loads((RESULTS / "first_call.json").read_text())
    meta = data["meta"]
    lines = [_run_line(meta, f"bfloat16, Llama-3-8B shape, random weights, {meta['layers']} layers, one process "
                             "per row; first call: TTFT of the process's first `generate()`, warm: its third"), "",
             "| variant | Triton cache | `patch_model`, s | first call TTFT, s | warm TTFT, s | first / warm | "
             "whole call: first / warm | first call's decode excess, s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        if r.get("status") != "ok":
            lines.append(f"| {r['variant']} | {r['status']} | | | | |")
            continue
        patch = f"{r['patch_s']:.1f}" if r.get("patch_s") is not None else ""
        excess = (r["call_first_s"] - r["ttft_first_s"]) - (r["call_warm_s"] - r["ttft_warm_s"])
        lines.append(f"| {r['variant']} | {r['triton_cache']} | {patch} | {r['ttft_first_s']:.2f} | "
                     f"{r['ttft_warm_s']:.2f} | {r['first_over_warm']:.2f} | {r['call_first_over_warm']:.2f} | "
                     f"{excess:.2f} |".replace("-0.00", "0.00"))
    lines += ["", "![first call](benchmarks/results/first_call.png)"]
    return "\n".join(lines)


def families_table() -> str:
    """Other families' full-size shapes, stock against patched (e2e_families.json)."""
    data = json.loads((RESULTS / "e2e_families.json").read_text())
    runs = data["meta"]["runs"]
    first = next(iter(runs.values()))
    commands = "; ".join(f"{_command(run['command'])} at `{str(run['commit'])[:10]}`" for run in runs.values())
    lines = [_run_line(first, "bfloat16, random weights at each model's full size, plain `generate()`; stock on "
                              "SDPA (FlexAttention where the family has no SDPA path: GPT-OSS)").split("; commit")[0]
             + f"; runs: {commands}.", "",
             "| model | prompt | configuration | TTFT, s | x stock | decode, ms/token | x stock | graph steps | "
             "peak, GiB | x stock | after return |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    stock = {(r["family"], r["L"]): r for r in data["rows"] if r["config"] == "stock" and r["status"] == "ok"}
    names = {"qwen3-8b": "Qwen3-8B", "gemma3-12b": "Gemma-3-12B (text)", "gpt-oss-20b": "GPT-OSS-20B"}
    for r in data["rows"]:
        name, size = names.get(r["family"], r["family"]), f"{r['L'] // 1024}K"
        if r["status"] != "ok":
            lines.append(f"| {name} | {size} | {r['config']} | {r['status']} | | | | | | | "
                         f"{r.get('reason', r.get('error', ''))[:80]} |")
            continue
        base = stock.get((r["family"], r["L"]))

        def ratio(key):
            return f"{r[key] / base[key]:.2f}" if base is not None and base is not r and r.get(key) and base.get(key) else ""

        graph = r.get("last_call") or {}
        steps = f"{graph['graph_steps']}/{graph['decode_steps']}" if graph else ""
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
        back = (f"{(r['after_return_gib'] - r['before_gib']) * 1024:+.0f} MiB" if r.get("after_return_gib") is not None
                else "n/a")
        lines.append(f"| {name} | {size} | {r['config']} | {r['ttft_s']:.2f} | {ratio('ttft_s')} | "
                     f"{r['decode_ms_per_token']:.1f} | {ratio('decode_ms_per_token')} | {steps} | "
                     f"{peak} | {ratio('peak_gib')} | {back} |")
    lines += ["", "![families](benchmarks/results/e2e_families.png)"]
    return "\n".join(lines)


def first_use_table() -> str:
    """patch_model(model) with no profile on the Llama-3.1-8B shape: shipped by name, calibrated for a fine-tune."""
    data = json.loads((RESULTS / "first_use_gpu.json").read_text())
    meta = data["meta"]
    lines = [_run_line(meta, f"bfloat16, {meta['model']}, {meta['length'] // 1024}K-token prompt"), "",
             "| variant | profile used | `patch_model`, s | of which calibration, s | first TTFT, s | second TTFT, s "
             "| decode, ms/token | graph steps |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        patch = f"{r['patch_s']:.1f}" if r.get("patch_s") is not None else ""
        calibration = f"{r['calibration_s']:.1f}" if r.get("calibration_s") else ""
        steps = f"{r['graph_steps']}/{r['decode_steps']}" if "graph_steps" in r else ""
        lines.append(f"| {r['variant']} | {r.get('profile', 'stock')} | {patch} | {calibration} | "
                     f"{r['ttft_first_s']:.2f} | {r['ttft_s']:.2f} | {r['decode_ms_per_token']:.1f} | {steps} |")
    return "\n".join(lines)


def serving_table() -> str:
    """Transformers' continuous batching, stock against patched (serving.json): throughput, time to first token,
    memory, the planned cache."""
    data = json.loads((RESULTS / "serving.json").read_text())
    runs = data["meta"]["runs"]
    first = next(iter(runs.values()))
    commands = "; ".join(f"{_command(run['command'])} at `{str(run['commit'])[:10]}`" for run in runs.values())
    lines = [_run_line(first, f"bfloat16, {first['model']}, greedy; stock: the manager with `sdpa`, its default")
             .split("; commit")[0] + f"; runs: {commands}.", "",
             "| requests | arrival | configuration | tokens/s | x stock | TTFT mean, s | p95, s | x stock (mean) | "
             "peak, GiB | after stop | cache, tokens | requests that fit | fast-path layer calls | page selections | "
             "same tokens as `generate()` |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in data["rows"]:
        size = f"{r['requests']} x {r['L'] // 1024}K, {runs.get(r.get('run'), first).get('new_tokens')} new"
        if r["status"] != "ok":
            lines.append(f"| {size} | {r['arrival']} | {r['config']} | {r['status']} | | | | | | | | | | | "
                         f"{r.get('reason', r.get('error', ''))[:80]} |")
            continue

        def x(key):
            return f"{r[key]:.2f}" if r.get(key) is not None else ""

        fast = r.get("fast_path_layer_calls")
        checked = len(r["same_prefix"]) if "same_prefix" in r else r.get("checked")
        same = f"{r['same_as_generate']} of {checked}" if checked else ""
        if r.get("same_prefix"):  # bfloat16 kernels round apart from generate()'s: where a near-tie first went
            same += f" (first {', '.join(map(str, r['same_prefix']))} tokens agree)"
        lines.append(f"| {size} | {r['arrival']} | {r['config']} | {r['tokens_per_s']:.1f} | {x('tokens_per_s_x_stock')} "
                     f"| {r['ttft_mean_s']:.2f} | {r['ttft_p95_s']:.2f} | {x('ttft_mean_x_stock')} | "
                     f"{r['peak_gib']:.1f} | {r['after_stop_gib'] * 1024:+.0f} MiB | {r.get('cache_tokens') or ''} | "
                     f"{r.get('requests_that_fit') or ''} | {'' if fast is None else fast} | "
                     f"{r.get('page_selections', '')} | {same} |")
    lines += ["", "![serving](benchmarks/results/serving.png)"]
    return "\n".join(lines)


def page_size_table() -> str:
    """The default model's decode on a GPU with pages of 64 and of 16 (page_size_decode.json)."""
    data = json.loads((RESULTS / "page_size_decode.json").read_text())
    meta = data["meta"]
    lines = [_run_line(meta, f"bfloat16, {meta['model']}; decode {meta['decode_formula']}"), "",
             "| prompt | token budget | stock, ms/token | pages of 64 | pages of 16 | 16 / 64 |",
             "| --- | --- | --- | --- | --- | --- |"]
    rows = data["rows"]
    stock = {r["L"]: r["decode_ms"] for r in rows if r["variant"] == "stock"}
    for (length, budget) in dict.fromkeys((r["L"], r["token_budget"]) for r in rows if r["variant"] != "stock"):
        ms = {r["variant"]: r["decode_ms"] for r in rows if r["L"] == length and r["token_budget"] == budget}
        lines.append(f"| {length} | {budget} | {stock.get(length, float('nan')):.2f} | {ms['pages64']:.2f} | "
                     f"{ms['pages16']:.2f} | {ms['pages16'] / ms['pages64']:.2f} |")
    return "\n".join(lines)


TABLES = {"e2e": e2e_table, "e2e_pinned": lambda: e2e_table("e2e_pinned.json"), "e2e_fp8": lambda: e2e_table("e2e_fp8.json"),
          "decode_sequence": decode_sequence_table, "fidelity": fidelity_table, "sample_attention_fidelity": sample_attention_fidelity_table, "sample_attention": sample_attention_table, "decode_fidelity": decode_fidelity_table, "prefill": prefill_table,
          "decode": decode_table, "eval": eval_table, "profile_comparison": profile_comparison_table,
          "multi_gpu": multi_gpu_table, "page_oracle": page_oracle_table, "heldout": heldout_table, "late_keys": late_keys_table,
          "window_layers": window_layers_table, "decode_selection": decode_selection_table,
          "sample_attention_heldout": sample_attention_heldout_table, "first_call": first_call_table,
          "families": families_table, "first_use": first_use_table, "page_size": page_size_table,
          "serving": serving_table}


# ------------------------------------------------------------------ figures in the README's prose
HEADLINE = ("What this run shows", "Earlier runs")  # the README section whose every number is checked


def prose_figures() -> list[str]:
    """Phrases of the README's prose, each computed from the results files: the README must contain every one
    verbatim, so that a re-run that moves a figure fails ``--check`` until the sentence says the new figure."""
    rows = json.loads((RESULTS / "e2e_pinned.json").read_text())["rows"]
    row = {(r["config"], r["L"]): r for r in rows if r["batch"] == 1}
    batch = {r["config"]: r for r in rows if r["batch"] == 4 and r["L"] == 32768}
    s8, s32, s128 = row[("stock", 8192)], row[("stock", 32768)], row[("stock", 131072)]
    c32, c128 = row[("stock_static_compile", 32768)], row[("stock_static_compile", 131072)]
    d8, d32, d128 = row[("patched_default", 8192)], row[("patched_default", 32768)], row[("patched_default", 131072)]
    p32, p128 = row[("patched_streaming50", 32768)], row[("patched_streaming50", 131072)]
    e32, e128 = row[("patched_dense_exact", 32768)], row[("patched_dense_exact", 131072)]
    floor = row[("stock_static_compile", 1024)]
    ms = lambda r: r["decode_ms_per_token"]  # noqa: E731
    ttft = lambda r: r["ttft_s"]  # noqa: E731
    short = {r["config"]: r for r in json.loads((RESULTS / "e2e_short.json").read_text())["rows"] if r["L"] == 8192}
    structured = {(r["config"], r["L"]): r for r in json.loads((RESULTS / "e2e_structured.json").read_text())["rows"]}
    t32, t128 = structured[("patched_default", 32768)], structured[("patched_default", 131072)]
    u32, u128 = structured[("patched_streaming50", 32768)], structured[("patched_streaming50", 131072)]
    k32, k128 = structured[("stock", 32768)], structured[("stock", 131072)]
    compiles = json.loads((RESULTS / "first_decode_compiles.json").read_text())
    calls = [r for r in compiles["rows"] if r["phase"] != "patch_model"]
    patch = next(r for r in compiles["rows"] if r["phase"] == "patch_model")
    gib = lambda r: max(0.0, r["after_return_gib"] - r["before_gib"]) * 1024  # noqa: E731
    first = {r["variant"]: r for r in json.loads((RESULTS / "first_call.json").read_text())["rows"]}
    cpu = json.loads((RESULTS / "cpu_decode.json").read_text())["rows"]
    cpu_ratio = {L: [r["patched_ms"] / r["stock_ms"] for r in cpu if r["L"] == L] for L in (2000, 6000)}
    exact = [ms(s32) / ms(e32), ms(s128) / ms(e128)]
    excess = lambda r: (r["call_first_s"] - r["ttft_first_s"]) - (r["call_warm_s"] - r["ttft_warm_s"])  # noqa: E731
    history = json.loads((RESULTS / "e2e.json").read_text())["rows"]
    m1 = next(r for r in history if r["config"] == "patched_streaming50_fp8" and r["L"] == 1 << 20
              and r["status"] == "ok" and "H100" in r["device"])  # the 80 GB card's row
    card = short_device(m1["device"])
    b1 = next(r for r in history if r["config"] == "patched_streaming50" and r["L"] == 1 << 20 and r["status"] == "ok")
    return [
        f"{ms(d32):.1f} and {ms(d128):.1f} ms per token at 32K and 128K",
        f"framework: {ms(floor):.1f} ms)",
        f"against stock's {ms(s32):.1f} and {ms(s128):.1f} ms ({s32['decode_ms_per_token_repeated']:.1f} and "
        f"{s128['decode_ms_per_token_repeated']:.1f} on a repeated length",
        f"compiled's {ms(c32):.1f} and {ms(c128):.1f}",
        f"decodes at {ms(e32):.1f} and {ms(e128):.1f} ms per token",
        f"{exact[0]:.1f}x and {exact[1]:.1f}x stock on first-seen lengths, "
        f"{s32['decode_ms_per_token_repeated'] / ms(e32):.1f}x and "
        f"{s128['decode_ms_per_token_repeated'] / ms(e128):.1f}x on repeated ones",
        f"decoded {min(exact):.1f}-{max(exact):.1f}x faster than stock at 32K-128K",
        f"cut it to {ttft(d128) / ttft(s128):.2f}x at 128K ({ttft(d128):.2f} s against {ttft(s128):.2f}) and "
        f"{ttft(d32) / ttft(s32):.2f}x at 32K ({ttft(d32):.2f} s against {ttft(s32):.2f})",
        f"found masks of density {d32['sample']['density_mean']:.2f} and {d128['sample']['density_mean']:.2f}",
        f"{ttft(d32) / ttft(p32):.2f}x and {ttft(d128) / ttft(p128):.2f}x the prefill of the same settings without it",
        f"{ttft(e32) / ttft(s32):.2f}x at 32K and {ttft(e128) / ttft(s128):.2f}x at 128K",
        f"took {ttft(d8) / ttft(s8):.2f}x stock in this run",
        f"took {ttft(short['patched_default']) / ttft(short['stock']):.2f}x (`benchmarks/results/e2e_short.json`)",
        f"ran sparse in {t32['last_call']['prefill_sample_attention_layers']} of {t32['last_call']['prefill_layers']} "
        f"layers at 32K (density {t32['sample']['density_mean']:.2f}) and in {t128['sample']['sparse_layers']} of "
        f"the {t128['sample']['layers']} it sampled at 128K ({t128['sample']['density_mean']:.2f})",
        f"{ttft(t32):.2f} s against {ttft(u32):.2f} s without it ({ttft(t32) / ttft(u32):.2f}x) at 32K and "
        f"{ttft(t128):.2f} s against {ttft(u128):.2f} s ({ttft(t128) / ttft(u128):.2f}x) at 128K; stock took "
        f"{ttft(k32):.2f} and {ttft(k128):.2f} s",
        f"stock took {ttft(batch['stock']):.2f} s to the first token, the package {ttft(batch['patched_default']):.2f} "
        f"s ({ttft(batch['patched_default']) / ttft(batch['stock']):.2f}x) and with no sparsity "
        f"{ttft(batch['patched_dense_exact']):.2f} s ({ttft(batch['patched_dense_exact']) / ttft(batch['stock']):.2f}x)",
        f"was {first['patched_fresh']['ttft_first_s']:.2f} s against {first['patched_fresh']['ttft_warm_s']:.2f} s "
        f"warm ({first['patched_fresh']['first_over_warm']:.2f}x), `patch_model` taking "
        f"{first['patched_fresh']['patch_s']:.1f} s instead ({first['patched_cached']['patch_s']:.1f} s once",
        f"stock's own first call took {first['stock']['ttft_first_s']:.2f} s against "
        f"{first['stock']['ttft_warm_s']:.2f} s ({first['stock']['first_over_warm']:.2f}x)",
        f"its decode steps took {excess(first['patched_fresh']):.1f} s more than a warm call's",
        f"compiled nothing: {sum(len(r['compiles']) for r in calls)} new kernel variants in {len(calls)} calls",
        f"`patch_model` took {patch['seconds']:.1f} s on an empty Triton cache",
        f"the peak falls from {s128['peak_gib']:.1f} to {d128['peak_gib']:.1f} GiB "
        f"({d128['peak_gib'] / s128['peak_gib']:.2f}x)",
        f"it is {e128['peak_gib']:.1f} GiB ({e128['peak_gib'] / s128['peak_gib']:.2f}x",
        f"(within {max(gib(r) for r in rows if r['config'] != 'stock_static_compile' and r['status'] == 'ok'):.0f} "
        "MiB)",
        f"A million tokens on one {card}**",
        f"peak {m1['peak_gib']:.1f} GiB,\n  {ttft(m1):.0f} s to the first token in chunks of 32K, {ms(m1):.1f} ms per token "
        "after it",
        f"bfloat16 pages peaked at {b1['peak_gib']:.1f} GiB on an H200",
        f"two runs gave {cpu_ratio[2000][0]:.2f}x and {cpu_ratio[2000][1]:.2f}x stock's time per token at 2000\n"
        f"tokens and {cpu_ratio[6000][0]:.2f}x and {cpu_ratio[6000][1]:.2f}x at 6000",
    ]


def check_prose(readme: str) -> list[str]:
    """Problems of the README's prose: a computed phrase it lacks, or a number of the headline section that no
    computed phrase covers (a figure typed by hand)."""
    problems = [f"README.md lacks the computed phrase {phrase!r}" for phrase in prose_figures() if phrase not in readme]
    start, end = readme.find(HEADLINE[0]), readme.find(HEADLINE[1])
    if start < 0 or end < start:
        return problems + [f"README.md has no section from {HEADLINE[0]!r} to {HEADLINE[1]!r}"]
    section = readme[start:end]
    for phrase in prose_figures():
        section = section.replace(phrase, "")
    stray = re.findall(r"(?<![\w.])\d+(?:\.\d+)?x?(?![\w.]*[KM]\b)", section.replace("5.25", ""))
    stray = [n for n in stray if n not in ("50", "1", "2", "128", "32", "8", "3")]  # names, not figures
    if stray:
        problems.append(f"numbers in README.md's headline prose that no results file checks: {stray}")
    return problems


def targets() -> list[Path]:
    """The files that hold tables: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv=None) -> None:
    check = "--check" in (sys.argv[1:] if argv is None else argv)
    texts = {path: path.read_text() for path in targets()}
    before = dict(texts)
    for name, make in TABLES.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        path = next((p for p, text in texts.items() if pattern.search(text)), None)
        if path is None:
            raise SystemExit(f"no file of {[str(p.relative_to(ROOT)) for p in texts]} has a <!-- table:{name} --> ... "
                             f"<!-- /table:{name} --> section")
        try:
            table = make()
        except FileNotFoundError as missing:  # a benchmark not run yet: its section stays as it is
            print(f"skipped table {name}: {missing}")
            continue
        if path.parent.name == "docs":  # links to results and plots, from docs/
            table = table.replace("](benchmarks/", "](../benchmarks/")
        texts[path] = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), texts[path])
    if check:  # CI: the committed tables are the ones the committed results make
        stale = [str(p.relative_to(ROOT)) for p, text in texts.items() if text != before[p]]
        if stale:
            raise SystemExit(f"tables out of date in {stale}: run python benchmarks/make_tables.py and commit")
        problems = check_prose(texts[ROOT / "README.md"])
        if problems:
            raise SystemExit("README.md's prose disagrees with the results:\n" + "\n".join(problems))
        print("tables up to date:", ", ".join(TABLES))
        return
    for path, text in texts.items():
        path.write_text(text)
    print("tables updated:", ", ".join(TABLES))


if __name__ == "__main__":
    main()

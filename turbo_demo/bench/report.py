"""The benchmark's JSON as the tables `bench` prints without --json."""

from collections import defaultdict

from turbo_demo.bench.ffn import FFN_MODES


def format_table(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"{m['cpu']} (family/model {m['family_model']}; {' '.join(m['simd'])}), "
        f"{m['threads']} threads, torch {m['torch']}, "
        f"{m['backend']} kernels, {m['dtype']}",
        f"read bandwidth {m['read_gbps']:.1f} GB/s ({m['read_method']}), "
        f"{m['read_gbps_at_end']:.1f} GB/s at the end of the run",
        "",
        "Each kernel alone, batch 1: ms, bytes read, GB/s, and share of the read bandwidth in the same rounds",
        *(
            f"{e['kernel']:<10}{e['format']:<10}{e['shape']:<12}{e['ms']:>8.2f} ms{e['bytes'] / 1e6:>9.1f} MB"
            f"{e['gbps']:>8.1f} GB/s{e['share_of_read_bandwidth']:>6.0%} of {e['read_gbps']:.1f}"
            for e in result.get("kernels", ())
        ),
        "",
        "FFN step, batch 1: ms (speed-up vs our dense; predictor also vs transformers)",
        f"{'shape':<12}{'sparsity':>9}" + "".join(f"{mode:>20}" for mode in FFN_MODES) + f"{'predictor vs tf':>17}",
    ]
    rows = defaultdict(dict)
    for e in result["ffn"]:
        rows[e["shape"], e["sparsity"]][e["mode"]] = e
    for (shape, sparsity), modes in rows.items():
        cells = (f"{modes[mode]['ms']:.2f} ({modes[mode]['speedup']:.2f}x)" for mode in FFN_MODES)
        lines.append(
            f"{shape:<12}{sparsity:>9.2f}"
            + "".join(f"{c:>20}" for c in cells)
            + f"{modes['predictor']['speedup_vs_transformers']:>16.2f}x"
        )
    lines += [
        "",
        "MoE step through the stack, batch 1: ms (vs our dense MoE, vs transformers), bytes read and their limit",
    ]
    for e in result.get("moe", ()):
        sparsity = "-" if e["in_expert_sparsity"] is None else f"{e['in_expert_sparsity']:.2f}"
        lines.append(
            f"{e['layers']} x {e['shape']:<22}{e['mode']:<14}{sparsity:>6}{e['ms']:>10.2f} ms{e['speedup']:>8.2f}x"
            f"{e['speedup_vs_transformers']:>8.2f}x{e['bytes'] / 1e6:>10.1f} MB{e['limit_ms']:>9.2f} ms"
        )
    lines += [
        "",
        "Decoding, batch 1 (bandwidth: the share of the read bandwidth in the same rounds, read GB/s)",
        f"{'model':<16}{'dtype':<10}{'weights':<9}{'engine':<22}{'tokens/s':>10}{'limit':>10}{'sparsity':>10}"
        f"{'bandwidth':>11}{'read':>7}{'vs dense':>10}{'stats':>8}",
    ]
    for e in result["e2e"]:
        sparsity = "-" if e["sparsity"] is None else f"{e['sparsity']:.2f}"
        stats = "-" if e["stats_share"] is None else f"{e['stats_share']:.1%}"
        lines.append(
            f"{e['model']:<16}{e['dtype']:<10}{e.get('quant') or '-':<9}{e['engine']:<22}{e['tokens_per_s']:>10.2f}"
            f"{e.get('limit_tokens_per_s', 0):>10.1f}{sparsity:>10}"
            f"{e['bandwidth_share']:>11.0%}{e['read_gbps']:>7.1f}{e['speedup_vs_dense']:>9.2f}x{stats:>8}"
        )
    lines += ["", "Prefill (the prompt as one batch): tokens/s, vs llama.cpp at the same precision, vs our decode"]
    for e in result.get("prefill", ()):
        peer = "-" if e["vs_llama_cpp"] is None else f"{e['vs_llama_cpp']:.2f}x"
        lines.append(
            f"{e['model']:<16}{e.get('quant') or e['dtype']:<9}{e['engine']:<12}{e['prompt_tokens']:>5} tokens"
            f"{e['tokens_per_s']:>10.1f}{peer:>9}{e['vs_decode']:>8.1f}x"
        )
    lines += ["", "Request (prompt, then new tokens): time to first token, decode tokens/s, total"]
    for e in result.get("request", ()):
        lines.append(
            f"{e['model']:<16}{e.get('quant') or e['dtype']:<9}{e['engine']:<12}{e['prompt_tokens']:>4} + "
            f"{e['new_tokens']:<4}{e['ttft_s']:>9.2f} s{e['decode_tokens_per_s']:>10.2f}{e['total_s']:>9.2f} s"
        )
    lines += [""] + [f"note: {n}" for n in result["notes"]]
    return "\n".join(lines)

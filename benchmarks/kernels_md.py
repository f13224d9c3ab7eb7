"""Render results of `hybridinfer bench kernels --json` as a markdown table.

    python benchmarks/kernels_md.py benchmarks/results/kernels_dev2core.json > benchmarks/results/kernels_dev2core.md
"""
import json
import sys

TARGETS = {"f16": 0.85, "q4_0": 0.75}  # dense ratio to the read bandwidth (issue 3)


def render(path: str) -> str:
    r = json.load(open(path))
    m = r["machine"]
    out = [f"## {path.rsplit('/', 1)[-1]}", "",
           f"- CPU: {m['cpu_model']} ({m['logical_cpus']} logical CPUs, LLC {m.get('llc_bytes')} B), "
           f"kernels: {m['kernel_isa']}, torch {m['torch']}, commit {str(m['git_commit'])[:10]}, "
           f"load average at the end {m.get('loadavg')}",
           f"- shape: {r['shape']}",
           "- read bandwidth (GB/s) by threads: " + ", ".join(
               f"{t}: {v:.1f}" for t, v in r["read_bandwidth_gbs_by_threads"].items()),
           "- torch dense FFN (ms) by dtype and threads: " + "; ".join(
               f"{k} " + ", ".join(f"{t}: {s * 1e3:.1f}" for t, s in v.items())
               for k, v in r.get("torch_dense_seconds", {}).items()),
           "", "| format | density | threads | ms (median) | GB/s | ratio to read BW | x torch dense |",
           "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        out.append(f"| {row['format']} | {row['density']:.2f} | {row['threads']} | "
                   f"{row['seconds'] * 1e3:.2f} | {row['gbs']:.1f} | {row['ratio']:.2f} | "
                   f"{row.get('speedup_vs_torch', float('nan')):.2f} |")
    out.append("")
    for fmt in sorted({x["format"] for x in r["rows"]}):
        for t in sorted({x["threads"] for x in r["rows"]}):
            d = [x for x in r["rows"] if (x["format"], x["threads"], x["density"]) == (fmt, t, 1.0)]
            s = [x for x in r["rows"] if (x["format"], x["threads"], x["density"]) == (fmt, t, 0.1)]
            if d and s:
                tgt = TARGETS.get(fmt)
                verdict = "" if tgt is None else (
                    f" (target >= {tgt}: {'met' if d[0]['ratio'] >= tgt else 'NOT met'})")
                out.append(f"- {fmt}, {t} threads: dense ratio {d[0]['ratio']:.2f}{verdict}; "
                           f"time at 10% / dense = {s[0]['seconds'] / d[0]['seconds']:.3f} "
                           f"(target <= 0.15: {'met' if s[0]['seconds'] <= 0.15 * d[0]['seconds'] else 'NOT met'})")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print("\n".join(render(p) for p in sys.argv[1:]))

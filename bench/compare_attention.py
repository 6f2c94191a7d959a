"""Joins attn-bench's attention rows with torch_sdpa.py's into one table of ratios.
Usage: python3 compare_attention.py BENCH.json TORCH.json > table.md"""
import json
import re
import sys

bench = json.load(open(sys.argv[1]))["results"]
torch_rows = json.load(open(sys.argv[2]))["results"]


def key_of_bench(shape):
    # "4x32/8x4096x128 causal" or "1x32/8x1:32768x128"
    m = re.match(r"(\d+)x(\d+)/(\d+)x(\d+)(?::(\d+))?x(\d+)( causal)?", shape)
    b, hq, hkv, sq, sk, d, causal = m.groups()
    return (int(b), int(hq), int(hkv), int(sq), int(sk or sq), int(d), bool(causal))


base = {}
for r in torch_rows:
    if "median_ms" in r:
        base[(tuple(r["shape"][:6]) + (bool(r["shape"][6]),), r["backend"])] = r
print("| variant | shape (B x Hq/Hkv x S x D) | ours | torch cuDNN | torch flash (FA2) | vs cuDNN | vs FA2 |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for r in bench:
    if r["op"] != "attention":
        continue
    k = key_of_bench(r["shape"])
    decode = k[3] == 1
    field = "kv_gbps" if decode else "tflops"
    c, f = base.get((k, "cudnn")), base.get((k, "flash"))
    cv = c[field] if c else None
    fv = f[field] if f else None
    unit = "GB/s" if decode else "TFLOP/s"
    def fmt(x):
        return f"{x:.0f}" if x is not None else "-"
    def ratio(x):
        return f"{r['rate'] / x:.2f}x" if x else "-"
    print(f"| {r['variant']} ({r['dtype']}) | {r['shape']} | {r['rate']:.0f} {unit} | {fmt(cv)} | {fmt(fv)} | "
          f"{ratio(cv) if r['dtype'] == 'bfloat16' else '-'} | {ratio(fv) if r['dtype'] == 'bfloat16' else '-'} |")

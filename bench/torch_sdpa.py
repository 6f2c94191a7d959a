"""Times torch's scaled_dot_product_attention (cuDNN and FlashAttention-2 backends) on the shapes
attn-bench times, on the same GPU, in the same job: the baselines for the attention ratios.
Usage: python3 torch_sdpa.py OUT.json
       python3 torch_sdpa.py --paged ATTN_BENCH.json OUT.json   (the KV-cache shapes: decode over
       attn-bench's ragged batch, read from its JSON, and the equal-length and prefill shapes)
       python3 torch_sdpa.py --heads OUT.json   (every common head dim: attn-bench --op heads)"""
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def shapes():
    for d in (64, 128):
        for s in (512, 1024, 2048, 4096, 8192, 16384):
            for causal in (False, True):
                yield (16384 // s, 2048 // d, 2048 // d, s, s, d, causal)
    yield (4, 32, 8, 4096, 4096, 128, False)
    yield (4, 32, 8, 4096, 4096, 128, True)
    yield (1, 32, 8, 1, 32768, 128, False)
    yield (16, 32, 8, 1, 16384, 128, False)


def head_dim_shapes():
    """attn-bench --op heads: B x S = 16k tokens, 16 heads, every common head dim, causal and not."""
    for d in (32, 64, 80, 96, 128, 192, 256):
        for s in (1024, 4096, 16384):
            for causal in (False, True):
                yield (16384 // s, 16, 16, s, s, d, causal)


def median_ms(fn, min_runs=20):
    """attn-bench's protocol, so that both sides run as long under load: warm-up, one timed run,
    then as many runs as fill about a second (20 to 200), each between CUDA events; the median."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()

    def timed():
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)

    first = timed()
    runs = min(max(int(1000.0 / max(first, 1e-3)), min_runs), 200)
    times = sorted(timed() for _ in range(runs))
    return times[len(times) // 2]


def paged(bench_json, out_path):
    """Decode (bf16, Hq=32, Hkv=8, D=128, one query row): the ragged batch padded to the longest
    with a key mask, and one SDPA call per sequence; equal lengths on cuDNN; chunked prefill on
    cuDNN (64 new onto 8k: torch's is_causal is top-left, so it runs unmasked there, an upper
    bound on its speed: the mask would hide 64 x 64 of 64 x 8256 scores)."""
    with open(bench_json) as f:
        lengths = json.load(f)["ragged_lengths"]
    hq, hkv, d, dt = 32, 8, 128, torch.bfloat16
    out = []

    def record(name, shape, ms, kv_bytes=None, flops=None):
        row = {"case": name, "shape": shape, "median_ms": ms}
        line = f"torch {name:28s} {str(shape):34s} {ms:8.3f} ms"
        if kv_bytes:
            row["kv_gbps"] = kv_bytes / ms / 1e6
            line += f" {row['kv_gbps']:7.0f} GB/s(K+V)"
        if flops:
            row["tflops"] = flops / ms / 1e9
            line += f" {row['tflops']:7.1f} TFLOP/s"
        out.append(row)
        print(line, flush=True)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    n, longest = len(lengths), max(lengths)
    real_bytes = 2 * sum(lengths) * hkv * d * 2
    q = torch.randn(n, hq, 1, d, device="cuda", dtype=dt)
    k = torch.randn(n, hkv, longest, d, device="cuda", dtype=dt)
    v = torch.randn(n, hkv, longest, d, device="cuda", dtype=dt)
    mask = torch.arange(longest, device="cuda")[None, :] < torch.tensor(lengths, device="cuda")[:, None]
    mask = mask[:, None, None, :]
    try:
        record("ragged padded+mask", [n, hq, hkv, 1, longest, d],
               median_ms(lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True)), real_bytes)
    except Exception as e:
        print("torch ragged padded+mask:", str(e)[:200])
    del k, v
    ks = [torch.randn(1, hkv, l, d, device="cuda", dtype=dt) for l in lengths]
    vs = [torch.randn(1, hkv, l, d, device="cuda", dtype=dt) for l in lengths]
    qs = [q[i:i + 1] for i in range(n)]
    for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                def per_seq():
                    for i in range(n):
                        sdpa(qs[i], ks[i], vs[i], enable_gqa=True)
                record(f"ragged per-sequence {name}", [n, hq, hkv, 1, "ragged", d], median_ms(per_seq), real_bytes)
        except Exception as e:
            print(f"torch ragged per-sequence {name}:", str(e)[:200])
    del ks, vs
    for b, sk in ((1, 32768), (32, 4096), (16, 16384), (64, 8192), (1, 4096)):
        q = torch.randn(b, hq, 1, d, device="cuda", dtype=dt)
        k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt)
        v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            record("decode cudnn", [b, hq, hkv, 1, sk, d], median_ms(lambda: sdpa(q, k, v, enable_gqa=True)),
                   2 * k.numel() * 2)
    for b, cached, fresh in ((16, 8192, 64), (1, 0, 2048), (8, 0, 2048)):
        sk = cached + fresh
        q = torch.randn(b, hq, fresh, d, device="cuda", dtype=dt)
        k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt)
        v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dt)
        causal = cached == 0
        pairs = fresh * cached + fresh * (fresh + 1) // 2
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    record(f"prefill {name}{'' if causal else ' (unmasked)'}", [b, hq, hkv, fresh, sk, d],
                           median_ms(lambda: sdpa(q, k, v, is_causal=causal, enable_gqa=True)),
                           flops=4 * b * hq * pairs * d)
            except Exception as e:
                print(f"torch prefill {name}:", str(e)[:200])
    with open(out_path, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": out}, f, indent=1)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--paged":
        paged(sys.argv[2], sys.argv[3])
        return
    heads = len(sys.argv) == 3 and sys.argv[1] == "--heads"
    out_path = sys.argv[2] if heads else sys.argv[1]
    out = []
    for b, hq, hkv, sq, sk, d, causal in (head_dim_shapes() if heads else shapes()):
        q = torch.randn(b, hq, sq, d, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(b, hkv, sk, d, device="cuda", dtype=torch.bfloat16)
        flops = 4 * b * hq * sq * sk * d // (2 if causal and sq == sk else 1)
        kv_bytes = 2 * k.numel() * k.element_size()
        for name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    fn = lambda: torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=causal and sq > 1, enable_gqa=hkv != hq)
                    ms = median_ms(fn)
            except Exception as e:  # a backend that refuses the shape
                out.append({"shape": [b, hq, hkv, sq, sk, d, causal], "backend": name, "error": str(e)[:120]})
                continue
            row = {"shape": [b, hq, hkv, sq, sk, d, causal], "backend": name, "median_ms": ms,
                   "tflops": flops / ms / 1e9, "kv_gbps": kv_bytes / ms / 1e6}
            out.append(row)
            print(f"torch {name:6s} {str(row['shape']):40s} {ms:8.3f} ms {row['tflops']:7.1f} TFLOP/s "
                  f"{row['kv_gbps']:7.0f} GB/s(K+V)", flush=True)
    with open(out_path, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()

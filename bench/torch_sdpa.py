"""Times torch's scaled_dot_product_attention (cuDNN and FlashAttention-2 backends) on the shapes
attn-bench times, on the same GPU, in the same job: the baselines for the attention ratios.
Usage: python3 torch_sdpa.py OUT.json"""
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


def main():
    out = []
    for b, hq, hkv, sq, sk, d, causal in shapes():
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
    with open(sys.argv[1], "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()

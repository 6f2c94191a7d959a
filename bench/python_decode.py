#!/usr/bin/env python3
"""Decode from the Python client with torch CUDA tensors: each call's q, k_new, v_new and output
live in a CUDA IPC region (nothing but the request's small fields crosses gRPC), against the same
calls with numpy tensors inline. Prints per-call latency (p50, p99), the server's kernel time and
their difference, and writes a JSON record.

    python3 bench/python_decode.py --server 127.0.0.1:50051 --seqs 1 --context 4096

The server runs on this GPU host with --shared-memory cuda. The inputs are made once, on the host,
and copied into the region before the timed calls: the client makes no CUDA work of its own while
they run (a client kernel would time-slice with the server's and inflate its times).
"""
import argparse
import json
import sys
import time

import numpy as np


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--seqs", type=int, default=1)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)

    import torch
    from attn_client import Client, to_bfloat16

    n, hq, hkv, d = args.seqs, args.q_heads, args.kv_heads, args.head_dim
    rng = np.random.default_rng(1)
    ids = [f"s{i}" for i in range(n)]
    steps = args.warmup + args.steps
    records = {}
    with Client(args.server, timeout=120) as client:
        for mode in ("cuda-ipc", "inline"):
            info = client.create_kv_cache(layers=1, kv_heads=hkv, head_dim=d, dtype="bfloat16",
                                          page_size=args.page_size,
                                          capacity_tokens=n * (args.context + steps + 2 * args.page_size))
            cache = info.handle
            # The prompt, inline.
            rows = args.context
            def bf16(shape):  # bfloat16 bits made on the host
                return to_bfloat16(rng.standard_normal(shape, dtype=np.float32))

            def on_gpu(x):  # the same bits as a torch CUDA tensor
                return torch.from_numpy(x.bits.view(np.int16).copy()).view(torch.bfloat16).cuda()
            for i in ids:  # a sequence a call: 32 MB each at 32 heads x 128 x 4k
                client.prefill(cache, 0, [i], [rows], bf16((rows, hq, d)), bf16((rows, hkv, d)),
                               bf16((rows, hkv, d)))
            q, k, v = bf16((n, hq, d)), bf16((n, hkv, d)), bf16((n, hkv, d))
            if mode == "cuda-ipc":
                base = torch.empty(4 << 20, dtype=torch.uint8, device="cuda")
                region = client.register_cuda_tensor("decode", base)
                tq, tk, tv = region.put(on_gpu(q)), region.put(on_gpu(k)), region.put(on_gpu(v))
                out = region.alloc((n, hq, d), "bfloat16")
                torch.cuda.synchronize()
                call = lambda: client.decode(cache, 0, ids, tq, tk, tv, out=out)
            else:
                call = lambda: client.decode(cache, 0, ids, q, k, v)
            lat, kern, total = [], [], []
            for s in range(steps):
                t0 = time.perf_counter_ns()
                r = call()
                t1 = time.perf_counter_ns()
                if s >= args.warmup:
                    lat.append(t1 - t0)
                    kern.append(r.timings.kernel_ns)
                    total.append(r.timings.total_ns)
            if mode == "cuda-ipc":
                region.unregister()
            client.delete_kv_cache(cache)
            rec = {"mode": mode, "seqs": n, "context": args.context, "q_heads": hq, "kv_heads": hkv,
                   "head_dim": d, "steps": args.steps, "call_p50_ns": percentile(lat, 0.5),
                   "call_p99_ns": percentile(lat, 0.99), "kernel_p50_ns": percentile(kern, 0.5),
                   "server_total_p50_ns": percentile(total, 0.5), "kernel": r.timings.kernel,
                   "device": r.timings.device}
            rec["call_minus_kernel_p50_ns"] = rec["call_p50_ns"] - rec["kernel_p50_ns"]
            records[mode] = rec
            print(f"{mode:8s} {n} x {args.context}: call p50 {rec['call_p50_ns'] / 1e3:.1f} us, "
                  f"p99 {rec['call_p99_ns'] / 1e3:.1f} us | kernel p50 {rec['kernel_p50_ns'] / 1e3:.1f} us, "
                  f"server total p50 {rec['server_total_p50_ns'] / 1e3:.1f} us | call - kernel "
                  f"{rec['call_minus_kernel_p50_ns'] / 1e3:.1f} us ({rec['kernel']}, {rec['device']})")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(records, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

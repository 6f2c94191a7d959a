"""`attn decode-bench` and `attn kv` against a running attnd. Usage: decode_bench_test.py ATTN ATTND."""
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

ATTN, ATTND = sys.argv[1], sys.argv[2]


class DecodeBenchTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        port_file = os.path.join(cls.dir.name, "port")
        cls.server = subprocess.Popen([ATTND, "--listen", "127.0.0.1:0", "--port-file", port_file, "--backend", "cpu"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and open(port_file).read().split()):
            assert cls.server.poll() is None and time.time() < deadline, "attnd did not start"
            time.sleep(0.02)
        cls.address = "127.0.0.1:" + open(port_file).read().split()[0]

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        assert cls.server.wait(timeout=30) == 0
        cls.dir.cleanup()

    def attn(self, *args, check=True):
        r = subprocess.run([ATTN, "--server", self.address, *args], capture_output=True, text=True, timeout=120)
        if check:
            self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def caches(self):
        return json.loads(self.attn("--json", "kv", "list").stdout).get("caches", [])

    def test_decode_bench_reports_and_cleans_up(self):
        out = os.path.join(self.dir.name, "bench.json")
        args = ["decode-bench", "--seqs", "3", "--context", "5:40", "--steps", "4", "--warmup", "1", "--layers", "2",
                "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", "--page-size", "8",
                "--prefill-chunk", "32"]
        table = self.attn(*args, "--json-out", out).stdout
        for words in ("steps/s", "sequence-steps/s", "per step: p50", "per call: p50", "kernel share", "prefill:"):
            self.assertIn(words, table)
        self.assertNotIn("float8", table)
        with open(out) as f:
            r = json.load(f)
        self.assertEqual((r["seqs"], r["steps"], r["layers"], r["dtype"]), (3, 4, 2, "float32"))
        self.assertEqual(r["kv_storage"], "float32")
        self.assertTrue(5 * 3 <= r["prompt_tokens"] <= 40 * 3)
        self.assertGreaterEqual(r["prefill_calls"], 2 * -(-r["prompt_tokens"] // 32))  # chunks x layers
        self.assertTrue(r["kernel"].startswith("paged_decode/"))
        self.assertGreater(r["steps_per_s"], 0)
        self.assertAlmostEqual(r["sequence_steps_per_s"], 3 * r["steps_per_s"], delta=1e-6 * r["sequence_steps_per_s"])
        self.assertLessEqual(r["step_p50_ns"], r["step_p99_ns"])
        self.assertGreater(r["step_p50_ns"], r["call_p50_ns"])  # a step is two calls
        self.assertGreater(r["call_mean_server_ns"], r["call_mean_kernel_ns"])
        self.assertEqual(r["replica"], self.address)
        self.assertEqual(self.caches(), [], "the benchmark deletes its cache")
        as_json = json.loads(self.attn("--json", *args).stdout)  # --json prints the same record
        self.assertEqual(set(as_json), set(r))
        self.assertEqual(as_json["clients"], 1)
        self.assertEqual(as_json["transport"], "inline")
        self.assertEqual(as_json["call_mean_batched_calls"], 1)  # one stream: nothing to merge with

    def test_decode_bench_fp8(self):
        out = os.path.join(self.dir.name, "fp8.json")
        args = ["decode-bench", "--seqs", "3", "--context", "5:40", "--steps", "3", "--warmup", "1", "--layers", "2",
                "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "bfloat16", "--page-size", "8"]
        table = self.attn(*args, "--fp8", "--json-out", out).stdout
        header = table.splitlines()[0]
        self.assertTrue(header.startswith("cache "), header)
        self.assertIn("), bfloat16, float8_e4m3 cache, page 8, ", header)
        self.assertIn("per call: p50", table)
        with open(out) as f:
            r = json.load(f)
        self.assertEqual((r["dtype"], r["kv_storage"], r["page_size"]), ("bfloat16", "float8_e4m3", 8))
        self.assertGreater(r["steps_per_s"], 0)
        # The same workload (same seed, same pages) stored in bfloat16: the float8 cache holds a
        # byte an element instead of two, plus a float32 scale per (layer, K or V, page, kv head).
        plain = json.loads(self.attn("--json", *args).stdout)
        self.assertEqual(plain["kv_storage"], "bfloat16")
        pages = plain["cache_bytes"] // (2 * 2 * 2 * 8 * 16 * 2)  # layers, K and V, Hkv, page, D, bytes
        self.assertEqual(r["cache_bytes"], plain["cache_bytes"] // 2 + 2 * 2 * pages * 2 * 4)
        self.assertEqual(self.caches(), [])

    def test_decode_bench_concurrent_streams(self):
        r = json.loads(self.attn("--json", "decode-bench", "--clients", "3", "--seqs", "6", "--context", "20",
                                 "--steps", "6", "--layers", "2", "--q-heads", "4", "--kv-heads", "2", "--head-dim",
                                 "16", "--dtype", "float32").stdout)
        self.assertEqual((r["clients"], r["seqs"]), (3, 6))
        self.assertAlmostEqual(r["sequence_steps_per_s"], 6 * r["steps_per_s"], delta=1e-6 * r["sequence_steps_per_s"])
        self.assertGreaterEqual(r["call_mean_batched_calls"], 1)  # merged launches show as more than 1
        self.assertLessEqual(r["call_mean_batched_calls"], 3)
        self.assertEqual(self.caches(), [])

    def test_decode_bench_bad_options(self):
        r = self.attn("decode-bench", "--context", "9:3", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--context", r.stderr)
        r = self.attn("decode-bench", "--seqs", "2", "--clients", "3", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--clients", r.stderr)
        r = self.attn("decode-bench", "--dtype", "int8", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--dtype", r.stderr)
        r = self.attn("decode-bench", "--fp8", "--dtype", "float32", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--fp8: INVALID_ARGUMENT", r.stderr)
        self.assertIn("float16 and bfloat16", r.stderr)
        # The server's refusal comes through with its code: 3 query heads over 2 kv heads.
        r = self.attn("decode-bench", "--seqs", "1", "--context", "4", "--layers", "1", "--q-heads", "3",
                      "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertEqual(self.caches(), [], "a failed benchmark deletes its cache too")

    def test_decode_bench_shm(self):
        # The server above runs without shared memory: --shm is refused there, by the server.
        small = ["decode-bench", "--seqs", "3", "--context", "5:20", "--steps", "3", "--layers", "2",
                 "--q-heads", "4", "--kv-heads", "2", "--head-dim", "16", "--dtype", "float32"]
        r = self.attn(*small, "--shm", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("--shm", r.stderr)
        self.assertIn("--shared-memory", r.stderr)
        self.assertEqual(self.caches(), [])
        r = self.attn(*small, "--shm", "--cuda-ipc", "0", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("expected one of them, got both", r.stderr)
        # One that serves it: q, k_new, v_new and o through a region, the same report.
        port_file = os.path.join(self.dir.name, "shm-port")
        server = subprocess.Popen([ATTND, "--listen", "127.0.0.1:0", "--port-file", port_file, "--backend", "cpu",
                                   "--shared-memory", "system"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.time() + 30
            while not (os.path.exists(port_file) and open(port_file).read().split()):
                assert server.poll() is None and time.time() < deadline, "attnd did not start"
                time.sleep(0.02)
            address = "127.0.0.1:" + open(port_file).read().split()[0]
            run = lambda *args: subprocess.run([ATTN, "--server", address, *args], capture_output=True, text=True,
                                               timeout=120)
            table = run(*small, "--clients", "2", "--shm")
            self.assertEqual(table.returncode, 0, table.stderr)
            self.assertIn("tensors shm", table.stdout)
            self.assertIn("per call: p50", table.stdout)
            r = run("--json", *small, "--shm")
            self.assertEqual(r.returncode, 0, r.stderr)
            r = json.loads(r.stdout)
            self.assertEqual(r["transport"], "shm")
            self.assertGreater(r["call_p50_ns"], 0)
            # --cuda-ipc needs a CUDA build of attn and a server with --shared-memory cuda: refused
            # here, by name.
            r = run(*small, "--cuda-ipc", "0")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn("--cuda-ipc", r.stderr)
        finally:
            server.terminate()
            self.assertEqual(server.wait(timeout=30), 0)

    def test_kv_create_describe_list_delete(self):
        made = json.loads(self.attn("--json", "kv", "create", "--layers", "2", "--kv-heads", "2", "--head-dim", "16",
                                    "--capacity", "64", "--dtype", "float16").stdout)
        handle = made["handle"]
        self.assertEqual(made["replica"], self.address)
        self.assertEqual(made["config"]["dtype"], "D_TYPE_FLOAT16")
        self.assertIn(handle, [c["handle"] for c in self.caches()])
        described = self.attn("kv", "describe", handle, "--replica", self.address).stdout
        self.assertIn(handle, described)
        self.assertIn("freed", self.attn("kv", "delete", handle).stdout)
        r = self.attn("kv", "describe", handle, check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("NOT_FOUND", r.stderr)


if __name__ == "__main__":
    unittest.main(argv=sys.argv[:1], verbosity=2)

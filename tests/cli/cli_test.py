"""The attn CLI against a running attnd: .npy files made by numpy go in, results come back as
.npy and are checked against numpy in float64. Usage: cli_test.py ATTN ATTND."""
import json
import os
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

ATTN, ATTND = sys.argv[1], sys.argv[2]


def softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def to_bfloat16(x):
    """float32 rounded to the nearest bfloat16 (ties to even), as float32."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        port_file = os.path.join(cls.dir.name, "port")
        cls.server = subprocess.Popen(
            [ATTND, "--listen", "127.0.0.1:0", "--port-file", port_file, "--shared-memory", "system"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(1500):
            if os.path.exists(port_file):
                break
            time.sleep(0.02)
        with open(port_file) as f:
            cls.address = "127.0.0.1:" + f.read().strip()
        cls.rng = np.random.default_rng()

    @classmethod
    def tearDownClass(cls):
        cls.server.terminate()
        cls.server.wait(timeout=30)
        cls.dir.cleanup()

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def attn(self, *args, check=True):
        r = subprocess.run([ATTN, "--server", self.address, *args], capture_output=True, text=True)
        if check:
            self.assertEqual(r.returncode, 0, r.stderr)
        return r

    def test_matmul_npy_round_trip(self):
        for dtype, tol in ((np.float32, 1e-5), (np.float16, 1e-2)):
            a = self.rng.standard_normal((33, 70)).astype(dtype)
            b = self.rng.standard_normal((70, 17)).astype(dtype)
            np.save(self.path("a.npy"), a)
            np.save(self.path("b.npy"), b)
            out = self.attn("matmul", self.path("a.npy"), self.path("b.npy"), "-o", self.path("c.npy"))
            self.assertIn("matmul/cpu_openblas", out.stdout)
            c = np.load(self.path("c.npy"))
            self.assertEqual(c.dtype, dtype)
            self.assertLess(rel_err(c, a.astype(np.float64) @ b.astype(np.float64)), tol)

    def test_matmul_transposed_operands_read_as_stored(self):
        a_t = self.rng.standard_normal((70, 33)).astype(np.float32)  # stored [K, M]
        b = self.rng.standard_normal((70, 17)).astype(np.float32)
        np.save(self.path("at.npy"), a_t)
        np.save(self.path("b2.npy"), b)
        self.attn("matmul", "--transpose-a", self.path("at.npy"), self.path("b2.npy"), "-o", self.path("c2.npy"))
        want = a_t.astype(np.float64).T @ b.astype(np.float64)
        self.assertLess(rel_err(np.load(self.path("c2.npy")), want), 1e-5)

    def test_softmax_bfloat16_and_float64_input(self):
        x = self.rng.standard_normal((4, 3, 1000)) * 4  # float64 .npy: read as float32
        np.save(self.path("x.npy"), x)
        self.attn("softmax", self.path("x.npy"), "-o", self.path("y.npy"))
        self.assertLess(rel_err(np.load(self.path("y.npy")), softmax64(x.astype(np.float32))), 1e-5)
        # --dtype bfloat16 converts; the result comes back as float32 (numpy has no bfloat16).
        self.attn("softmax", "--dtype", "bfloat16", self.path("x.npy"), "-o", self.path("yb.npy"))
        yb = np.load(self.path("yb.npy"))
        self.assertEqual(yb.dtype, np.float32)
        self.assertLess(rel_err(yb, softmax64(to_bfloat16(x.astype(np.float32)))), 1e-2)

    def test_attention_gqa_causal_with_lse(self):
        q = self.rng.standard_normal((2, 4, 17, 64)).astype(np.float32)
        k = self.rng.standard_normal((2, 2, 33, 64)).astype(np.float32)
        v = self.rng.standard_normal((2, 2, 33, 64)).astype(np.float32)
        for name, arr in (("q", q), ("k", k), ("v", v)):
            np.save(self.path(name + ".npy"), arr)
        self.attn("attention", "--causal", self.path("q.npy"), self.path("k.npy"), self.path("v.npy"),
                  "-o", self.path("o.npy"), "--lse-out", self.path("lse.npy"))
        kk = np.repeat(k.astype(np.float64), 2, axis=1)
        vv = np.repeat(v.astype(np.float64), 2, axis=1)
        s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) / np.sqrt(64)
        sq, sk = 17, 33
        mask = np.arange(sk)[None, :] <= np.arange(sq)[:, None] + (sk - sq)  # bottom-right aligned
        s = np.where(mask, s, -np.inf)
        lse = np.log(np.exp(s - s.max(-1, keepdims=True)).sum(-1)) + s.max(-1)
        o = softmax64(s) @ vv
        self.assertLess(rel_err(np.load(self.path("o.npy")), o), 1e-5)
        self.assertLess(rel_err(np.load(self.path("lse.npy")), lse), 1e-5)

    def test_attention_sliding_window_and_softcap(self):
        q = (3 * self.rng.standard_normal((1, 2, 33, 32))).astype(np.float32)
        k = (3 * self.rng.standard_normal((1, 2, 40, 32))).astype(np.float32)
        v = self.rng.standard_normal((1, 2, 40, 32)).astype(np.float32)
        for name, arr in (("wq", q), ("wk", k), ("wv", v)):
            np.save(self.path(name + ".npy"), arr)
        self.attn("attention", self.path("wq.npy"), self.path("wk.npy"), self.path("wv.npy"),
                  "--window-left", "4", "--window-right", "2", "--softcap", "5", "-o", self.path("wo.npy"))
        s = q.astype(np.float64) @ k.astype(np.float64).transpose(0, 1, 3, 2) / np.sqrt(32)
        s = 5 * np.tanh(s / 5)
        pos, j = np.arange(33)[:, None] + (40 - 33), np.arange(40)[None, :]
        s = np.where((j >= pos - 4) & (j <= pos + 2), s, -np.inf)
        self.assertLess(rel_err(np.load(self.path("wo.npy")), softmax64(s) @ v.astype(np.float64)), 1e-5)
        r = self.attn("attention", "--random", "1,1,4,8", "--window-left", "-2", check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertIn("window_left", r.stderr)
        bench = json.loads(self.attn("--json", "benchmark", "attention", "1,2,33,32", "--dtype", "float32",
                                     "--window-left", "8", "--softcap", "20", "--iterations", "2").stdout)
        results = bench["results"]
        self.assertGreaterEqual(len(results), 2)
        for res in results:
            self.assertTrue(res.get("correct"), res)

    def test_shm_inputs_and_outputs_equal_inline(self):
        q, k, v = (self.rng.standard_normal((1, 2, 40, 32)).astype(np.float16) for _ in range(3))
        for name, arr in (("sq", q), ("sk", k), ("sv", v)):
            np.save(self.path(name + ".npy"), arr)
        ins = [self.path(n + ".npy") for n in ("sq", "sk", "sv")]
        self.attn("attention", "--causal", *ins, "-o", self.path("o_inline.npy"))
        self.attn("attention", "--causal", "--shm", *ins, "-o", self.path("o_shm.npy"))
        self.assertTrue(np.array_equal(np.load(self.path("o_inline.npy")), np.load(self.path("o_shm.npy"))))
        np.save(self.path("ma.npy"), q.reshape(2, 40, 32))
        np.save(self.path("mb.npy"), k.reshape(2, 40, 32))
        mats = [self.path("ma.npy"), self.path("mb.npy")]
        self.attn("matmul", "--shm", "--transpose-b", *mats, "-o", self.path("m.npy"))
        self.attn("matmul", "--transpose-b", *mats, "-o", self.path("m2.npy"))
        self.assertTrue(np.array_equal(np.load(self.path("m.npy")), np.load(self.path("m2.npy"))))
        out = self.attn("bench-rpc", "--shm", "--clients", "2", "--seconds", "0.5", "--mix", "softmax:64,256",
                        "matmul:32,32,32", "attention:1,2,32,32", "--json-out", self.path("b.json"))
        self.assertIn("inputs and outputs in shared memory", out.stdout)
        doc = json.load(open(self.path("b.json")))
        self.assertTrue(doc["shm"])
        for e in doc["entries"]:
            self.assertEqual(e["errors"], 0, e)
            self.assertGreater(e["calls"], 0, e)

    def test_random_inputs_and_json(self):
        out = self.attn("--json", "matmul", "--random", "2,64,32,16", "--dtype", "bf16")
        doc = json.loads(out.stdout)
        self.assertEqual(doc["output_shape"], [2, 64, 16])
        self.assertEqual(doc["output_dtype"], "bfloat16")
        self.assertEqual(doc["timings"]["kernel"], "matmul/cpu_openblas")
        self.assertEqual(int(doc["timings"]["flops"]), 2 * 2 * 64 * 32 * 16)

    def test_info_and_kernels(self):
        info = json.loads(self.attn("--json", "info").stdout)
        self.assertEqual(info["backend"], "cpu")
        self.assertEqual(self.attn("health").stdout.strip(), "SERVING")
        kernels = self.attn("kernels").stdout
        for name in ("matmul/cpu_blocked", "matmul/cpu_openblas", "softmax/cpu", "attention/cpu",
                     "attention/cpu_flash"):
            self.assertIn(name, kernels)
        self.assertIn("OpenBLAS", self.attn("info").stdout)  # the CPU device says which BLAS serves

    def test_errors_are_reported_not_crashed(self):
        np.save(self.path("m1.npy"), np.ones((4, 5), np.float32))
        np.save(self.path("m2.npy"), np.ones((6, 3), np.float32))
        r = self.attn("matmul", self.path("m1.npy"), self.path("m2.npy"), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("INVALID_ARGUMENT", r.stderr)
        self.assertIn("b.shape", r.stderr)
        np.save(self.path("i.npy"), np.ones((4,), np.int32))
        r = self.attn("softmax", self.path("i.npy"), check=False)
        self.assertNotEqual(r.returncode, 0)
        self.assertIn("<i4", r.stderr)


if __name__ == "__main__":
    unittest.main(argv=[sys.argv[0], "-v"])

"""Protocol hygiene with a client nobody here wrote: `buf lint` (STANDARD rules) on proto/, and
`buf curl` against the real server using only server reflection (no .proto given): list the
services, call each op with JSON input, check health. $BUF and $ATTND name the programs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "client", "python", "tests"))
from conftest import Server  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def buf(*args, input=None):
    r = subprocess.run([os.environ["BUF"], *args], capture_output=True, text=True, input=input,
                       timeout=60, cwd=ROOT)
    return r.returncode, r.stdout, r.stderr


def curl(server, method, body=None):
    args = ["curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    if body is not None:
        args += ["--data", json.dumps(body)]
    rc, out, err = buf(*args, f"http://{server.address}/{method}")
    assert rc == 0, f"buf curl {method} failed: {err}"
    return json.loads(out)


def test_buf_lint_passes_with_standard_rules():
    rc, out, err = buf("lint", "proto")
    assert rc == 0, out + err
    with open(os.path.join(ROOT, "buf.yaml")) as f:
        assert "STANDARD" in f.read()


@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


def test_buf_curl_lists_services_by_reflection(server):
    rc, out, err = buf("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods",
                       f"http://{server.address}")
    assert rc == 0, err
    methods = set(out.split())
    for m in ["Matmul", "Softmax", "Attention", "ListKernels", "GetServerInfo"]:
        assert f"attn.v1.AttnService/{m}" in methods
    assert "grpc.health.v1.Health/Check" in methods


def tensor(shape, values):
    return {"dtype": "D_TYPE_FLOAT32", "shape": shape, "values": values}


def test_buf_curl_calls_each_op_with_json(server):
    y = curl(server, "attn.v1.AttnService/Softmax", {"x": tensor([2], [0, 0]), "returnValues": True})
    assert y["y"]["values"] == [0.5, 0.5] and y["timings"]["kernel"].startswith("softmax/")

    c = curl(server, "attn.v1.AttnService/Matmul",
             {"a": tensor([2, 2], [1, 2, 3, 4]), "b": tensor([2, 1], [1, 1]), "returnValues": True})
    assert c["c"]["values"] == [3, 7] and c["c"]["shape"] == ["2", "1"]

    q = np.array([1, 0, 0, 1], dtype=np.float32)
    o = curl(server, "attn.v1.AttnService/Attention",
             {"q": tensor([1, 1, 1, 4], q.tolist()), "k": tensor([1, 1, 2, 4], [1, 0, 0, 1, 0, 1, 0, 0]),
              "v": tensor([1, 1, 2, 4], [1, 2, 3, 4, 5, 6, 7, 8]), "returnValues": True, "returnLse": True})
    s = np.array([2.0, 0.0]) * 0.5  # q.k_j scaled by 1/sqrt(4)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    want = p @ np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.float64)
    np.testing.assert_allclose(o["o"]["values"], want, rtol=1e-5)
    assert len(o["lse"]["values"]) == 1

    kernels = curl(server, "attn.v1.AttnService/ListKernels", {"op": "matmul"})
    assert any(k["name"] == "matmul/cpu_blocked" for k in kernels["kernels"])
    info = curl(server, "attn.v1.AttnService/GetServerInfo", {})
    assert info["backend"] == "cpu"


def test_buf_curl_health_and_refusal(server):
    assert curl(server, "grpc.health.v1.Health/Check", {})["status"] == "SERVING"
    rc, out, err = buf("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--data",
                       json.dumps({"x": {"dtype": "D_TYPE_FLOAT32", "shape": [3], "values": [1]}}),
                       f"http://{server.address}/attn.v1.AttnService/Softmax")
    assert rc != 0
    assert "invalid_argument" in (out + err).lower() and "x" in (out + err)

"""The container image, built and run for real with podman: the Dockerfile's stages on the local
Debian 12 base image (scripts/container-base-image), so the CPU-only server, then from the host:
health, ops checked against numpy, metrics, buf curl through reflection, the non-root user, the
image's HEALTHCHECK, a token, a SIGTERM that drains an in-flight call and exits 0, and the compose
file under podman-compose.

Environment: ATTN (the host-built CLI), BUF (buf, for buf curl), ATTN_SOURCE_DIR (the repository),
ATTN_LOG_DIR (where the image build's log goes), PODMAN (default podman), PODMAN_COMPOSE (default
podman-compose), ATTN_CONTAINER_RUNTIME (default runc: crun fails on cgroups on the machines this
runs on), ATTN_BASE_IMAGE (default localhost/attnd-base:bookworm)."""

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import uuid

import numpy as np
import pytest

ROOT = os.path.abspath(os.environ.get("ATTN_SOURCE_DIR", os.path.join(os.path.dirname(__file__), "..", "..")))
ATTN = os.environ["ATTN"]
BUF = os.environ.get("BUF", os.path.join(ROOT, "tools", "buf", "node_modules", ".bin", "buf"))
LOG_DIR = os.environ.get("ATTN_LOG_DIR", tempfile.gettempdir())
BASE_IMAGE = os.environ.get("ATTN_BASE_IMAGE", "localhost/attnd-base:bookworm")
RUNTIME = os.environ.get("ATTN_CONTAINER_RUNTIME", "runc")
# podman's default limits exceed the hard limits of the machines this runs on: always explicit.
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
RUN_ID = uuid.uuid4().hex[:8]
TOKEN = "ctest-" + uuid.uuid4().hex


def which_or_fail(name, what):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed, so {what} cannot be tested: run scripts/install-deps "
                    "(it installs podman, runc, debootstrap and podman-compose)", pytrace=False)
    return path


PODMAN_PROGRAM = os.environ.get("PODMAN", "podman")


def podman_cmd():
    return [which_or_fail(PODMAN_PROGRAM, "the container image"), "--runtime", RUNTIME]


def run(cmd, *, check=True, timeout=120, env=None, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, **(env or {})}, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}",
                    pytrace=False)
    return r


def podman(*args, **kw):
    return run([*podman_cmd(), *args], **kw)


def timing(what, seconds):
    line = f"container timing: {what}: {seconds:.1f} s"
    print(line)
    with open(os.path.join(LOG_DIR, "container-timings.txt"), "a") as f:
        f.write(line + "\n")


@pytest.fixture(scope="session")
def image():
    """Builds the image from the repository on the Debian 12 base; removes it afterwards (the base
    image and the layer cache stay for the next run)."""
    podman_cmd()  # fails here, loudly, without podman
    which_or_fail("runc", "the container image")
    with open(os.path.join(LOG_DIR, "container-timings.txt"), "w"):
        pass
    t0 = time.monotonic()
    run([os.path.join(ROOT, "scripts", "container-base-image")], timeout=1200,
        env={"ATTN_BASE_IMAGE": BASE_IMAGE, "PODMAN": PODMAN_PROGRAM})
    timing("base image (scripts/container-base-image)", time.monotonic() - t0)

    tag = f"localhost/attnd-ctest:{RUN_ID}"
    log = os.path.join(LOG_DIR, "container-build.log")
    t0 = time.monotonic()
    with open(log, "w") as out:  # each line with the seconds since the build started
        build = subprocess.Popen([*podman_cmd(), "build", "--runtime", RUNTIME, "--format", "docker",
                                  "--pull=never", *ULIMITS,
                                  "--build-arg", f"BUILD_IMAGE={BASE_IMAGE}",
                                  "--build-arg", f"RUNTIME_IMAGE={BASE_IMAGE}",
                                  "-f", os.path.join(ROOT, "Dockerfile"), "-t", tag, ROOT],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 errors="replace")
        for line in build.stdout:
            out.write(f"[{time.monotonic() - t0:6.1f}s] {line}")
        build.wait()
    if build.returncode != 0:
        with open(log) as f:
            pytest.fail(f"podman build failed ({log}):\n" + f.read()[-4000:], pytrace=False)
    timing("image build (podman build)", time.monotonic() - t0)
    yield tag
    podman("rmi", tag, check=False)


class Container:
    """One container of the image, its ports published on free loopback ports."""

    def __init__(self, image, *args, env=None):
        self.name = f"attnd-ctest-{RUN_ID}-{uuid.uuid4().hex[:6]}"
        env_args = [a for k in (env or {}) for a in ("--env", k)]  # values from our environment,
        podman("run", "-d", "--name", self.name, *ULIMITS,             # not from a command line
               "-p", "127.0.0.1::50051", "-p", "127.0.0.1::9464", *env_args, image, *args,
               env=env)
        self.address = self.published(50051)
        self.metrics = self.published(9464)
        wait_serving(self.address, self.name)

    def published(self, port):
        out = podman("port", self.name, f"{port}/tcp").stdout.strip().splitlines()[0]
        host, _, p = out.rpartition(":")
        return f"127.0.0.1:{p}"

    def logs(self):
        r = podman("logs", self.name, check=False)
        return r.stdout + r.stderr

    def remove(self):
        podman("rm", "-f", "-t", "0", self.name, check=False)


def container_state(name):
    r = podman("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, check=False)
    return r.stdout.strip()


def wait_serving(address, name, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        r = subprocess.run([ATTN, "--server", address, "--timeout-ms", "2000", "health"],
                           capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.strip() == "SERVING":
            return
        state = container_state(name)
        if not state.startswith("running"):
            logs = podman("logs", name, check=False)
            pytest.fail(f"container {name} is {state}:\n{logs.stdout}{logs.stderr}", pytrace=False)
        time.sleep(0.2)
    pytest.fail(f"{name} did not serve on {address} in {seconds} s", pytrace=False)


def attn(address, *args, check=True, env=None):
    r = run([ATTN, "--server", address, *args], check=False, env=env)
    if check:
        assert r.returncode == 0, f"attn {' '.join(args)}: {r.stderr}"
    return r


def buf_curl(address, method, body, headers=()):
    if not os.path.exists(BUF):
        pytest.fail(f"buf is not installed ({BUF}): run scripts/install-deps", pytrace=False)
    args = [BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    for h in headers:
        args += ["-H", h]
    if body is not None:
        args += ["--data", json.dumps(body)]
    return run([*args, f"http://{address}/{method}"], check=False, timeout=60, cwd=ROOT)


def softmax64(x):
    x = x.astype(np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def rel_err(got, want):
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values in the result"
    return np.linalg.norm(got - want) / np.linalg.norm(want)


def metrics_text(address):
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200
        return r.read().decode()


@pytest.fixture(scope="module")
def server(image):
    """The image with its default command (the Dockerfile's CMD)."""
    c = Container(image)
    yield c
    c.remove()


def test_image_is_the_cpu_server_as_user_10001_with_a_healthcheck(image):
    (info,) = json.loads(podman("image", "inspect", image).stdout)
    config = info["Config"]
    assert config["User"] == "attnd"
    assert config["Entrypoint"] == ["attnd"]
    assert config["Cmd"] == ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]
    health = info.get("Healthcheck") or config.get("Healthcheck") or {}  # kept by --format docker
    assert health.get("Test", [])[:2] == ["CMD", "attn"] and "health" in health["Test"], info


def test_health_and_info_from_the_host(server):
    assert attn(server.address, "health").stdout.strip() == "SERVING"
    info = json.loads(attn(server.address, "--json", "info").stdout)
    assert info["backend"] == "cpu"  # the Debian base has no nvcc: the CPU-only build


def test_softmax_and_attention_match_numpy(server, tmp_path):
    rng = np.random.default_rng()
    x = rng.standard_normal((3, 5, 257)).astype(np.float32) * 4
    np.save(tmp_path / "x.npy", x)
    attn(server.address, "softmax", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy"))
    assert rel_err(np.load(tmp_path / "y.npy"), softmax64(x)) < 1e-5

    q = rng.standard_normal((2, 4, 9, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 21, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 21, 64)).astype(np.float32)
    for name, arr in (("q", q), ("k", k), ("v", v)):
        np.save(tmp_path / f"{name}.npy", arr)
    attn(server.address, "attention", "--causal", *(str(tmp_path / f"{n}.npy") for n in "qkv"),
         "-o", str(tmp_path / "o.npy"))
    kk = np.repeat(k.astype(np.float64), 2, axis=1)  # grouped-query: 4 query heads, 2 kv heads
    vv = np.repeat(v.astype(np.float64), 2, axis=1)
    s = q.astype(np.float64) @ kk.transpose(0, 1, 3, 2) / np.sqrt(64)
    mask = np.arange(21)[None, :] <= np.arange(9)[:, None] + (21 - 9)  # bottom-right aligned
    o = softmax64(np.where(mask, s, -np.inf)) @ vv
    assert rel_err(np.load(tmp_path / "o.npy"), o) < 1e-5


def test_metrics_endpoint(server):
    attn(server.address, "softmax", "--random", "4,16")
    text = metrics_text(server.metrics)
    assert "# TYPE attnd_requests_total counter" in text
    assert any(line.startswith("attnd_requests_total{") and 'op="softmax"' in line
               for line in text.splitlines()), text[-2000:]
    assert "attnd_latency_seconds_bucket{" in text


def test_buf_curl_through_reflection(server):
    r = run([BUF, "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-methods",
             f"http://{server.address}"], check=False, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "attn.v1.AttnService/Attention" in r.stdout.split()
    r = buf_curl(server.address, "attn.v1.AttnService/Softmax",
                 {"x": {"dtype": "D_TYPE_FLOAT32", "shape": [2], "values": [0, 0]}, "returnValues": True})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["y"]["values"] == [0.5, 0.5]
    r = buf_curl(server.address, "grpc.health.v1.Health/Check", {})
    assert r.returncode == 0 and json.loads(r.stdout)["status"] == "SERVING", r.stderr


def test_server_runs_as_the_non_root_user(server):
    top = podman("top", server.name, "pid", "user", "huser", "comm").stdout.split("\n")
    rows = [line.split() for line in top[1:] if line.strip()]
    assert ["1", "attnd", "10001", "attnd"] in rows, top
    assert podman("exec", server.name, "id", "-u").stdout.strip() == "10001"


def test_the_images_healthcheck_passes(server):
    r = podman("healthcheck", "run", server.name, check=False)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sigterm_drains_an_in_flight_call_and_exits_0(image):
    c = Container(image)
    try:
        # A call of a few seconds, in flight (counted by attnd_queue_depth) when SIGTERM comes.
        call = subprocess.Popen([ATTN, "--server", c.address, "--json", "attention", "--random",
                                 "1,8,2048,64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            depth = [line for line in metrics_text(c.metrics).splitlines()
                     if line.startswith("attnd_queue_depth{")]
            if any(float(line.split()[-1]) > 0 for line in depth):
                break
            assert call.poll() is None, "the call ended before it was seen in flight: make it larger"
            assert time.monotonic() < deadline, depth
            time.sleep(0.01)
        t0 = time.monotonic()
        podman("stop", "-t", "30", c.name, timeout=60)
        timing("podman stop with a call in flight", time.monotonic() - t0)
        out, err = call.communicate(timeout=60)
        assert call.returncode == 0, f"the in-flight call failed: {err}"
        assert json.loads(out)["output_shape"] == [1, 8, 2048, 64]
        assert container_state(c.name) == "exited 0", c.logs()
        logs = c.logs()
        assert "received SIGTERM" in logs and "shutting down" in logs, logs
    finally:
        c.remove()


def test_a_token_in_the_environment_is_required(image):
    c = Container(image, env={"ATTND_TOKEN": TOKEN})
    try:
        check_token_required(c.address, TOKEN)
        r = buf_curl(c.address, "attn.v1.AttnService/GetServerInfo", {},
                     headers=[f"authorization: Bearer {TOKEN}"])
        assert r.returncode == 0, r.stderr
        podman("stop", "-t", "30", c.name, timeout=60)
        assert container_state(c.name) == "exited 0", c.logs()
    finally:
        c.remove()


def check_token_required(address, token):
    r = attn(address, "softmax", "--random", "2,8", check=False, env={"ATTN_TOKEN": ""})
    assert r.returncode != 0 and "UNAUTHENTICATED" in r.stderr, r.stderr
    r = attn(address, "softmax", "--random", "2,8", check=False, env={"ATTN_TOKEN": "not-" + token})
    assert r.returncode != 0 and "UNAUTHENTICATED" in r.stderr, r.stderr
    attn(address, "softmax", "--random", "2,8", env={"ATTN_TOKEN": token})
    # Health stays open for probes.
    assert attn(address, "health", env={"ATTN_TOKEN": ""}).stdout.strip() == "SERVING"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("token", ["", TOKEN], ids=["no_token", "token"])
def test_compose_file_under_podman_compose(image, token):
    """deploy/docker-compose.yml with the local image (podman-compose 1.0.3, Debian 12's, leaves
    the GPU reservation out and does not build with build args, so the image is given)."""
    compose = which_or_fail(os.environ.get("PODMAN_COMPOSE", "podman-compose"), "the compose file")
    project = f"attnd-ctest-{RUN_ID}-{'t' if token else 'n'}"
    port, metrics_port = free_port(), free_port()
    env = {"ATTND_IMAGE": image, "ATTND_PORT": str(port), "ATTND_METRICS_PORT": str(metrics_port),
           "ATTND_TOKEN": token}
    base = [compose, f"--podman-path={shutil.which(PODMAN_PROGRAM)}", f"--podman-args=--runtime {RUNTIME}",
            "-p", project, "-f", os.path.join(ROOT, "deploy", "docker-compose.yml")]
    address = f"127.0.0.1:{port}"
    try:
        run([*base, f"--podman-run-args={' '.join(ULIMITS)}", "up", "-d", "--no-build"], env=env)
        names = podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                       "--format", "{{.Names}}").stdout.split()
        assert len(names) == 1, names
        (name,) = names
        wait_serving(address, name)
        if token:  # passed on from the environment, not written on podman's command line
            assert token not in podman("inspect", "--format", "{{.Config.CreateCommand}}", name).stdout
            check_token_required(address, token)
        else:
            attn(address, "softmax", "--random", "2,8", env={"ATTN_TOKEN": ""})
        assert 'op="softmax"' in metrics_text(f"127.0.0.1:{metrics_port}")
        r = podman("healthcheck", "run", name, check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        top = podman("top", name, "pid", "huser").stdout.split()
        assert top[-2:] == ["1", "10001"], top
        (info,) = json.loads(podman("inspect", name).stdout)
        assert info["HostConfig"]["RestartPolicy"]["Name"] == "on-failure"
        run([*base, "stop", "-t", "15"], env=env)
        assert container_state(name) == "exited 0", podman("logs", name, check=False).stderr
    finally:
        run([*base, "down", "-t", "0"], env=env, check=False)
        podman("network", "rm", "-f", f"{project}_default", check=False)

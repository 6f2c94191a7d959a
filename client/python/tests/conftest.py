"""Starts the real attnd (the binary named by $ATTND) on a free loopback port for the tests."""

import os
import subprocess
import tempfile
import time

import pytest


class Server:
    def __init__(self, *args, env=None, backend="cpu", start_s=30):
        binary = os.environ["ATTND"]
        self.dir = tempfile.mkdtemp(prefix="attnd-py-")
        port_file = os.path.join(self.dir, "port")
        self.log_path = os.path.join(self.dir, "attnd.log")
        self.proc = subprocess.Popen(
            [binary, "--listen", "127.0.0.1:0", "--port-file", port_file, "--backend", backend, *args],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})})
        deadline = time.time() + start_s
        while time.time() < deadline:
            if os.path.exists(port_file):
                self.port = int(open(port_file).read().split()[0])
                self.address = f"127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError("attnd exited at start: " + open(self.log_path).read())
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError(f"attnd did not start in {start_s} s")

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    assert s.stop() == 0


@pytest.fixture
def rng():
    return __import__("numpy").random.default_rng()

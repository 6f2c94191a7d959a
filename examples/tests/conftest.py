"""The server the example tests run against: $ATTND on a free loopback port, CPU backend."""

import os
import subprocess
import tempfile
import time

import pytest


@pytest.fixture(scope="module")
def server_address():
    """The binary named by $ATTND on a free loopback port, CPU backend."""
    work = tempfile.mkdtemp(prefix="attnd-example-")
    port_file, log_path = os.path.join(work, "port"), os.path.join(work, "attnd.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([os.environ["ATTND"], "--listen", "127.0.0.1:0", "--port-file", port_file,
                                 "--backend", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        while not (os.path.exists(port_file) and open(port_file).read().split()):
            assert proc.poll() is None, "attnd exited at start: " + open(log_path).read()
            assert time.time() < deadline, "attnd did not start in 30 s"
            time.sleep(0.02)
        yield "127.0.0.1:" + open(port_file).read().split()[0]
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, open(log_path).read()

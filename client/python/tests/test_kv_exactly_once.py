"""Exactly-once Decode/Prefill (expected_lengths) through attn_client against the real server: a
loopback proxy between the client and attnd loses a response after the server ran the call (or
holds it past the client's deadline); the client resends the call and the server answers the
repeat from its record, bit for bit, without appending again. Calls without expected_lengths are
not resent; a wrong expectation is not resent either."""

import socket
import threading
import time

import grpc
import numpy as np
import pytest

from attn_client import AttnError, Client, KvRetry

HQ, HKV, D = 4, 2, 16


class ResponseLosingProxy:
    """127.0.0.1 TCP proxy to `upstream`. `lose` responses are lost: when the server's response to a
    call begins (its first HTTP/2 HEADERS frame on a stream, which attnd sends once the call has
    run), the connection is reset instead of passing it on; `hold` seconds, when set, delay each
    response instead; `gate`, when set (a threading.Event), holds each response until it is set.
    Counts connections."""

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.lose = 0
        self.hold = 0.0
        self.gate = None
        self.connections = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._threads = []
        self._sockets = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self):
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                if self._closed:
                    self._reset(client, server)
                    client.close()
                    server.close()
                    return
                self.connections += 1
                self._sockets += [client, server]
                for args in ((client, server, False), (server, client, True)):
                    t = threading.Thread(target=self._pump, args=args, daemon=True)
                    t.start()
                    self._threads.append(t)

    def _take_loss(self):
        with self._lock:
            if self.lose > 0:
                self.lose -= 1
                return True
            return False

    @staticmethod
    def _reset(*socks):
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump(self, src, dst, from_server):
        pending, answered = b"", set()  # the server's bytes as HTTP/2 frames
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                break
            if not data:
                break
            if not from_server:
                try:
                    dst.sendall(data)
                except OSError:
                    break
                continue
            pending += data
            out = b""
            while len(pending) >= 9:
                length = int.from_bytes(pending[:3], "big")
                if len(pending) < 9 + length:
                    break
                kind, stream = pending[3], int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
                if kind == 1 and stream and stream not in answered:  # a response begins
                    answered.add(stream)
                    if self._take_loss():
                        try:
                            dst.sendall(out)
                        except OSError:
                            pass
                        self._reset(src, dst)
                        return
                    if self.hold:
                        time.sleep(self.hold)
                    if self.gate is not None:
                        self.gate.wait()
                out, pending = out + pending[:9 + length], pending[9 + length:]
            try:
                dst.sendall(out)
            except OSError:
                break
        self._reset(src, dst)

    def close(self):
        with self._lock:
            self._closed = True  # a connection accepted from here on is reset at once
            self._reset(*self._sockets)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        self._acceptor.join(timeout=5)
        self._listener.close()
        for t in self._threads:
            t.join(timeout=5)
        for s in self._sockets:
            s.close()


@pytest.fixture
def proxy(server):
    p = ResponseLosingProxy(server.port)
    p.clients = []
    yield p
    for c in p.clients:  # an open connection holds the server's shutdown for seconds
        c.close()
    p.close()


def rows(rng, n, heads):
    return rng.standard_normal((n, heads, D)).astype(np.float32)


def connect(server, proxy, timeout=30.0):
    """A cache made directly, a client whose calls on it go through the proxy, and a direct one."""
    direct = Client(server.address, timeout=30)
    info = direct.create_kv_cache(layers=2, kv_heads=HKV, head_dim=D, capacity_tokens=512)
    through = Client(proxy.address, timeout=timeout,
                     kv_retry=KvRetry(max_attempts=4, initial_backoff=0.01, max_backoff=0.1))
    through.set_kv_cache_replica(info.handle, "")  # its main channel: the proxy
    proxy.clients += [direct, through]
    return direct, through, info.handle


def lengths(client, cache):
    return {s.id: list(s.lengths) for s in client.describe_kv_cache(cache).sequences}


def test_a_lost_response_is_resent_and_answered_once(server, proxy, rng):
    direct, through, cache = connect(server, proxy)
    q, k, v = rows(rng, 9, HQ), rows(rng, 9, HKV), rows(rng, 9, HKV)
    proxy.lose = 1
    p = through.prefill(cache, 0, ["a", "b"], [4, 5], q, k, v, return_lse=True, expected_lengths=[0, 0])
    assert p.attempts >= 2 and p.replayed and p.lengths == [4, 5]
    assert lengths(direct, cache) == {"a": [4, 0], "b": [5, 0]}
    # The same answer as the call gets on a cache of its own, straight from the server.
    other = direct.create_kv_cache(layers=2, kv_heads=HKV, head_dim=D, capacity_tokens=512).handle
    want = direct.prefill(other, 0, ["a", "b"], [4, 5], q, k, v, return_lse=True, expected_lengths=[0, 0])
    assert not want.replayed and want.attempts == 1
    np.testing.assert_array_equal(p.output, want.output)
    np.testing.assert_array_equal(p.lse, want.lse)

    for step in range(3):
        q1, k1, v1 = rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV)
        proxy.lose = 1
        r = through.decode(cache, 0, ["a", "b"], q1, k1, v1, expected_lengths=[4 + step, 5 + step])
        assert r.attempts == 2 and r.replayed and r.lengths == [5 + step, 6 + step]
        w = direct.decode(other, 0, ["a", "b"], q1, k1, v1, expected_lengths=[4 + step, 5 + step])
        np.testing.assert_array_equal(r.output, w.output)
    assert lengths(direct, cache) == {"a": [7, 0], "b": [8, 0]}
    for sid in ("a", "b"):
        for got, want in zip(direct.read_kv(cache, sid, 0), direct.read_kv(other, sid, 0)):
            np.testing.assert_array_equal(got, want)
    assert proxy.connections >= 5


def test_a_response_held_past_the_deadline_is_resent(server, proxy, rng):
    direct, through, cache = connect(server, proxy, timeout=0.5)
    direct.prefill(cache, 1, ["s"], [3], rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV),
                   expected_lengths=[0])
    proxy.hold = 1.0  # every response: the first attempt's deadline passes with the call applied
    q, k, v = rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV)
    threading.Timer(0.6, lambda: setattr(proxy, "hold", 0.0)).start()
    r = through.decode(cache, 1, ["s"], q, k, v, expected_lengths=[3])
    assert r.attempts >= 2 and r.replayed and r.lengths == [4]
    assert lengths(direct, cache) == {"s": [0, 4]}


def test_without_expected_lengths_nothing_is_resent(server, proxy, rng):
    direct, through, cache = connect(server, proxy)
    direct.prefill(cache, 0, ["s"], [3], rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV))
    proxy.lose = 1
    with pytest.raises(AttnError) as e:
        through.decode(cache, 0, ["s"], rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE
    # It was applied all the same: the ambiguity expected_lengths removes.
    assert lengths(direct, cache) == {"s": [4, 0]}


def test_a_wrong_expectation_is_refused_at_once(server, proxy, rng):
    direct, through, cache = connect(server, proxy)
    direct.prefill(cache, 0, ["s"], [3], rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV))
    before = proxy.connections
    with pytest.raises(AttnError) as e:
        through.decode(cache, 0, ["s"], rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV),
                       expected_lengths=[2])
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert 'expected_lengths[0]: sequence "s" at layer 0' in e.value.message
    assert "expected length 2, got 3" in e.value.message and "attempts" not in e.value.message
    assert lengths(direct, cache) == {"s": [3, 0]}
    with pytest.raises(AttnError) as e:
        through.decode(cache, 0, ["s", "t"], rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV),
                       expected_lengths=[3])
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "expected_lengths: expected one length per sequence (2, or none), got 1" in e.value.message
    assert proxy.connections - before <= 1
    assert direct.describe_kv_cache(cache).replay_bytes == 0

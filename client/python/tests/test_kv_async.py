"""Decode and Prefill without blocking, against the real server: Client.decode_async /
prefill_async (concurrent.futures) and attn_client.aio.AsyncClient (asyncio). Each gives the
blocking call's results bit for bit and its errors (code and message); many calls are in flight on
one client at once (responses held back by a proxy while the server has applied every call); an
exactly-once call whose response is lost is resent and applied once."""

import asyncio
import threading
import time

import grpc
import numpy as np
import pytest

from attn_client import AttnError, Client, KvRetry
from attn_client.aio import AsyncClient
from test_kv_exactly_once import ResponseLosingProxy

HQ, HKV, D = 4, 2, 16


def rows(rng, n, heads):
    return rng.standard_normal((n, heads, D)).astype(np.float32)


def new_cache(client, layers=2):
    return client.create_kv_cache(layers=layers, kv_heads=HKV, head_dim=D, capacity_tokens=1024).handle


class Futures:
    """Client.decode_async / prefill_async: concurrent.futures.Future of each call."""

    def __init__(self, address, **kw):
        self.client = Client(address, **kw)

    def decode(self, *args, **kw):
        return self.client.decode_async(*args, **kw)

    def prefill(self, *args, **kw):
        return self.client.prefill_async(*args, **kw)

    def set_kv_cache_replica(self, handle, replica):
        self.client.set_kv_cache_replica(handle, replica)

    def close(self):
        self.client.close()


class Asyncio:
    """AsyncClient's coroutines on an event loop of their own (a thread), each call handed over as
    a concurrent.futures.Future (asyncio.run_coroutine_threadsafe), so that one test serves both."""

    def __init__(self, address, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def make():
            return AsyncClient(address, **kw)

        self.client = self._submit(make()).result()

    def _submit(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def decode(self, *args, **kw):
        return self._submit(self.client.decode(*args, **kw))

    def prefill(self, *args, **kw):
        return self._submit(self.client.prefill(*args, **kw))

    def set_kv_cache_replica(self, handle, replica):
        self.client.set_kv_cache_replica(handle, replica)

    def close(self):
        self._submit(self.client.close()).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()


@pytest.fixture(params=[Futures, Asyncio], ids=["futures", "asyncio"])
def kind(request):
    return request.param


def same(got, want):
    assert got.lengths == want.lengths and got.replayed == want.replayed and got.attempts == want.attempts
    np.testing.assert_array_equal(got.output, want.output)
    if want.lse is None:
        assert got.lse is None
    else:
        np.testing.assert_array_equal(got.lse, want.lse)


def test_the_blocking_calls_results_bit_for_bit(server, rng, kind):
    blocking = Client(server.address, timeout=30)
    sender = kind(server.address, timeout=30)
    try:
        a, b = new_cache(blocking), new_cache(blocking)
        ids, lens = ["x", "y", "z"], [5, 9, 1]
        q, k, v = rows(rng, 15, HQ), rows(rng, 15, HKV), rows(rng, 15, HKV)
        for layer in (0, 1):  # a prefill per layer, with the LSE and a window on layer 1
            opts = {"return_lse": layer == 1, "window_left": 3 if layer else None}
            same(sender.prefill(b, layer, ids, lens, q, k, v, **opts).result(),
                 blocking.prefill(a, layer, ids, lens, q, k, v, **opts))
        for step in range(4):
            q1, k1, v1 = rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV)
            expected = [n + step for n in lens]
            for layer in (0, 1):
                opts = {"return_lse": True, "expected_lengths": expected, "softcap": 5.0 if layer else 0.0}
                same(sender.decode(b, layer, ids, q1, k1, v1, **opts).result(),
                     blocking.decode(a, layer, ids, q1, k1, v1, **opts))
        for sid in ids:
            for layer in (0, 1):
                for got, want in zip(blocking.read_kv(b, sid, layer), blocking.read_kv(a, sid, layer)):
                    np.testing.assert_array_equal(got, want)
    finally:
        sender.close()
        blocking.close()


def test_asyncio_decode_loop_overlaps_two_micro_batches(server, rng):
    """The ping-pong shape of examples/pingpong_decode.py in asyncio: micro-batch A's call in
    flight while B's is sent, each step awaited in turn; the same bits as blocking calls."""
    blocking = Client(server.address, timeout=30)
    a, b = new_cache(blocking), new_cache(blocking)
    batches = {"A": ["a0", "a1"], "B": ["b0", "b1", "b2"]}
    prompts = {name: (rows(rng, 2 * len(ids), HQ), rows(rng, 2 * len(ids), HKV), rows(rng, 2 * len(ids), HKV))
               for name, ids in batches.items()}
    steps = [{name: (rows(rng, len(ids), HQ), rows(rng, len(ids), HKV), rows(rng, len(ids), HKV))
              for name, ids in batches.items()} for _ in range(3)]

    async def served():
        out = []
        async with AsyncClient(server.address, timeout=30) as c:
            prefills = await asyncio.gather(*(c.prefill(b, 0, ids, [2] * len(ids), *prompts[name])
                                              for name, ids in batches.items()))
            out.append(dict(zip(batches, prefills)))
            for step in steps:
                pending = {name: asyncio.ensure_future(c.decode(b, 0, batches[name], *step[name]))
                           for name in batches}
                out.append({name: await call for name, call in pending.items()})
        return out

    got = asyncio.run(served())
    for name, ids in batches.items():
        same(got[0][name], blocking.prefill(a, 0, ids, [2] * len(ids), *prompts[name]))
    for step, results in zip(steps, got[1:]):
        for name, ids in batches.items():
            same(results[name], blocking.decode(a, 0, ids, *step[name]))
    blocking.close()


def test_many_calls_in_flight_on_one_client(server, rng, kind):
    """Every call is sent before any response comes back: the proxy holds the responses while the
    server has applied all of them (its lengths say so); then each future gets its own answer."""
    direct = Client(server.address, timeout=30)
    proxy = ResponseLosingProxy(server.port)
    proxy.gate = threading.Event()
    sender = kind(proxy.address, timeout=60)
    calls = 24
    try:
        cache, twin = new_cache(direct), new_cache(direct)
        sender.set_kv_cache_replica(cache, "")
        ids = [f"s{i}" for i in range(calls)]
        prompts = [(rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV)) for _ in ids]
        for sid, p in zip(ids, prompts):
            for c in (cache, twin):
                direct.prefill(c, 0, [sid], [2], *p)
        steps = [(rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV)) for _ in ids]
        pending = [sender.decode(cache, 0, [sid], *step, expected_lengths=[2])
                   for sid, step in zip(ids, steps)]
        deadline = time.time() + 120
        while any(s.lengths[0] != 3 for s in direct.describe_kv_cache(cache).sequences):
            assert time.time() < deadline, "the server did not get every call"
            time.sleep(0.02)
        assert not any(p.done() for p in pending), "a response passed the held proxy"
        proxy.gate.set()
        for sid, step, p in zip(ids, steps, pending):
            same(p.result(timeout=120), direct.decode(twin, 0, [sid], *step, expected_lengths=[2]))
    finally:
        proxy.gate.set()
        sender.close()
        direct.close()
        proxy.close()


def test_errors_arrive_as_the_blocking_calls(server, rng, kind):
    blocking = Client(server.address, timeout=30)
    sender = kind(server.address, timeout=30)
    try:
        cache = new_cache(blocking)
        blocking.prefill(cache, 0, ["s"], [3], rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV))
        q, k, v = rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV)
        bad = [
            ("decode", (cache, 0, ["s"], rows(rng, 1, HQ + 1), k, v), {}),  # heads not a multiple
            ("decode", (cache, 5, ["s"], q, k, v), {}),  # no such layer
            ("decode", ("kv-nonexistent", 0, ["s"], q, k, v), {}),
            ("decode", (cache, 0, ["s"], q, k, v), {"expected_lengths": [7]}),  # not where it is
            ("prefill", (cache, 0, ["s"], [2], q, k, v), {}),  # lens over the rows
        ]
        for method, args, kw in bad:
            with pytest.raises(AttnError) as want:
                getattr(blocking, method)(*args, **kw)
            with pytest.raises(AttnError) as got:
                getattr(sender, method)(*args, **kw).result()
            assert (got.value.code, got.value.message) == (want.value.code, want.value.message)
            assert want.value.code != grpc.StatusCode.OK
        assert [list(s.lengths) for s in blocking.describe_kv_cache(cache).sequences] == [[3, 0]]
    finally:
        sender.close()
        blocking.close()


def test_a_lost_response_is_resent_and_applied_once(server, rng, kind):
    direct = Client(server.address, timeout=30)
    proxy = ResponseLosingProxy(server.port)
    sender = kind(proxy.address, timeout=30,
                  kv_retry=KvRetry(max_attempts=4, initial_backoff=0.01, max_backoff=0.1))
    try:
        cache, twin = new_cache(direct), new_cache(direct)
        sender.set_kv_cache_replica(cache, "")
        q, k, v = rows(rng, 7, HQ), rows(rng, 7, HKV), rows(rng, 7, HKV)
        proxy.lose = 1
        p = sender.prefill(cache, 0, ["a", "b"], [3, 4], q, k, v, return_lse=True,
                           expected_lengths=[0, 0]).result()
        assert p.attempts >= 2 and p.replayed and p.lengths == [3, 4]
        want = direct.prefill(twin, 0, ["a", "b"], [3, 4], q, k, v, return_lse=True, expected_lengths=[0, 0])
        np.testing.assert_array_equal(p.output, want.output)
        np.testing.assert_array_equal(p.lse, want.lse)

        q1, k1, v1 = rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV)
        proxy.lose = 1
        r = sender.decode(cache, 0, ["a", "b"], q1, k1, v1, expected_lengths=[3, 4]).result()
        assert r.attempts >= 2 and r.replayed and r.lengths == [4, 5]
        w = direct.decode(twin, 0, ["a", "b"], q1, k1, v1, expected_lengths=[3, 4])
        np.testing.assert_array_equal(r.output, w.output)
        assert {s.id: list(s.lengths) for s in direct.describe_kv_cache(cache).sequences} == \
            {"a": [4, 0], "b": [5, 0]}

        # Without expected_lengths nothing is resent: the error comes through the future.
        proxy.lose = 1
        with pytest.raises(AttnError) as e:
            sender.decode(cache, 0, ["a"], rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV)).result()
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "attempts" not in e.value.message
        assert {s.id: list(s.lengths) for s in direct.describe_kv_cache(cache).sequences} == \
            {"a": [5, 0], "b": [5, 0]}
    finally:
        sender.close()
        direct.close()
        proxy.close()

"""KV caches through attn_client against the real server: lifecycle, Prefill and Decode against
numpy in float64, fork, ReadKv, errors, and routing to the replica that holds a cache."""

import time

import grpc
import numpy as np
import pytest

from attn_client import AttnError, Client, to_bfloat16
from attn.v1 import attn_pb2, attn_pb2_grpc
from conftest import Server

HQ, HKV, D = 4, 2, 16


def rel_error(got, want):
    got = np.asarray(got, dtype=np.float64)
    return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300)


class Reference:
    """A KV cache in float64: each sequence's K/V per layer, and attention over it."""

    def __init__(self, layers):
        self.k = [dict() for _ in range(layers)]
        self.v = [dict() for _ in range(layers)]

    def append(self, layer, sid, q, k, v, causal=True, scale=None):
        """Appends k/v [new, Hkv, D] and returns (o [new, Hq, D], lse [new, Hq]) for q [new, Hq, D]."""
        q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
        ks, vs = self.k[layer], self.v[layer]
        ks[sid] = np.concatenate([ks[sid], k]) if sid in ks else k
        vs[sid] = np.concatenate([vs[sid], v]) if sid in vs else v
        keys, values = ks[sid], vs[sid]
        group = q.shape[1] // keys.shape[1]
        keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
        s = np.einsum("qhd,khd->hqk", q, keys) * (scale or 1 / np.sqrt(q.shape[-1]))
        if causal:
            first = keys.shape[0] - q.shape[0]
            visible = np.arange(keys.shape[0])[None, :] <= first + np.arange(q.shape[0])[:, None]
            s = np.where(visible[None], s, -np.inf)
        m = s.max(axis=-1, keepdims=True)
        p = np.exp(s - m)
        lse = (m + np.log(p.sum(axis=-1, keepdims=True)))[..., 0].T  # [new, Hq]
        return np.einsum("hqk,khd->qhd", p / p.sum(axis=-1, keepdims=True), values), lse

    def prefill(self, layer, ids, lens, q, k, v, **kw):
        outs, lses, start = [], [], 0
        for sid, n in zip(ids, lens):
            o, lse = self.append(layer, sid, q[start:start + n], k[start:start + n], v[start:start + n], **kw)
            outs.append(o)
            lses.append(lse)
            start += n
        return np.concatenate(outs), np.concatenate(lses)

    def decode(self, layer, ids, q, k, v, **kw):
        res = [self.append(layer, sid, q[i:i + 1], k[i:i + 1], v[i:i + 1], **kw) for i, sid in enumerate(ids)]
        return np.concatenate([o for o, _ in res]), np.concatenate([lse for _, lse in res])


def rows(rng, n, heads, dtype=np.float32):
    return rng.standard_normal((n, heads, D)).astype(dtype)


def make_cache(c, layers=2, capacity=512, dtype="float32", page_size=16):
    return c.create_kv_cache(layers=layers, kv_heads=HKV, head_dim=D, capacity_tokens=capacity, dtype=dtype,
                             page_size=page_size)


def test_lifecycle(server):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=3, capacity=100, page_size=8)
    assert info.handle and info.replica == server.address and info.device.startswith("cpu")
    assert info.config.layers == 3 and info.config.kv_heads == HKV and info.config.head_dim == D
    assert info.config.dtype == attn_pb2.D_TYPE_FLOAT32 and info.config.page_size == 8
    assert info.pages_total * 8 >= 100 and info.pages_used == 0 and info.bytes > 0
    described = c.describe_kv_cache(info.handle)
    assert described.handle == info.handle and described.sequence_count == 0
    listed = c.list_kv_caches()
    assert info.handle in [x.handle for x in listed.caches] and listed.used_bytes >= info.bytes
    assert c.kv_cache_replica(info.handle) == server.address
    assert c.delete_kv_cache(info.handle) == info.bytes
    assert c.kv_cache_replica(info.handle) == ""
    with pytest.raises(AttnError) as e:
        c.describe_kv_cache(info.handle)
    assert e.value.code == grpc.StatusCode.NOT_FOUND
    assert info.handle not in [x.handle for x in c.list_kv_caches().caches]


def test_prefill_then_decode_match_float64(server, rng):
    c = Client(server.address, timeout=30)
    layers = 2
    info = make_cache(c, layers=layers)
    ref = Reference(layers)
    try:
        ids, lens = ["a", "b", "c"], [5, 17, 1]
        for layer in range(layers):  # two chunks: the second extends sequences the first made
            for chunk in (lens, [3, 2, 4]):
                n = sum(chunk)
                q, k, v = rows(rng, n, HQ), rows(rng, n, HKV), rows(rng, n, HKV)
                r = c.prefill(info.handle, layer, ids, chunk, q, k, v, return_lse=True)
                o, lse = ref.prefill(layer, ids, chunk, q, k, v)
                assert r.output.shape == (n, HQ, D) and r.lse.shape == (n, HQ)
                assert rel_error(r.output, o) < 1e-5 and rel_error(r.lse, lse) < 1e-5
                assert r.timings.kernel.startswith("paged_prefill/") and r.timings.kernel_ns > 0
        assert r.lengths == [8, 19, 5]
        for step in range(3):
            for layer in range(layers):
                q, k, v = rows(rng, 3, HQ), rows(rng, 3, HKV), rows(rng, 3, HKV)
                r = c.decode(info.handle, layer, ["c", "a", "b"], q, k, v, return_lse=True, scale=0.3)
                o, lse = ref.decode(layer, ["c", "a", "b"], q, k, v, scale=0.3)
                assert r.output.shape == (3, HQ, D)
                assert rel_error(r.output, o) < 1e-5 and rel_error(r.lse, lse) < 1e-5
                assert r.lengths == [6 + step, 9 + step, 20 + step]
                assert r.timings.kernel.startswith("paged_decode/")
        # ReadKv gives back exactly what was appended, at every layer.
        for layer in range(layers):
            k, v = c.read_kv(info.handle, "b", layer, chunk_bytes=100)
            assert k.dtype == np.float32 and k.shape == (22, HKV, D)
            np.testing.assert_array_equal(k, ref.k[layer]["b"].astype(np.float32))
            np.testing.assert_array_equal(v, ref.v[layer]["b"].astype(np.float32))
        seqs = {s.id: list(s.lengths) for s in c.describe_kv_cache(info.handle).sequences}
        assert seqs == {"a": [11, 11], "b": [22, 22], "c": [8, 8]}
    finally:
        c.delete_kv_cache(info.handle)


def test_non_causal_prefill(server, rng):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=1)
    ref = Reference(1)
    try:
        q, k, v = rows(rng, 9, HQ), rows(rng, 9, HKV), rows(rng, 9, HKV)
        r = c.prefill(info.handle, 0, ["x", "y"], [4, 5], q, k, v, non_causal=True)
        o, _ = ref.prefill(0, ["x", "y"], [4, 5], q, k, v, causal=False)
        assert rel_error(r.output, o) < 1e-5
    finally:
        c.delete_kv_cache(info.handle)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_caches(server, rng, dtype):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=1, dtype=dtype)
    ref = Reference(1)
    wire = (lambda x: x.astype(np.float16)) if dtype == "float16" else to_bfloat16
    back = (lambda x: x.astype(np.float32)) if dtype == "float16" else (lambda x: x.to_float32())
    try:
        q, k, v = (wire(rows(rng, 12, h)) for h in (HQ, HKV, HKV))
        r = c.prefill(info.handle, 0, ["s"], [12], q, k, v)
        o, _ = ref.prefill(0, ["s"], [12], back(q), back(k), back(v))
        assert rel_error(back(r.output), o) < 2e-2
        q, k, v = (wire(rows(rng, 1, h)) for h in (HQ, HKV, HKV))
        r = c.decode(info.handle, 0, ["s"], q, k, v)
        o, _ = ref.decode(0, ["s"], back(q), back(k), back(v))
        assert rel_error(back(r.output), o) < 2e-2
        kk, _ = c.read_kv(info.handle, "s", 0)
        np.testing.assert_array_equal(back(kk)[-1], back(k)[0])
    finally:
        c.delete_kv_cache(info.handle)


def test_fork_shares_pages_and_diverges(server, rng):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=1, capacity=256, page_size=8)
    ref = Reference(1)
    try:
        q, k, v = rows(rng, 21, HQ), rows(rng, 21, HKV), rows(rng, 21, HKV)  # 2 full pages + 5 rows
        c.prefill(info.handle, 0, ["parent"], [21], q, k, v)
        ref.prefill(0, ["parent"], [21], q, k, v)
        fork = c.fork_sequence(info.handle, "parent", "child")
        assert fork.copied_pages == 1  # the partial last page
        assert fork.sequence.id == "child" and list(fork.sequence.lengths) == [21]
        assert fork.sequence.shared_pages == 2
        ref.k[0]["child"], ref.v[0]["child"] = ref.k[0]["parent"], ref.v[0]["parent"]
        for _ in range(4):  # different tokens from here on: each sees only its own
            q, k, v = rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV)
            r = c.decode(info.handle, 0, ["parent", "child"], q, k, v)
            o, _ = ref.decode(0, ["parent", "child"], q, k, v)
            assert rel_error(r.output, o) < 1e-5
        kc, _ = c.read_kv(info.handle, "child", 0)
        np.testing.assert_array_equal(kc, ref.k[0]["child"].astype(np.float32))
        used = c.describe_kv_cache(info.handle).pages_used
        assert used == 2 + 2 * 2  # the shared full pages, then each sequence's own (21 + 4 = 25 rows)
        with pytest.raises(AttnError) as e:
            c.fork_sequence(info.handle, "parent", "child")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "already exists" in e.value.message
        assert c.release_sequences(info.handle, ["parent"]) == 2  # shared pages stay with the child
        assert c.release_sequences(info.handle, ["child"]) == 4
        assert c.describe_kv_cache(info.handle).pages_used == 0
    finally:
        c.delete_kv_cache(info.handle)


def test_truncate_rolls_back_and_decoding_goes_on(server, rng):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=2, capacity=256, page_size=8)
    h = info.handle
    ref = Reference(2)
    try:
        for layer in range(2):  # 30 rows: 3 full pages + 6
            q, k, v = rows(rng, 30, HQ), rows(rng, 30, HKV), rows(rng, 30, HKV)
            c.prefill(h, layer, ["s"], [30], q, k, v)
            ref.prefill(layer, ["s"], [30], q, k, v)
        cut = c.truncate_sequence(h, "s", 13)
        assert cut.sequence.id == "s" and list(cut.sequence.lengths) == [13, 13]
        assert cut.sequence.pages == 2 and cut.freed_pages == 2 and cut.copied_pages == 0
        assert c.describe_kv_cache(h).pages_used == 2
        for layer in range(2):
            ref.k[layer]["s"], ref.v[layer]["s"] = ref.k[layer]["s"][:13], ref.v[layer]["s"][:13]
            kk, vv = c.read_kv(h, "s", layer)
            np.testing.assert_array_equal(kk, ref.k[layer]["s"].astype(np.float32))
            np.testing.assert_array_equal(vv, ref.v[layer]["s"].astype(np.float32))
        for _ in range(5):  # over the kept prefix and the new tokens only
            for layer in range(2):
                q, k, v = rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV)
                r = c.decode(h, layer, ["s"], q, k, v)
                o, _ = ref.decode(layer, ["s"], q, k, v)
                assert rel_error(r.output, o) < 1e-5
        assert r.lengths == [18]
        # Past the longest layer: INVALID_ARGUMENT naming length, nothing changed.
        before = c.describe_kv_cache(h)
        with pytest.raises(AttnError) as e:
            c.truncate_sequence(h, "s", 19)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "length" in e.value.message and "0..18" in e.value.message and "19" in e.value.message
        with pytest.raises(AttnError) as e:
            c.truncate_sequence(h, "nobody", 0)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "sequence_id" in e.value.message
        after = c.describe_kv_cache(h)
        assert list(after.sequences) == list(before.sequences) and after.pages_used == before.pages_used
        # To 0: the sequence stays, empty.
        assert c.truncate_sequence(h, "s", 0).freed_pages == 3
        described = c.describe_kv_cache(h)
        assert described.sequence_count == 1 and described.pages_used == 0
    finally:
        c.delete_kv_cache(h)


def test_float8_cache_reads_back_as_stored_and_dequantized(server, rng):
    c = Client(server.address, timeout=30)
    info = c.create_kv_cache(layers=1, kv_heads=HKV, head_dim=D, capacity_tokens=512, dtype="float16",
                             page_size=8, kv_storage="float8_e4m3")
    assert info.config.kv_storage == attn_pb2.D_TYPE_FLOAT8_E4M3
    try:
        q, k, v = (rows(rng, 13, h).astype(np.float16) for h in (HQ, HKV, HKV))
        k[2, 0, 3] = 200.0  # an outlier: its page's scale grows, the other page's does not
        r = c.prefill(info.handle, 0, ["s"], [13], q, k, v)
        stored = c.read_kv(info.handle, "s", 0, chunk_bytes=100)
        assert stored.k.dtype == np.uint8 and stored.k.shape == (13, HKV, D)
        assert stored.k_scales.shape == (2, HKV) and stored.page_size == 8
        assert stored.k_scales[0, 0] > stored.k_scales[1, 0]
        kd, vd = stored.dequantized()
        dk, dv = c.read_kv(info.handle, "s", 0, dequantize=True)
        assert dk.dtype == np.float16
        np.testing.assert_array_equal(kd.astype(np.float16), dk)
        np.testing.assert_array_equal(vd.astype(np.float16), dv)
        assert rel_error(kd, k.astype(np.float32)) < 0.05  # e4m3's step
        o, _ = Reference(1).prefill(0, ["s"], [13], q.astype(np.float32), kd, vd)
        assert rel_error(r.output.astype(np.float32), o) < 1e-2
    finally:
        c.delete_kv_cache(info.handle)


def test_errors_name_the_problem_and_change_nothing(server, rng):
    c = Client(server.address, timeout=30)
    info = make_cache(c, layers=2, capacity=32, page_size=16)
    h = info.handle
    try:
        q, k, v = rows(rng, 4, HQ), rows(rng, 4, HKV), rows(rng, 4, HKV)
        c.prefill(h, 0, ["a"], [4], q, k, v)

        def code_of(call, *args, **kw):
            with pytest.raises(AttnError) as e:
                call(*args, **kw)
            return e.value.code, e.value.message

        one = (rows(rng, 1, HQ), rows(rng, 1, HKV), rows(rng, 1, HKV))
        code, msg = code_of(c.decode, h, 0, ["nobody"], *one)
        assert code == grpc.StatusCode.NOT_FOUND and "nobody" in msg
        code, msg = code_of(c.decode, h, 2, ["a"], *one)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "layer" in msg
        code, msg = code_of(c.decode, h, 0, ["a"], one[0].astype(np.float16), one[1], one[2])
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "q.dtype" in msg
        code, msg = code_of(c.decode, h, 0, ["a"], rows(rng, 1, 3), one[1], one[2])  # 3 heads: not a multiple of 2
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        code, msg = code_of(c.prefill, h, 0, ["a", "b"], [1], *one)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "lens" in msg
        big = (rows(rng, 40, HQ), rows(rng, 40, HKV), rows(rng, 40, HKV))
        code, msg = code_of(c.prefill, h, 0, ["b"], [40], *big)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        code, msg = code_of(c.decode, "no-such-cache", 0, ["a"], *one)
        assert code == grpc.StatusCode.NOT_FOUND
        code, msg = code_of(c.read_kv, h, "nobody", 0)
        assert code == grpc.StatusCode.NOT_FOUND
        code, msg = code_of(c.release_sequences, h, ["a", "nobody"])
        assert code == grpc.StatusCode.NOT_FOUND
        code, msg = code_of(c.create_kv_cache, layers=0, kv_heads=HKV, head_dim=D, capacity_tokens=10)
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(ValueError):
            c.create_kv_cache(layers=1, kv_heads=1, head_dim=8, capacity_tokens=8, dtype="int8")
        with pytest.raises(TypeError):  # one id per character is never what was meant
            c.decode(h, 0, "a", *one)
        # None of the failed calls touched the cache.
        described = c.describe_kv_cache(h)
        assert {s.id: list(s.lengths) for s in described.sequences} == {"a": [4, 0]}
        k_read, _ = c.read_kv(h, "a", 0)
        np.testing.assert_array_equal(k_read, k)
    finally:
        c.delete_kv_cache(h)


def test_calls_follow_the_cache_to_its_replica(rng):
    """Two servers behind one round_robin target: caches land on both, and every call on a cache
    reaches the one holding it (a plain round_robin call reaches the other one half the time)."""
    servers = [Server(), Server()]
    try:
        addresses = [s.address for s in servers]
        target = "ipv4:" + ",".join(addresses)
        c = Client(target, timeout=30, load_balancing="round_robin")
        # round_robin spreads calls over the replicas it is connected to, and the second
        # connection may still be coming up: create until both hold caches (or time runs out).
        caches = [make_cache(c, layers=1) for _ in range(6)]
        give_up = time.monotonic() + 20
        while len({x.replica for x in caches}) < 2 and time.monotonic() < give_up:
            time.sleep(0.05)
            caches.append(make_cache(c, layers=1))
        assert {x.replica for x in caches} == set(addresses)
        for x in caches:
            assert c.kv_cache_replica(x.handle) == x.replica
        ref = Reference(1)
        for step in range(4):
            for x in caches:
                q, k, v = rows(rng, 2, HQ), rows(rng, 2, HKV), rows(rng, 2, HKV)
                if step == 0:
                    r = c.prefill(x.handle, 0, ["p", "q"], [1, 1], q, k, v)
                    o, _ = ref.prefill(0, [x.handle + "p", x.handle + "q"], [1, 1], q, k, v)
                else:
                    r = c.decode(x.handle, 0, ["p", "q"], q, k, v)
                    o, _ = ref.decode(0, [x.handle + "p", x.handle + "q"], q, k, v)
                assert rel_error(r.output, o) < 1e-5
                assert r.lengths == [step + 1, step + 1]
            for x in caches:
                assert c.describe_kv_cache(x.handle).sequence_count == 2
                np.testing.assert_array_equal(c.read_kv(x.handle, "q", 0)[0],
                                              ref.k[0][x.handle + "q"].astype(np.float32))

        # Without routing, the round_robin channel reaches the other replica for some calls.
        channel = grpc.insecure_channel(target, [("grpc.lb_policy_name", "round_robin")])
        stub = attn_pb2_grpc.AttnServiceStub(channel)
        codes = set()
        give_up = time.monotonic() + 20  # until both connections are up, as above
        while len(codes) < 2 and time.monotonic() < give_up:
            try:
                stub.DescribeKvCache(attn_pb2.DescribeKvCacheRequest(handle=caches[0].handle), timeout=30)
                codes.add(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.add(e.code())
        channel.close()
        assert codes == {grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND}

        # A client that did not make the cache: told where it lives, it reaches it.
        far = next(x for x in caches if x.replica == addresses[1])
        other = Client(addresses[0], timeout=30)
        with pytest.raises(AttnError) as e:
            other.describe_kv_cache(far.handle)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        other.set_kv_cache_replica(far.handle, far.replica)
        assert other.describe_kv_cache(far.handle).sequence_count == 2
        # list_kv_caches(replica) lists that server's caches, and teaches the routes.
        third = Client(addresses[0], timeout=30)
        listed = third.list_kv_caches(addresses[1])
        assert {x.handle for x in listed.caches} == {x.handle for x in caches if x.replica == addresses[1]}
        assert third.kv_cache_replica(far.handle) == addresses[1]
        assert third.read_kv(far.handle, "p", 0)[0].shape == (4, HKV, D)

        for x in caches:
            assert c.delete_kv_cache(x.handle) > 0
        for client in (c, other, third):
            client.close()
    finally:
        for s in servers:
            assert s.stop() == 0

"""Decode and prefill with out= / lse_out= in a shared-memory region (multiprocessing.shared_memory),
against the real attnd run with --shared-memory system: the same bits as the inline path, outputs
that are views of the region, refusals that append nothing, and a repeated exactly-once call that
writes the recorded outputs into the regions it names."""

from multiprocessing import shared_memory

import grpc
import numpy as np
import pytest

from attn_client import AttnError, Client
from conftest import Server

HKV, HQ, D = 2, 6, 16


@pytest.fixture(scope="module")
def shm_server():
    s = Server("--shared-memory", "system")
    yield s
    assert s.stop() == 0


@pytest.fixture
def block():
    shm = shared_memory.SharedMemory(create=True, size=4 << 20)
    yield shm
    shm.close()
    shm.unlink()


def poisoned(region, shape, dtype="float32"):
    """Room for an output, filled with NaN so that an element left unwritten cannot pass."""
    t = region.alloc(shape, dtype)
    t.array()[...] = np.nan
    return t


def lengths(c, cache):
    return {s.id: list(s.lengths) for s in c.describe_kv_cache(cache).sequences}


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_decode_and_prefill_out_equal_inline(shm_server, block, rng):
    with Client(shm_server.address, timeout=30) as c:
        region = c.register_shared_memory("kv", block)
        ref = c.create_kv_cache(layers=1, kv_heads=HKV, head_dim=D, capacity_tokens=256).handle
        cache = c.create_kv_cache(layers=1, kv_heads=HKV, head_dim=D, capacity_tokens=256).handle
        ids, lens = ["a", "b", "c"], [1, 7, 33]
        q, k, v = rand(rng, 41, HQ, D), rand(rng, 41, HKV, D), rand(rng, 41, HKV, D)
        want = c.prefill(ref, 0, ids, lens, q, k, v, return_lse=True)
        out, lse_out = poisoned(region, (41, HQ, D)), poisoned(region, (41, HQ))
        got = c.prefill(cache, 0, ids, lens, region.put(q), region.put(k), region.put(v),
                        return_lse=True, out=out, lse_out=lse_out)
        assert np.array_equal(got.output, want.output) and np.array_equal(got.lse, want.lse)
        # The outputs are views of the shared memory: nothing came back over gRPC.
        whole = np.ndarray((block.size,), np.uint8, buffer=block.buf)
        assert np.shares_memory(got.output, whole) and np.shares_memory(got.lse, whole)
        assert got.lengths == want.lengths == [1, 7, 33]
        for step in range(3):
            q, k, v = rand(rng, 3, HQ, D), rand(rng, 3, HKV, D), rand(rng, 3, HKV, D)
            want = c.decode(ref, 0, ids, q, k, v, return_lse=True)
            out = poisoned(region, (3, HQ, D))
            lse_out = poisoned(region, (3, HQ)) if step != 1 else None  # step 1: the LSE inline
            got = c.decode(cache, 0, ids, q, k, v, return_lse=True, out=out, lse_out=lse_out)
            assert np.array_equal(got.output, want.output)
            assert np.array_equal(got.lse, want.lse)
            assert np.shares_memory(got.lse, whole) == (lse_out is not None)
        assert lengths(c, cache) == lengths(c, ref)


def test_bad_out_appends_nothing(shm_server, block, rng):
    from attn_client import ShmTensor
    with Client(shm_server.address, timeout=30) as c:
        region = c.register_shared_memory("small", block, size=4096)
        cache = c.create_kv_cache(layers=1, kv_heads=HKV, head_dim=D, capacity_tokens=64).handle
        c.prefill(cache, 0, ["s"], [5], rand(rng, 5, HQ, D), rand(rng, 5, HKV, D), rand(rng, 5, HKV, D))
        before = lengths(c, cache)
        q, k, v = rand(rng, 1, HQ, D), rand(rng, 1, HKV, D), rand(rng, 1, HKV, D)
        past = ShmTensor(region, 4096 - 64, (1, HQ, D), "float32")  # 384 bytes: past the end
        with pytest.raises(AttnError) as e:
            c.decode(cache, 0, ["s"], q, k, v, out=past)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "output_shm (o)" in e.value.message and "384 bytes from offset 4032" in e.value.message
        out = region.alloc((1, HQ, D))
        c.unregister_shared_memory("small")  # forgotten before the call
        with pytest.raises(AttnError) as e:
            c.decode(cache, 0, ["s"], q, k, v, out=out, expected_lengths=[5])
        assert e.value.code == grpc.StatusCode.NOT_FOUND and '"small"' in e.value.message
        with pytest.raises(AttnError) as e:
            c.prefill(cache, 0, ["s", "new"], [1, 1], rand(rng, 2, HQ, D), rand(rng, 2, HKV, D),
                      rand(rng, 2, HKV, D), out=region.tensor(0, (2, HQ, D)))
        assert e.value.code == grpc.StatusCode.NOT_FOUND and "output_shm (o)" in e.value.message
        assert lengths(c, cache) == before


def test_repeat_writes_recorded_outputs_into_out(shm_server, block, rng):
    with Client(shm_server.address, timeout=30) as c:
        region = c.register_shared_memory("io", block)
        cache = c.create_kv_cache(layers=1, kv_heads=HKV, head_dim=D, capacity_tokens=64,
                                  dtype="float16").handle
        q, k, v = (rng.standard_normal((7, h, D)).astype(np.float16) for h in (HQ, HKV, HKV))
        first = c.prefill(cache, 0, ["s"], [7], q, k, v, return_lse=True, expected_lengths=[0],
                          out=poisoned(region, (7, HQ, D), "float16"), lse_out=poisoned(region, (7, HQ)))
        assert not first.replayed
        again = c.prefill(cache, 0, ["s"], [7], q, k, v, return_lse=True, expected_lengths=[0],
                          out=poisoned(region, (7, HQ, D), "float16"), lse_out=poisoned(region, (7, HQ)))
        assert again.replayed
        assert np.array_equal(again.output.view(np.uint16), first.output.view(np.uint16))
        assert np.array_equal(again.lse.view(np.uint32), first.lse.view(np.uint32))
        assert lengths(c, cache) == {"s": [7]}

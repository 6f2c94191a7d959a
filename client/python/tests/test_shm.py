"""Shared memory from Python: numpy arrays on multiprocessing.shared_memory, against the real
attnd run with --shared-memory system."""

from multiprocessing import shared_memory

import numpy as np
import pytest

from attn_client import AttnError, Client, to_bfloat16
from conftest import Server


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


def test_attention_through_shared_memory_equals_inline(shm_server, block, rng):
    with Client(shm_server.address) as c:
        region = c.register_shared_memory("io", block)
        q, k, v = (rng.standard_normal((1, 4, 128, 64)).astype(np.float32) for _ in range(3))
        tq, tk, tv = region.put(q), region.put(k), region.put(v)
        out = region.alloc(q.shape)
        r = c.attention(tq, tk, tv, causal=True, out=out)
        ref = c.attention(q, k, v, causal=True)
        assert isinstance(r.output, np.ndarray)
        assert np.array_equal(r.output, ref.output)
        # The output is a view of the shared memory: no copy came back over gRPC.
        assert np.shares_memory(r.output, np.ndarray((block.size,), np.uint8, buffer=block.buf))
        # bfloat16 inputs, output inline.
        b = [to_bfloat16(x) for x in (q, k, v)]
        tb = [region.put(x) for x in b]
        rb = c.attention(*tb, causal=True)
        assert np.array_equal(rb.output.bits, c.attention(*b, causal=True).output.bits)
        status = c.shared_memory_status()
        assert [r.name for r in status.regions] == ["io"]
        assert c.unregister_shared_memory("io") == 1


def test_bad_references_and_flag_off(shm_server, server, block, rng):
    import grpc
    from attn_client import ShmTensor
    with Client(shm_server.address) as c:
        region = c.register_shared_memory("r", block, size=1 << 20)
        x = region.put(rng.standard_normal((16, 16)).astype(np.float32))
        assert np.array_equal(c.softmax(x).output, c.softmax(x.array().copy()).output)
        with pytest.raises(ValueError):
            region.tensor(1 << 20, (1,))  # the client checks what it can
        past = ShmTensor(region, (1 << 20) - 8, (4,), "float32")  # the server checks the rest
        with pytest.raises(AttnError) as e:
            c.softmax(past)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "x.shm" in e.value.message
        assert c.unregister_shared_memory() == 1
        with pytest.raises(AttnError) as e:
            c.softmax(x)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and '"r"' in e.value.message
    with Client(server.address) as c:
        with pytest.raises(AttnError) as e:
            c.register_shared_memory("r", block)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--shared-memory" in e.value.message

"""CUDA IPC from Python: torch CUDA tensors registered through their IPC handles, against the real
attnd run with --backend cuda --shared-memory system,cuda. Skips without torch, without a GPU, or
with an attnd that has no CUDA backend."""

import warnings

import grpc
import numpy as np
import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device", allow_module_level=True)

from attn.v1 import attn_pb2  # noqa: E402 (after the skips: nothing below runs without torch)
from attn_client import AttnError, BFloat16, Client, CudaTensor  # noqa: E402
from attn_client.client import _CudaIpcShare  # noqa: E402
from conftest import Server  # noqa: E402
from test_client import attention64, rel_error  # noqa: E402


@pytest.fixture(scope="module")
def cuda_server():
    try:
        # CUDA start-up and kernel warm-up come first
        s = Server("--shared-memory", "system,cuda", backend="cuda", start_s=120)
    except RuntimeError as e:
        if "--backend cuda" in str(e):  # a build without the CUDA backend, or no GPU it can use
            pytest.skip(f"attnd has no CUDA backend here: {e}")
        raise
    with Client(s.address, timeout=60) as c:
        backend = c.server_info().backend
    if backend != "cuda":
        s.stop()
        pytest.skip(f"attnd serves on {backend!r}, not cuda")
    yield s
    assert s.stop() == 0


def bf16_bits(x) -> BFloat16:
    """A torch bfloat16 tensor as the client's BFloat16 (the same bits, in numpy)."""
    return BFloat16(x.contiguous().view(torch.int16).cpu().numpy().view(np.uint16))


def torch_rel_error(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def allocation_bytes(t) -> int:
    """The size of the cudaMalloc block (torch's caching-allocator segment) holding `t`: what its
    IPC handle exports."""
    for seg in torch.cuda.memory_snapshot():
        if seg["device"] == t.device.index and seg["address"] <= t.data_ptr() < seg["address"] + seg["total_size"]:
            return seg["total_size"]
    raise AssertionError("no caching-allocator segment holds the tensor")


def test_attention_bf16_through_a_cuda_region_equals_inline(cuda_server):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 256, 64, device="cuda").to(torch.bfloat16) for _ in range(3))
    block = torch.empty(2 << 20, dtype=torch.uint8, device="cuda")
    with Client(cuda_server.address, timeout=60) as c:
        region = c.register_cuda_tensor("io", block)
        tq, tk, tv = region.put(q), region.put(k), region.put(v)
        out = region.alloc(q.shape, "bfloat16")
        lse_out = region.alloc(q.shape[:3], "float32")
        out.torch().fill_(float("nan"))  # poisoned: only what the server writes passes
        lse_out.torch().fill_(float("nan"))
        r = c.attention(tq, tk, tv, causal=True, return_lse=True, out=out, lse_out=lse_out)
        # The output is a view of the region: nothing came back over gRPC.
        assert isinstance(r.output, torch.Tensor) and r.output.dtype == torch.bfloat16
        assert r.output.shape == q.shape and r.output.data_ptr() == out.torch().data_ptr()

        inline = c.attention(*(bf16_bits(x) for x in (q, k, v)), causal=True, return_lse=True)
        want_bits = torch.from_numpy(inline.output.bits.view(np.int16)).cuda()
        assert torch.equal(r.output.view(torch.int16), want_bits)
        assert torch.equal(r.lse, torch.from_numpy(inline.lse).cuda())
        o64, _ = attention64(*(x.float().cpu().numpy() for x in (q, k, v)), True, 1 / np.sqrt(64))
        assert rel_error(r.output.float().cpu().numpy(), o64) < 1e-2

        (info,) = c.shared_memory_status("io").regions
        assert info.kind == attn_pb2.SHARED_MEMORY_KIND_CUDA and info.device_id == block.device.index
        assert info.bytes == block.nbytes
        region.unregister()
        assert len(c.shared_memory_status().regions) == 0


def test_two_regions_out_of_one_allocator_block(cuda_server):
    # Small tensors made back to back usually come out of one 2 MiB cudaMalloc block of torch's
    # caching allocator: two regions then name one IPC handle at different offsets.
    a = torch.empty(64 << 10, dtype=torch.uint8, device="cuda")
    b = torch.empty(64 << 10, dtype=torch.uint8, device="cuda")
    torch.manual_seed(2)
    x, y = torch.randn(16, 256, device="cuda"), torch.randn(16, 256, device="cuda")
    with Client(cuda_server.address, timeout=60) as c:
        ra, rb = c.register_cuda_tensor("a", a), c.register_cuda_tensor("b", b)
        if ra._share.handle != rb._share.handle:
            warnings.warn("the two tensors came from different cudaMalloc blocks: one handle per region")
        for region in (ra, rb):
            r = c.softmax(region.put(x), out=region.alloc(x.shape))
            assert torch_rel_error(r.output, torch.softmax(x.double(), dim=-1)) < 1e-5
        # Unregistering one leaves the other's mapping open.
        ra.unregister()
        r = c.softmax(rb.put(y), out=rb.alloc(y.shape))
        assert torch_rel_error(r.output, torch.softmax(y.double(), dim=-1)) < 1e-5
        r = c.softmax(rb.tensor(0, x.shape))  # put before the other went; output inline
        assert rel_error(r.output, torch.softmax(x.double(), dim=-1).cpu().numpy()) < 1e-5
        rb.unregister()


def test_bad_registrations_and_references(cuda_server):
    t = torch.zeros(1024, dtype=torch.float32, device="cuda")
    with Client(cuda_server.address, timeout=60) as c:
        share = _CudaIpcShare(t)
        try:
            def register(name, **fields):
                req = attn_pb2.RegisterSharedMemoryRequest(
                    name=name, kind=attn_pb2.SHARED_MEMORY_KIND_CUDA, cuda_ipc_handle=share.handle,
                    device_id=share.device_id, offset=share.offset, bytes=share.bytes)
                for field, value in fields.items():
                    setattr(req, field, value)
                return c._call(c._stub.RegisterSharedMemory, req)

            # The handle exports the whole block: all of it fits, one byte more does not (torch's
            # blocks are 2 MiB multiples, which the driver does not sub-allocate).
            whole = allocation_bytes(t)
            register("whole", offset=0, bytes=whole)
            assert c.unregister_shared_memory("whole") == 1
            for offset, size in ((0, whole + 1), (share.offset, 1 << 40)):
                with pytest.raises(AttnError) as e:
                    register("past", offset=offset, bytes=size)
                assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "offset, bytes" in e.value.message
            with pytest.raises(AttnError) as e:
                register("elsewhere", device_id=torch.cuda.device_count())  # a device nobody serves
            assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "device_id" in e.value.message
        finally:
            share.release()

        region = c.register_cuda_tensor("r", t)
        x = region.put(torch.randn(4, 64, device="cuda"))
        assert c.softmax(x).output.shape == (4, 64)
        region.unregister()
        with pytest.raises(AttnError) as e:
            c.softmax(x)
        assert e.value.code == grpc.StatusCode.NOT_FOUND and '"r"' in e.value.message
        with pytest.raises(AttnError) as e:
            c.softmax(CudaTensor(region, 0, (4, 64), "float32"), out=CudaTensor(region, 1024, (4, 64), "float32"))
        assert e.value.code == grpc.StatusCode.NOT_FOUND

        with pytest.raises(TypeError, match="CUDA"):
            c.register_cuda_tensor("cpu", torch.zeros(16))
        with pytest.raises(TypeError, match="contiguous"):
            c.register_cuda_tensor("strided", torch.zeros(8, 8, device="cuda").t())
        with pytest.raises(TypeError):
            c.register_cuda_tensor("numpy", np.zeros(16, np.float32))
        assert len(c.shared_memory_status().regions) == 0


def test_matmul_float32_through_a_cuda_region_equals_inline(cuda_server):
    torch.manual_seed(3)
    a, b = torch.randn(3, 64, 96, device="cuda"), torch.randn(3, 96, 80, device="cuda")
    block = torch.empty(1 << 20, dtype=torch.uint8, device="cuda")
    with Client(cuda_server.address, timeout=60) as c:
        region = c.register_cuda_tensor("mm", block)
        ta, tb = region.put(a), region.put(b)
        out = region.alloc((3, 64, 80))
        out.torch().fill_(float("nan"))
        r = c.matmul(ta, tb, out=out)
        assert isinstance(r.output, torch.Tensor) and r.output.dtype == torch.float32
        inline = c.matmul(a.cpu().numpy(), b.cpu().numpy())
        assert rel_error(r.output.cpu().numpy(), inline.output.astype(np.float64)) < 1e-5
        region.unregister()

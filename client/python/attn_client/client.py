"""attn_client.Client: the attn.v1.AttnService ops with numpy in and out."""

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Optional

import json
import random
import threading
import time

import grpc
import numpy as np

from attn.v1 import attn_pb2, attn_pb2_grpc

from .tensors import BFloat16, decode, encode

def retry_service_config() -> str:
    """The gRPC service config of every channel, from what the proto declares of each method.

    A method whose MethodTraits say it changes no state is a pure function of its request: a call
    that never reached a server (a replica that went away) is safe to send again, so small calls
    are retried on UNAVAILABLE. A method that changes state (Decode appends a token) is not: an
    UNAVAILABLE may come after the server applied it (a reset connection), and gRPC cannot tell a
    second Decode from a new one; such calls get gRPC's transparent retries only (calls sent
    nowhere yet). Client.decode/prefill resend the calls that carry expected_lengths themselves
    (the server answers a repeat of an applied call without appending again: see KvRetry). No list
    of methods is written here: the proto is the one place."""
    service = attn_pb2.DESCRIPTOR.services_by_name["AttnService"]
    once = [{"service": service.full_name, "method": m.name} for m in service.methods
            if m.GetOptions().Extensions[attn_pb2.method_traits].changes_state]
    configs = [{"name": [{"service": service.full_name}],
                "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                                "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]
    if once:
        configs.append({"name": once})
    return json.dumps({"methodConfig": configs})


_SERVICE_CONFIG = retry_service_config()

_DTYPES = {"float32": attn_pb2.D_TYPE_FLOAT32, "float16": attn_pb2.D_TYPE_FLOAT16,
           "bfloat16": attn_pb2.D_TYPE_BFLOAT16}
_DTYPE_ALIASES = {"f32": "float32", "fp32": "float32", "f16": "float16", "fp16": "float16", "half": "float16",
                  "bf16": "bfloat16"}


def _sequence_ids(ids) -> list:
    """A list of sequence ids; a lone string would otherwise become one id per character."""
    if isinstance(ids, (str, bytes)):
        raise TypeError(f"sequence_ids: expected a list of ids, got the string {ids!r}")
    return list(ids)


class AttnError(Exception):
    """A call the server refused or could not run: the gRPC code and the server's message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class Timings:
    """The server's account of one call (nanoseconds, FLOPs and bytes the op moves)."""

    kernel: str
    device: str
    queue_ns: int
    h2d_ns: int
    kernel_ns: int
    d2h_ns: int
    total_ns: int
    flops: int
    bytes: int
    batched_calls: int = 1  # calls that shared this call's kernel launch (dynamic batching)

    @classmethod
    def from_proto(cls, t: attn_pb2.Timings) -> "Timings":
        return cls(t.kernel, t.device, t.queue_ns, t.h2d_ns, t.kernel_ns, t.d2h_ns, t.total_ns,
                   t.flops, t.bytes, t.batched_calls)


@dataclass
class KvResult:
    """A Decode or Prefill result: o [rows, Hq, D], each sequence's length at that layer after the
    call, the server's timings, and the log-sum-exp float32 [rows, Hq] when asked for."""

    output: object  # numpy array, or BFloat16; a view of out= when given (torch for a CudaTensor)
    lengths: list
    timings: Timings
    lse: Optional[np.ndarray] = None
    replayed: bool = False  # the server answered a repeat of a call it had applied
    attempts: int = 1  # times the call was sent


@dataclass
class KvRetry:
    """How decode/prefill calls that carry expected_lengths (exactly-once on the server) are sent
    again when their outcome is unknown: on UNAVAILABLE and on DEADLINE_EXCEEDED of their own
    attempt's deadline (the client's `timeout`, per attempt), up to max_attempts in all, waiting
    initial_backoff seconds, then `multiplier` times longer each time up to max_backoff (each wait
    jittered to between half and all of it). With a timeout, an attempt waits for the channel to
    reconnect within it instead of failing at once. Other errors (FAILED_PRECONDITION: the cache is not
    where the call expected it) are raised at once. Calls without expected_lengths are never
    resent."""

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0


def _e4m3_table():
    """The value of every float8 e4m3 (OCP E4M3FN) code: bias 7, no infinities, 0x7f/0xff NaN."""
    c = np.arange(256)
    e, m = (c >> 3) & 15, (c & 7).astype(np.float64)
    mag = np.where(e == 0, m / 8 * 2.0 ** -6, (1 + m / 8) * 2.0 ** (e - 7))
    mag[(c & 0x7f) == 0x7f] = np.nan
    return np.where(c & 0x80, -mag, mag).astype(np.float32)


_E4M3 = _e4m3_table()


@dataclass
class Fp8Kv:
    """A float8 cache's K and V as stored: e4m3 codes (uint8 [len, Hkv, D]) and float32 scales
    [ceil(len / page_size), Hkv]; token t of head h is e4m3(code) * scales[t // page_size, h]."""
    k: np.ndarray
    v: np.ndarray
    k_scales: np.ndarray
    v_scales: np.ndarray
    page_size: int

    def dequantized(self):
        """(K, V) as float32 [len, Hkv, D]."""
        rows = np.arange(self.k.shape[0]) // max(self.page_size, 1)
        return tuple(_E4M3[codes] * scales[rows][:, :, None]
                     for codes, scales in ((self.k, self.k_scales), (self.v, self.v_scales)))


@dataclass
class Resident:
    """An op input given by the handle of a resident tensor."""

    handle: str


@dataclass
class Result:
    output: object  # numpy array, or BFloat16; a torch tensor when out= was a CudaTensor
    timings: Timings
    lse: Optional[np.ndarray] = None  # attention with return_lse


_NUMPY_OF = {attn_pb2.D_TYPE_FLOAT32: np.dtype("<f4"), attn_pb2.D_TYPE_FLOAT16: np.dtype("<f2"),
             attn_pb2.D_TYPE_BFLOAT16: np.dtype("<u2")}


class _RegionTensor:
    """What ShmTensor and CudaTensor share: a tensor named by its region, offset, shape and dtype."""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * _NUMPY_OF[_DTYPES[self.dtype]].itemsize

    def ref(self) -> attn_pb2.SharedMemoryRef:
        return attn_pb2.SharedMemoryRef(region=self.region.name, offset=self.offset, bytes=self.nbytes)

    def proto(self) -> attn_pb2.Tensor:
        return attn_pb2.Tensor(dtype=_DTYPES[self.dtype], shape=list(self.shape), shm=self.ref())


@dataclass
class ShmTensor(_RegionTensor):
    """A tensor in a registered shared-memory region: an op input (instead of an array) or where
    an op writes its output (`out=`). Made by SharedMemoryRegion.put / .tensor."""

    region: "SharedMemoryRegion"
    offset: int
    shape: tuple
    dtype: str  # "float32", "float16" or "bfloat16"

    def array(self):
        """The tensor's bytes as a numpy view into the shared memory (a BFloat16 for bfloat16)."""
        np_dtype = _NUMPY_OF[_DTYPES[self.dtype]]
        a = np.ndarray(self.shape, dtype=np_dtype, buffer=self.region.shm.buf,
                       offset=self.region.offset + self.offset)
        return BFloat16(a) if self.dtype == "bfloat16" else a


@dataclass
class CudaTensor(_RegionTensor):
    """A tensor in a registered CUDA region: an op input or where an op writes its output
    (`out=`), as ShmTensor is for system shared memory. Made by CudaRegion.put / .alloc / .tensor."""

    region: "CudaRegion"
    offset: int
    shape: tuple
    dtype: str  # "float32", "float16" or "bfloat16"

    def torch(self):
        """The tensor's bytes as a torch view into the region's CUDA tensor."""
        import torch

        dtype = getattr(torch, self.dtype)  # torch.float32, torch.float16 or torch.bfloat16
        return self.region._bytes[self.offset:self.offset + self.nbytes].view(dtype).reshape(self.shape)


class _Region:
    """Room in a registered region, handed out front to back (put, alloc) or by offset (tensor)."""

    _align = 64

    def _make(self, offset: int, shape, dtype: str):
        raise NotImplementedError

    def tensor(self, offset: int, shape, dtype="float32"):
        """A tensor at `offset` (from the region's start) of `shape` and `dtype`."""
        dtype = _DTYPE_ALIASES.get(dtype, dtype)
        t = self._make(int(offset), tuple(int(d) for d in shape), dtype)
        if t.offset < 0 or t.offset + t.nbytes > self.size:
            raise ValueError(f"{t.nbytes} bytes at offset {offset} do not fit in region {self.name!r} of {self.size}")
        return t

    def _after(self, t) -> int:
        return (t.offset + t.nbytes + self._align - 1) // self._align * self._align

    def alloc(self, shape, dtype="float32"):
        """Room for an output after the last tensor put or allocated."""
        t = self.tensor(self._next, shape, dtype)
        self._next = self._after(t)
        return t


class SharedMemoryRegion(_Region):
    """Bytes of a multiprocessing.shared_memory.SharedMemory registered with a server on this host
    (run with --shared-memory system): arrays put here travel to ops at memory speed, and ops may
    write their outputs here. Client.register_shared_memory makes one."""

    def __init__(self, client: "Client", name: str, shm, offset: int, size: int):
        self.client, self.name, self.shm, self.offset, self.size = client, name, shm, offset, size
        self._next = 0

    def _make(self, offset, shape, dtype) -> ShmTensor:
        return ShmTensor(self, offset, shape, dtype)

    def put(self, x, offset: Optional[int] = None) -> ShmTensor:
        """Copies an array (float32/float16 numpy, or BFloat16) into the region, after the last one
        put unless `offset` is given (64-byte aligned); returns its ShmTensor."""
        if isinstance(x, BFloat16):
            a, dtype = np.ascontiguousarray(x.bits, dtype="<u2"), "bfloat16"
        else:
            a = np.asarray(x)
            dtype = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(a.dtype)
            if dtype is None:
                raise TypeError(f"expected a float32 or float16 array or a BFloat16, got dtype {a.dtype}")
        at = self._next if offset is None else int(offset)
        t = self.tensor(at, a.shape, dtype)
        dst = t.array()
        np.copyto(dst.bits if isinstance(dst, BFloat16) else dst, a.reshape(a.shape))
        self._next = max(self._next, self._after(t))
        return t

    def unregister(self):
        self.client.unregister_shared_memory(self.name)


class _CudaIpcShare:
    """A tensor's bytes as torch's _share_cuda_ exports them: the CUDA IPC handle of the cudaMalloc
    block holding them, and where they lie in it. torch counts the share as a consumer of the
    block: while it holds, a freed tensor's memory stays out of reuse (the server may still write
    there), so release() comes after the server let go of the region."""

    def __init__(self, tensor):
        import torch

        if not isinstance(tensor, torch.Tensor) or not tensor.is_cuda:
            what = f"a {tensor.device} tensor" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"expected a torch CUDA tensor, got {what}")
        if not tensor.is_contiguous():
            raise TypeError("expected a contiguous CUDA tensor (its bytes are the region); call .contiguous()")
        if tensor.nbytes == 0:
            raise ValueError("expected a CUDA tensor of at least one byte, got an empty one")
        # The tuple torch/multiprocessing/reductions.py (reduce_tensor) unpacks.
        (_device, handle, _storage_bytes, storage_offset_bytes, ref_counter, ref_counter_offset,
         _event, _event_sync_required) = tensor.untyped_storage()._share_cuda_()
        self._ref_counter = (ref_counter, ref_counter_offset)
        self.device_id = tensor.device.index
        self.offset = storage_offset_bytes + tensor.storage_offset() * tensor.element_size()
        self.bytes = tensor.nbytes
        # Older torch gives the cudaIpcMemHandle_t bare; newer puts a version byte and a kind before
        # it: 'c' for a cudaMalloc block, 'e' for an expandable segment (not a cudaIpc handle).
        if len(handle) == _CUDA_IPC_HANDLE_BYTES:
            self.handle = handle
        elif len(handle) == _CUDA_IPC_HANDLE_BYTES + 2 and handle[1:2] == b"c":
            self.handle = handle[2:]
        else:
            self.release()
            raise ValueError("the tensor's memory cannot be shared through a CUDA IPC handle (torch gave a "
                             f"{handle[1:2]!r} handle of {len(handle)} bytes): allocate it with "
                             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:False")

    def release(self):
        if self._ref_counter is not None:
            import torch

            torch.UntypedStorage._release_ipc_counter_cuda(*self._ref_counter)
            self._ref_counter = None


_CUDA_IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)


class CudaRegion(_Region):
    """Bytes of a torch CUDA tensor registered with a server on this GPU host (run with
    --shared-memory cuda) through its CUDA IPC handle: ops read inputs put here and write their
    outputs here in place, device to device. Client.register_cuda_tensor makes one; it keeps the
    tensor (`base`) alive."""

    _align = 256

    def __init__(self, client: "Client", name: str, base, offset: int, size: int, share: _CudaIpcShare):
        import torch

        self.client, self.name, self.base, self.offset, self.size = client, name, base, offset, size
        self._share = share
        self._bytes = base.detach().view(-1).view(torch.uint8)  # CudaTensor.torch slices these
        self._next = 0

    def _make(self, offset, shape, dtype) -> CudaTensor:
        return CudaTensor(self, offset, shape, dtype)

    def put(self, x, offset: Optional[int] = None) -> CudaTensor:
        """Copies a torch tensor (float32, float16 or bfloat16; on a GPU, or copied there) into the
        region, after the last one put unless `offset` is given (256-byte aligned); returns its
        CudaTensor. The copy is queued on torch's current stream; an op call waits for it."""
        import torch

        dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(
            getattr(x, "dtype", None))
        if not isinstance(x, torch.Tensor) or dtype is None:
            raise TypeError(f"expected a float32, float16 or bfloat16 torch tensor, got {getattr(x, 'dtype', type(x))}")
        at = self._next if offset is None else int(offset)
        t = self.tensor(at, x.shape, dtype)
        t.torch().copy_(x)
        self._next = max(self._next, self._after(t))
        return t

    def unregister(self):
        """Unregisters the region; torch may then reuse the tensor's memory once it is freed."""
        self.client.unregister_shared_memory(self.name)
        self._share.release()


def _synchronize_cuda(*tensors):
    """Waits for the work queued on the GPU of each CudaTensor among `tensors`: the server reads
    and writes those bytes on streams of its own, unordered with this process's, so what a put
    copied or a fill wrote there must have landed first."""
    devices = {t.region.base.device for t in tensors if isinstance(t, CudaTensor)}
    if devices:
        import torch

        for device in devices:
            torch.cuda.synchronize(device)


def _input(x) -> attn_pb2.Tensor:
    if isinstance(x, Resident):
        return attn_pb2.Tensor(handle=x.handle)
    if isinstance(x, _RegionTensor):
        return x.proto()
    return encode(x)


def _sinks(sinks) -> attn_pb2.Tensor:
    """Attention sinks as a float32 tensor message (any float array, or a Resident)."""
    if isinstance(sinks, (Resident, _RegionTensor)):
        return _input(sinks)
    return encode(np.ascontiguousarray(sinks, dtype=np.float32))


def _mask_options(req, window_left=None, window_right=None, softcap=0.0, sinks=None):
    if window_left is not None:
        req.window_left = window_left
    if window_right is not None:
        req.window_right = window_right
    req.softcap = softcap
    if sinks is not None:
        req.sinks.CopyFrom(_sinks(sinks))


def _output(t: attn_pb2.Tensor, out=None):
    if out is not None and t.HasField("shm"):
        return out.torch() if isinstance(out, CudaTensor) else out.array()
    return Resident(t.handle) if t.handle else decode(t)


def _output_refs(*outs):
    refs = [o.ref() if o is not None else attn_pb2.SharedMemoryRef() for o in outs]
    while refs and not refs[-1].region:
        refs.pop()
    return refs


# What the blocking, the future-returning and the asyncio KV calls share: the requests, the
# results, the retry schedule and the routing of calls to each cache's replica.

def _decode_request(cache, layer, sequence_ids, q, k_new, v_new, *, scale=0.0, return_lse=False,
                    kernel="", window_left=None, softcap=0.0, sinks=None, expected_lengths=None,
                    out=None, lse_out=None) -> attn_pb2.DecodeRequest:
    _synchronize_cuda(q, k_new, v_new, out, lse_out)
    req = attn_pb2.DecodeRequest(cache=cache, layer=layer, sequence_ids=_sequence_ids(sequence_ids),
                                 q=_input(q), k_new=_input(k_new), v_new=_input(v_new),
                                 scale=scale, return_lse=return_lse, kernel=kernel,
                                 output_shm=_output_refs(out, lse_out))
    _mask_options(req, window_left, None, softcap, sinks)
    if expected_lengths is not None:
        req.expected_lengths.extend(int(n) for n in expected_lengths)
    return req


def _prefill_request(cache, layer, sequence_ids, lens, q, k, v, *, non_causal=False, scale=0.0,
                     return_lse=False, kernel="", window_left=None, window_right=None, softcap=0.0,
                     sinks=None, expected_lengths=None, out=None, lse_out=None) -> attn_pb2.PrefillRequest:
    _synchronize_cuda(q, k, v, out, lse_out)
    req = attn_pb2.PrefillRequest(cache=cache, layer=layer, sequence_ids=_sequence_ids(sequence_ids),
                                  lens=[int(n) for n in lens], q=_input(q), k=_input(k),
                                  v=_input(v), non_causal=non_causal, scale=scale,
                                  return_lse=return_lse, kernel=kernel,
                                  output_shm=_output_refs(out, lse_out))
    _mask_options(req, window_left, window_right, softcap, sinks)
    if expected_lengths is not None:
        req.expected_lengths.extend(int(n) for n in expected_lengths)
    return req


def _kv_result(request, resp, attempts, out=None, lse_out=None) -> "KvResult":
    """A Decode or Prefill response as a KvResult (the LSE when the request asked for it)."""
    lse = _output(resp.lse, lse_out) if request.return_lse else None
    return KvResult(_output(resp.o, out), list(resp.lengths), Timings.from_proto(resp.timings), lse,
                    resp.replayed, attempts)


def _kv_cache_request(*, layers, kv_heads, head_dim, capacity_tokens, dtype="float32", page_size=0,
                      ttl_ms=0, device="", kv_storage="", k_scales=None,
                      v_scales=None) -> attn_pb2.CreateKvCacheRequest:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else _DTYPE_ALIASES.get(dtype, dtype)
    if name not in _DTYPES:
        raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype!r}")
    config = attn_pb2.KvCacheConfig(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                    dtype=_DTYPES[name], page_size=page_size,
                                    capacity_tokens=capacity_tokens)
    if kv_storage:
        if kv_storage not in ("float8_e4m3", "fp8", "e4m3"):
            raise ValueError(f"kv_storage: expected float8_e4m3 or empty, got {kv_storage!r}")
        config.kv_storage = attn_pb2.D_TYPE_FLOAT8_E4M3
    for field, scales in (("k_scales", k_scales), ("v_scales", v_scales)):
        if scales is not None:
            getattr(config, field).extend(float(x) for x in np.asarray(scales, dtype=np.float32).ravel())
    return attn_pb2.CreateKvCacheRequest(config=config, ttl_ms=ttl_ms, device=device)


class _KvAttempts:
    """How one Decode or Prefill is sent, and sent again (KvRetry): a call that carries
    expected_lengths after an attempt whose outcome is unknown (UNAVAILABLE, or the attempt's own
    deadline passed) while attempts remain, after a jittered wait growing from initial_backoff;
    any other call once. With a timeout, each attempt of an exactly-once call waits for the
    channel to (re)connect within it (wait_for_ready) instead of failing at once while it
    reconnects. Every kind of call (blocking, future, asyncio) follows it."""

    def __init__(self, retry: "KvRetry", timeout, request):
        self.exactly_once = len(request.expected_lengths) > 0
        self.most = max(1, retry.max_attempts) if self.exactly_once else 1
        self.wait_for_ready = True if self.exactly_once and timeout else None
        self.unknown = {grpc.StatusCode.UNAVAILABLE}
        if timeout:
            self.unknown.add(grpc.StatusCode.DEADLINE_EXCEEDED)  # this attempt's own deadline
        self.retry, self.backoff, self.count = retry, retry.initial_backoff, 0

    def begin(self):
        """Counts an attempt; returns its wait_for_ready."""
        self.count += 1
        return self.wait_for_ready

    def retry_after(self, e: "AttnError") -> float:
        """After an attempt failed with `e`: seconds to wait before sending the call again. Raises
        the error the call ends with instead (saying how many attempts it took when more than
        one) when it ends here."""
        if e.code not in self.unknown or self.count >= self.most:
            if self.count == 1:
                raise e
            raise AttnError(e.code, f"{e.message} (after {self.count} attempts)") from None
        wait = self.backoff * random.uniform(0.5, 1.0)
        self.backoff = min(self.backoff * self.retry.multiplier, self.retry.max_backoff)
        return wait


class _Routes:
    """KV-cache routing: a cache lives on one replica, named in its KvCacheInfo.replica. Each
    replica gets its own pick_first channel (same credentials and limits) on first use, made by
    `make_channel(address)`; a handle not learned goes over the main channel (`main`, a stub)."""

    def __init__(self, target: str, main, make_channel):
        self.target, self.main, self.make_channel = target, main, make_channel
        self.replica_of = {}  # handle -> replica address
        self.pinned = set()  # handles placed by pin()
        self.channels = {}  # address -> (channel, stub)
        self.lock = threading.Lock()  # one channel per address, whichever thread asks first

    def pin(self, handle: str, replica: str):
        self.replica_of[handle] = replica
        self.pinned.add(handle)

    def learn(self, info: attn_pb2.KvCacheInfo):
        if info.handle in self.pinned:
            return
        if info.replica:
            self.replica_of[info.handle] = info.replica
        else:
            self.replica_of.pop(info.handle, None)

    def forget(self, handle: str):
        self.replica_of.pop(handle, None)
        self.pinned.discard(handle)

    def stub(self, replica: str):
        if not replica or replica == self.target:
            return self.main
        with self.lock:
            if replica not in self.channels:
                channel = self.make_channel(replica)
                self.channels[replica] = (channel, attn_pb2_grpc.AttnServiceStub(channel))
            return self.channels[replica][1]

    def of_cache(self, cache: str):
        return self.stub(self.replica_of.get(cache, ""))

    def take_channels(self) -> list:
        """The replicas' channels, for the owner to close; forgets them."""
        with self.lock:
            channels = [channel for channel, _ in self.channels.values()]
            self.channels.clear()
        return channels


def _channel_options(max_message_mb: int, load_balancing: Optional[str], server_name: Optional[str]) -> list:
    limit = min(max_message_mb, 2047) << 20
    options = [("grpc.max_send_message_length", limit),
               ("grpc.max_receive_message_length", limit),
               ("grpc.service_config", _SERVICE_CONFIG),
               ("grpc.enable_retries", 1)]
    if load_balancing:
        options.append(("grpc.lb_policy_name", load_balancing))
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options


def _credentials(tls, root_certificates, certificate_chain, private_key):
    """TLS channel credentials, or None for a plaintext channel."""
    if tls or root_certificates or certificate_chain:
        return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    return None


def _auth_metadata(token: Optional[str]) -> list:
    import os

    token = token if token is not None else os.environ.get("ATTN_TOKEN", "").strip()
    return [("authorization", f"Bearer {token}")] if token else []


def _declared(metadata: list, request) -> list:
    """`metadata` declaring the request's serialized size (attn-request-bytes), so that the server
    can set room aside for it, or refuse it, before its bytes come: for calls of one request."""
    if hasattr(request, "ByteSize"):
        return metadata + [("attn-request-bytes", str(request.ByteSize()))]
    return metadata


class _Connection:
    """What Client and aio.AsyncClient share: the channel to the target (made by the module
    `_grpc`: grpc, or grpc.aio), the routing of each cache's calls to its replica, the token, the
    per-call timeout and the KV retry schedule. Client's docstring tells the arguments."""

    _grpc = grpc

    def __init__(self, target: str, *, token: Optional[str] = None, tls: bool = False,
                 root_certificates: Optional[bytes] = None,
                 certificate_chain: Optional[bytes] = None, private_key: Optional[bytes] = None,
                 server_name: Optional[str] = None, timeout: Optional[float] = None,
                 load_balancing: Optional[str] = None, max_message_mb: int = 1024,
                 kv_retry: Optional[KvRetry] = None):
        options = _channel_options(max_message_mb, load_balancing, server_name)
        creds = _credentials(tls, root_certificates, certificate_chain, private_key)

        def channel(address, options):
            if creds is not None:
                return self._grpc.secure_channel(address, creds, options)
            return self._grpc.insecure_channel(address, options)

        self._channel = channel(target, options)
        self._stub = attn_pb2_grpc.AttnServiceStub(self._channel)
        one = [o for o in options if o[0] != "grpc.lb_policy_name"]  # a replica: pick_first
        self._routes = _Routes(target, self._stub, lambda address: channel(address, one))
        self._metadata = _auth_metadata(token)
        self._timeout = timeout
        self._kv_retry = kv_retry or KvRetry()

    def set_kv_cache_replica(self, handle: str, replica: str):
        """Where a cache made elsewhere (another process) lives: its KvCacheInfo.replica. What a
        server later says does not move it."""
        self._routes.pin(handle, replica)

    def kv_cache_replica(self, handle: str) -> str:
        """The replica this client sends `handle`'s calls to; "" for the main channel."""
        return self._routes.replica_of.get(handle, "")


class Client(_Connection):
    """A connection to one attnd, or to several behind one target with a load-balancing policy.

    target: "host:port", "dns:///attnd.default.svc:50051", "ipv4:127.0.0.1:1,127.0.0.1:2", ...
    token: the server's bearer token (default: $ATTN_TOKEN when set).
    tls: connect with TLS; root_certificates / certificate_chain / private_key are PEM bytes
    (the latter two for mutual TLS); server_name checks the certificate against that name.
    load_balancing: "round_robin" to spread calls over every address the target resolves to.
    KV caches stay on the replica that made them: calls on a cache go there (its KvCacheInfo's
    `replica`, over a channel of its own with these options), whatever the policy.
    """

    def close(self):
        self._channel.close()
        for channel in self._routes.take_channels():
            channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request, wait_for_ready=None):
        try:
            return method(request, timeout=self._timeout, metadata=_declared(self._metadata, request),
                          wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None

    def _send_kv(self, method, request):
        """A Decode or Prefill, resent per self._kv_retry while its outcome is unknown when it
        carries expected_lengths (the server applies it once); returns (response, attempts)."""
        tries = _KvAttempts(self._kv_retry, self._timeout, request)
        while True:
            try:
                return self._call(method, request, wait_for_ready=tries.begin()), tries.count
            except AttnError as e:
                wait = tries.retry_after(e)
            time.sleep(wait)

    def _send_kv_future(self, method, request, finish) -> Future:
        """_send_kv without blocking: a concurrent.futures.Future of finish(response, attempts).
        Each attempt is grpc's future of the call; its done-callback sends the next (after the
        backoff, on a timer) or completes the future, with the result or the AttnError."""
        result, tries = Future(), _KvAttempts(self._kv_retry, self._timeout, request)
        metadata = _declared(self._metadata, request)

        def attempt():
            try:
                call = method.future(request, timeout=self._timeout, metadata=metadata,
                                     wait_for_ready=tries.begin())
            except Exception as e:  # noqa: BLE001 (the future carries whatever stopped the call)
                result.set_exception(e)
                return
            call.add_done_callback(ended)

        def ended(call):
            try:
                try:
                    response = call.result()
                except grpc.RpcError as e:
                    timer = threading.Timer(tries.retry_after(AttnError(e.code(), e.details())), attempt)
                    timer.daemon = True
                    timer.start()
                    return
                result.set_result(finish(response, tries.count))
            except Exception as e:  # noqa: BLE001 (the call's AttnError, or a response that does not decode)
                result.set_exception(e)

        result.set_running_or_notify_cancel()
        attempt()
        return result

    # Inputs may be arrays or Resident handles; keep_output=True leaves the outputs on the device
    # and returns Resident handles in their place.

    # Inputs may be arrays, Resident handles, ShmTensors or CudaTensors; `out=` (a ShmTensor or a
    # CudaTensor) has the server write the output into that region, and the result's output is
    # then a view of it (numpy, or torch). A call with a CudaTensor input or output first waits for
    # the work queued on that GPU (torch.cuda.synchronize): the server reads and writes the region
    # on streams of its own, so what a put copied or a fill wrote must have landed before it starts.

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, kernel="", keep_output=False,
               output_ttl_ms=0, out: Optional[_RegionTensor] = None) -> Result:
        """C = op(A) . op(B); rank 3 operands are batched."""
        _synchronize_cuda(a, b, out)
        req = attn_pb2.MatmulRequest(a=_input(a), b=_input(b), transpose_a=transpose_a,
                                     transpose_b=transpose_b, kernel=kernel, keep_output=keep_output,
                                     output_ttl_ms=output_ttl_ms, output_shm=_output_refs(out))
        resp = self._call(self._stub.Matmul, req)
        return Result(_output(resp.c, out), Timings.from_proto(resp.timings))

    def softmax(self, x, *, kernel="", keep_output=False, output_ttl_ms=0,
                out: Optional[_RegionTensor] = None) -> Result:
        """Softmax over the last dimension."""
        _synchronize_cuda(x, out)
        req = attn_pb2.SoftmaxRequest(x=_input(x), kernel=kernel, keep_output=keep_output,
                                      output_ttl_ms=output_ttl_ms, output_shm=_output_refs(out))
        resp = self._call(self._stub.Softmax, req)
        return Result(_output(resp.y, out), Timings.from_proto(resp.timings))

    def attention(self, q, k, v, *, causal=False, scale=0.0, return_lse=False, kernel="",
                  keep_output=False, output_ttl_ms=0, window_left=None, window_right=None,
                  softcap=0.0, sinks=None, out: Optional[_RegionTensor] = None,
                  lse_out: Optional[_RegionTensor] = None) -> Result:
        """O = softmax(scale . Q K^T [causal, bottom-right]) V for [B, H, S, D] tensors (GQA when
        K/V have fewer heads). scale 0 means 1/sqrt(D). window_left/window_right: a sliding
        window (FlashAttention-2's window_size: query i at key position p = i + Sk - Sq sees keys
        p - window_left .. p + window_right); None or -1 is unbounded on that side. softcap > 0:
        each scaled score s becomes softcap * tanh(s / softcap). sinks: float32 [Hq], a logit
        per query head joining every row's softmax denominator (gpt-oss). out/lse_out: ShmTensors
        or CudaTensors the server writes O / the LSE into (shared memory)."""
        _synchronize_cuda(q, k, v, out, lse_out)
        req = attn_pb2.AttentionRequest(q=_input(q), k=_input(k), v=_input(v), causal=causal,
                                        scale=scale, return_lse=return_lse, kernel=kernel,
                                        keep_output=keep_output, output_ttl_ms=output_ttl_ms,
                                        softcap=softcap, output_shm=_output_refs(out, lse_out))
        if window_left is not None:
            req.window_left = window_left
        if window_right is not None:
            req.window_right = window_right
        if sinks is not None:
            req.sinks.CopyFrom(_sinks(sinks))
        resp = self._call(self._stub.Attention, req)
        lse = _output(resp.lse, lse_out) if return_lse else None
        return Result(_output(resp.o, out), Timings.from_proto(resp.timings), lse)

    # ---- shared memory ----

    def register_shared_memory(self, name: str, shm, *, offset=0, size=None) -> SharedMemoryRegion:
        """Registers `size` bytes (default: the rest) from `offset` of a
        multiprocessing.shared_memory.SharedMemory as region `name` (server run with
        --shared-memory system, on this host)."""
        size = shm.size - offset if size is None else size
        req = attn_pb2.RegisterSharedMemoryRequest(name=name, kind=attn_pb2.SHARED_MEMORY_KIND_SYSTEM,
                                                   key="/" + shm.name.lstrip("/"), offset=offset, bytes=size)
        self._call(self._stub.RegisterSharedMemory, req)
        return SharedMemoryRegion(self, name, shm, offset, size)

    def register_cuda_tensor(self, name: str, tensor) -> CudaRegion:
        """Registers the bytes of `tensor`, a contiguous torch CUDA tensor of any dtype, as region
        `name` through its CUDA IPC handle (server on this host with --shared-memory cuda, serving
        the tensor's GPU). torch's caching allocator carves several tensors out of one cudaMalloc
        block, so several regions may name one handle: the server opens it once. The region keeps
        the tensor alive; CudaRegion.unregister lets torch reuse its memory once freed."""
        share = _CudaIpcShare(tensor)
        req = attn_pb2.RegisterSharedMemoryRequest(name=name, kind=attn_pb2.SHARED_MEMORY_KIND_CUDA,
                                                   cuda_ipc_handle=share.handle, device_id=share.device_id,
                                                   offset=share.offset, bytes=share.bytes)
        try:
            self._call(self._stub.RegisterSharedMemory, req)
        except AttnError:
            share.release()
            raise
        return CudaRegion(self, name, tensor, share.offset, share.bytes, share)

    def unregister_shared_memory(self, name: str = "") -> int:
        """Forgets region `name` (empty: all of this caller's); returns how many went."""
        req = attn_pb2.UnregisterSharedMemoryRequest(name=name)
        return self._call(self._stub.UnregisterSharedMemory, req).unregistered

    def shared_memory_status(self, name: str = "") -> attn_pb2.SharedMemoryStatusResponse:
        return self._call(self._stub.SharedMemoryStatus, attn_pb2.SharedMemoryStatusRequest(name=name))

    # ---- resident tensors ----

    def put_tensor(self, x, *, ttl_ms=0, device="", chunk_bytes=1 << 20) -> attn_pb2.TensorInfo:
        """Stores `x` on the server's device, streamed in chunks (any size); returns its TensorInfo
        (`.handle`, `.expires_unix_ms`, ...)."""
        t = encode(x)
        header = attn_pb2.PutTensorRequest(header=attn_pb2.TensorHeader(
            dtype=t.dtype, shape=list(t.shape), ttl_ms=ttl_ms, device=device))

        def parts():
            yield header
            for off in range(0, len(t.data), chunk_bytes):
                yield attn_pb2.PutTensorRequest(chunk=t.data[off:off + chunk_bytes])

        return self._call(self._stub.PutTensor, parts()).tensor

    def get_tensor(self, handle: str, *, chunk_bytes=0):
        """A resident tensor's values (a numpy array, or BFloat16)."""
        try:
            stream = self._stub.GetTensor(attn_pb2.GetTensorRequest(handle=handle, chunk_bytes=chunk_bytes),
                                          timeout=self._timeout, metadata=self._metadata)
            info, chunks = None, []
            for msg in stream:
                if msg.HasField("tensor"):
                    info = msg.tensor
                else:
                    chunks.append(msg.chunk)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None
        return decode(attn_pb2.Tensor(dtype=info.dtype, shape=list(info.shape), data=b"".join(chunks)))

    def delete_tensor(self, handle: str) -> int:
        """Forgets a resident tensor; returns the bytes freed."""
        return self._call(self._stub.DeleteTensor, attn_pb2.DeleteTensorRequest(handle=handle)).freed_bytes

    def list_tensors(self) -> attn_pb2.ListTensorsResponse:
        return self._call(self._stub.ListTensors, attn_pb2.ListTensorsRequest())

    @staticmethod
    def resident(handle: str) -> "Resident":
        """An op input that names a resident tensor: c.softmax(Client.resident(h))."""
        return Resident(handle)

    def benchmark(self, op: str, shape, *, dtype="bfloat16", kernels=(), kv_heads=0, kv_len=0,
                  causal=False, iterations=0, warmup=0, window_left=None, window_right=None,
                  softcap=0.0) -> list:
        """Times variants on the server's device with inputs made there; BenchmarkResult list.
        window_left/window_right/softcap: attention's, as in attention()."""
        dtypes = {"float32": attn_pb2.D_TYPE_FLOAT32, "float16": attn_pb2.D_TYPE_FLOAT16,
                  "bfloat16": attn_pb2.D_TYPE_BFLOAT16}
        req = attn_pb2.BenchmarkRequest(op=op, dtype=dtypes[dtype], shape=list(shape), kernels=list(kernels),
                                        kv_heads=kv_heads, kv_len=kv_len, causal=causal,
                                        iterations=iterations, warmup=warmup, softcap=softcap)
        if window_left is not None:
            req.window_left = window_left
        if window_right is not None:
            req.window_right = window_right
        return list(self._call(self._stub.Benchmark, req).results)

    def echo(self, payload: bytes) -> attn_pb2.EchoResponse:
        return self._call(self._stub.Echo, attn_pb2.EchoRequest(payload=payload))

    def list_kernels(self, op="") -> list:
        """The variants of `op` (or of every op): name, backend, dtypes, limits, available."""
        return list(self._call(self._stub.ListKernels, attn_pb2.ListKernelsRequest(op=op)).kernels)

    def server_info(self) -> attn_pb2.GetServerInfoResponse:
        return self._call(self._stub.GetServerInfo, attn_pb2.GetServerInfoRequest())

    def health(self, service: str = "") -> str:
        """The standard health check: "SERVING", "NOT_SERVING", ..."""
        from . import health_pb2

        check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString)
        try:
            resp = check(health_pb2.HealthCheckRequest(service=service), timeout=self._timeout)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)

    # ---- KV caches ----
    # Every call on a cache goes to the replica its KvCacheInfo names (learned from create,
    # describe and list, or told with set_kv_cache_replica); a handle this client has not learned
    # goes over the main channel.

    def _learn(self, info: attn_pb2.KvCacheInfo):
        self._routes.learn(info)

    def _stub_for_replica(self, replica: str):
        return self._routes.stub(replica)

    def _kv_stub(self, cache: str):
        return self._routes.of_cache(cache)

    def create_kv_cache(self, *, layers: int, kv_heads: int, head_dim: int, capacity_tokens: int,
                        dtype="float32", page_size=0, ttl_ms=0, device="", kv_storage="",
                        k_scales=None, v_scales=None) -> attn_pb2.KvCacheInfo:
        """A paged K/V store for `layers` layers of `kv_heads` heads of `head_dim`, holding
        `capacity_tokens` tokens over all its sequences (each sequence fills whole pages of its
        own); dtype "float32", "float16" or "bfloat16" (or a numpy dtype). kv_storage
        "float8_e4m3" stores K/V in float8 with a scale per (page, kv head), computed on append
        or fixed by k_scales/v_scales ([layers, kv_heads] each).
        Returns its KvCacheInfo (`.handle`, `.replica`, `.pages_total`, ...)."""
        req = _kv_cache_request(layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                capacity_tokens=capacity_tokens, dtype=dtype, page_size=page_size,
                                ttl_ms=ttl_ms, device=device, kv_storage=kv_storage,
                                k_scales=k_scales, v_scales=v_scales)
        info = self._call(self._stub.CreateKvCache, req).cache
        self._learn(info)
        return info

    def describe_kv_cache(self, handle: str) -> attn_pb2.KvCacheInfo:
        """Pages used and free, bytes, and each sequence's lengths (`.sequences`)."""
        info = self._call(self._kv_stub(handle).DescribeKvCache,
                          attn_pb2.DescribeKvCacheRequest(handle=handle)).cache
        self._learn(info)
        return info

    def list_kv_caches(self, replica: str = "") -> attn_pb2.ListKvCachesResponse:
        """The caches of one server: the main channel's pick (one of several replicas), or
        `replica`'s."""
        resp = self._call(self._stub_for_replica(replica).ListKvCaches, attn_pb2.ListKvCachesRequest())
        for info in resp.caches:
            self._learn(info)
        return resp

    def delete_kv_cache(self, handle: str) -> int:
        """Drops a cache; returns the bytes freed."""
        freed = self._call(self._kv_stub(handle).DeleteKvCache,
                           attn_pb2.DeleteKvCacheRequest(handle=handle)).freed_bytes
        self._routes.forget(handle)
        return freed

    def release_sequences(self, cache: str, sequence_ids) -> int:
        """Frees the sequences' pages; returns the pages returned to the free list."""
        req = attn_pb2.ReleaseSequencesRequest(cache=cache, sequence_ids=_sequence_ids(sequence_ids))
        return self._call(self._kv_stub(cache).ReleaseSequences, req).freed_pages

    def fork_sequence(self, cache: str, source_id: str, new_id: str) -> attn_pb2.ForkSequenceResponse:
        """A new sequence sharing the source's full pages; `.sequence`, `.copied_pages`."""
        req = attn_pb2.ForkSequenceRequest(cache=cache, source_id=source_id, new_id=new_id)
        return self._call(self._kv_stub(cache).ForkSequence, req)

    def decode(self, cache: str, layer: int, sequence_ids, q, k_new, v_new, *, scale=0.0,
               return_lse=False, kernel="", window_left=None, softcap=0.0, sinks=None,
               expected_lengths=None, out: Optional[_RegionTensor] = None,
               lse_out: Optional[_RegionTensor] = None) -> KvResult:
        """One token per sequence at one layer: appends k_new/v_new [n, Hkv, D], then attends
        q [n, Hq, D] over each sequence's whole cache. Arrays in the cache's dtype (or Resident
        handles, or shared-memory / CUDA region tensors). window_left: the new token sees only
        the last window_left + 1 tokens; softcap, sinks: as attention().
        expected_lengths: each sequence's length at this layer before the call; given, the server
        applies the call once however often it arrives, and it is resent when its outcome is
        unknown (KvRetry); `.replayed` says the server answered a repeat (a repeat writes the
        recorded outputs into its out/lse_out). out/lse_out: ShmTensors or CudaTensors (on the
        cache's device) the server writes O / the LSE into, as attention()'s; the result's
        output / lse are then views of them."""
        req = _decode_request(cache, layer, sequence_ids, q, k_new, v_new, scale=scale,
                              return_lse=return_lse, kernel=kernel, window_left=window_left,
                              softcap=softcap, sinks=sinks, expected_lengths=expected_lengths,
                              out=out, lse_out=lse_out)
        resp, attempts = self._send_kv(self._kv_stub(cache).Decode, req)
        return _kv_result(req, resp, attempts, out, lse_out)

    def decode_async(self, cache: str, layer: int, sequence_ids, q, k_new, v_new, **options) -> Future:
        """decode() without blocking: returns a concurrent.futures.Future at once, whose result()
        is decode()'s KvResult or raises its AttnError, so that a decode loop can run its own work
        while the server attends. Same arguments; the inputs are encoded before it returns (the
        arrays may change after). An exactly-once call (expected_lengths) is resent as decode()
        resends it. Many calls may be in flight at once; the server runs those on one cache in the
        order they arrive, which for calls in flight together need not be the order they were
        made: a call on a (sequence, layer) waits for the one before it there. The future cannot
        be cancelled."""
        req = _decode_request(cache, layer, sequence_ids, q, k_new, v_new, **options)
        return self._send_kv_future(self._kv_stub(cache).Decode, req,
                                    lambda resp, attempts: _kv_result(req, resp, attempts, options.get("out"),
                                                                      options.get("lse_out")))

    def prefill(self, cache: str, layer: int, sequence_ids, lens, q, k, v, *, non_causal=False,
                scale=0.0, return_lse=False, kernel="", window_left=None, window_right=None,
                softcap=0.0, sinks=None, expected_lengths=None, out: Optional[_RegionTensor] = None,
                lse_out: Optional[_RegionTensor] = None) -> KvResult:
        """lens[i] new tokens of sequence i (packed: q [sum(lens), Hq, D], k/v [sum(lens), Hkv,
        D]) appended at one layer, with causal attention over each sequence's cache; unknown ids
        are created. window_left/window_right, softcap, sinks: as attention(). expected_lengths:
        as decode()'s (0 for a sequence this call creates). out/lse_out: as decode()'s."""
        req = _prefill_request(cache, layer, sequence_ids, lens, q, k, v, non_causal=non_causal,
                               scale=scale, return_lse=return_lse, kernel=kernel,
                               window_left=window_left, window_right=window_right, softcap=softcap,
                               sinks=sinks, expected_lengths=expected_lengths, out=out, lse_out=lse_out)
        resp, attempts = self._send_kv(self._kv_stub(cache).Prefill, req)
        return _kv_result(req, resp, attempts, out, lse_out)

    def prefill_async(self, cache: str, layer: int, sequence_ids, lens, q, k, v, **options) -> Future:
        """prefill() without blocking, as decode_async() is decode(): a concurrent.futures.Future
        of its KvResult."""
        req = _prefill_request(cache, layer, sequence_ids, lens, q, k, v, **options)
        return self._send_kv_future(self._kv_stub(cache).Prefill, req,
                                    lambda resp, attempts: _kv_result(req, resp, attempts, options.get("out"),
                                                                      options.get("lse_out")))

    def truncate_sequence(self, cache: str, sequence_id: str, length: int) -> attn_pb2.TruncateSequenceResponse:
        """Cuts a sequence back to `length` tokens at every layer (speculative decoding's
        rollback); `.sequence`, `.freed_pages`, `.copied_pages`."""
        req = attn_pb2.TruncateSequenceRequest(cache=cache, sequence_id=sequence_id, length=int(length))
        return self._call(self._kv_stub(cache).TruncateSequence, req)

    def read_kv(self, cache: str, sequence_id: str, layer: int, *, chunk_bytes=0, dequantize=False):
        """One sequence's cached (K, V) at one layer, each [len, Hkv, D] in the cache's dtype.
        A cache stored in float8 (kv_storage D_TYPE_FLOAT8_E4M3) gives a Fp8Kv instead (the
        stored codes and scales), unless `dequantize` asks for (K, V) in the cache's dtype."""
        form = attn_pb2.READ_KV_FORM_DEQUANTIZED if dequantize else attn_pb2.READ_KV_FORM_UNSPECIFIED
        req = attn_pb2.ReadKvRequest(cache=cache, sequence_id=sequence_id, layer=layer,
                                     chunk_bytes=chunk_bytes, form=form)
        try:
            header, chunks = None, []
            for msg in self._kv_stub(cache).ReadKv(req, timeout=self._timeout, metadata=self._metadata):
                if msg.HasField("header"):
                    header = msg.header
                else:
                    chunks.append(msg.chunk)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None
        if header is None:
            raise AttnError(grpc.StatusCode.INTERNAL, "ReadKv: the stream had no header")
        data = b"".join(chunks)
        if header.dtype == attn_pb2.D_TYPE_FLOAT8_E4M3:
            shape, sshape = tuple(header.shape), tuple(header.scales_shape)
            n, ns = int(np.prod(shape)), int(np.prod(sshape))
            if len(data) != 2 * n + 8 * ns:
                raise AttnError(grpc.StatusCode.INTERNAL, "ReadKv: the float8 stream's size is not its shapes'")
            codes = np.frombuffer(data, dtype=np.uint8, count=2 * n)
            scales = np.frombuffer(data, dtype="<f4", count=2 * ns, offset=2 * n)
            return Fp8Kv(codes[:n].reshape(shape), codes[n:].reshape(shape), scales[:ns].reshape(sshape),
                         scales[ns:].reshape(sshape), header.page_size)
        if len(data) % 2:
            raise AttnError(grpc.StatusCode.INTERNAL, "ReadKv: K and V differ in size")
        half = len(data) // 2
        k = decode(attn_pb2.Tensor(dtype=header.dtype, shape=list(header.shape), data=data[:half]))
        v = decode(attn_pb2.Tensor(dtype=header.dtype, shape=list(header.shape), data=data[half:]))
        return k, v

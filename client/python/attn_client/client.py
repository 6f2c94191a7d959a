"""attn_client.Client: the attn.v1.AttnService ops with numpy in and out."""

from dataclasses import dataclass
from typing import Optional

import grpc
import numpy as np

from attn.v1 import attn_pb2, attn_pb2_grpc

from .tensors import decode, encode

# Every op is a pure function of its inputs: a call that never reached a server is safe to send
# again, so small calls are retried once or twice on UNAVAILABLE (a replica that went away).
_SERVICE_CONFIG = """{"methodConfig": [{
  "name": [{"service": "attn.v1.AttnService"}],
  "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}"""


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

    @classmethod
    def from_proto(cls, t: attn_pb2.Timings) -> "Timings":
        return cls(t.kernel, t.device, t.queue_ns, t.h2d_ns, t.kernel_ns, t.d2h_ns, t.total_ns,
                   t.flops, t.bytes)


@dataclass
class Resident:
    """An op input given by the handle of a resident tensor."""

    handle: str


@dataclass
class Result:
    output: object  # numpy array, or BFloat16
    timings: Timings
    lse: Optional[np.ndarray] = None  # attention with return_lse


def _input(x) -> attn_pb2.Tensor:
    return attn_pb2.Tensor(handle=x.handle) if isinstance(x, Resident) else encode(x)


def _output(t: attn_pb2.Tensor):
    return Resident(t.handle) if t.handle else decode(t)


class Client:
    """A connection to one attnd, or to several behind one target with a load-balancing policy.

    target: "host:port", "dns:///attnd.default.svc:50051", "ipv4:127.0.0.1:1,127.0.0.1:2", ...
    token: the server's bearer token (default: $ATTN_TOKEN when set).
    tls: connect with TLS; root_certificates / certificate_chain / private_key are PEM bytes
    (the latter two for mutual TLS); server_name checks the certificate against that name.
    load_balancing: "round_robin" to spread calls over every address the target resolves to.
    """

    def __init__(self, target: str, *, token: Optional[str] = None, tls: bool = False,
                 root_certificates: Optional[bytes] = None,
                 certificate_chain: Optional[bytes] = None, private_key: Optional[bytes] = None,
                 server_name: Optional[str] = None, timeout: Optional[float] = None,
                 load_balancing: Optional[str] = None, max_message_mb: int = 1024):
        import os

        limit = min(max_message_mb, 2047) << 20
        options = [("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit),
                   ("grpc.service_config", _SERVICE_CONFIG),
                   ("grpc.enable_retries", 1)]
        if load_balancing:
            options.append(("grpc.lb_policy_name", load_balancing))
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates or certificate_chain:
            creds = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
            self._channel = grpc.secure_channel(target, creds, options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self._stub = attn_pb2_grpc.AttnServiceStub(self._channel)
        token = token if token is not None else os.environ.get("ATTN_TOKEN", "").strip()
        self._metadata = [("authorization", f"Bearer {token}")] if token else []
        self._timeout = timeout

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None

    # Inputs may be arrays or Resident handles; keep_output=True leaves the outputs on the device
    # and returns Resident handles in their place.

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, kernel="", keep_output=False,
               output_ttl_ms=0) -> Result:
        """C = op(A) . op(B); rank 3 operands are batched."""
        req = attn_pb2.MatmulRequest(a=_input(a), b=_input(b), transpose_a=transpose_a,
                                     transpose_b=transpose_b, kernel=kernel, keep_output=keep_output,
                                     output_ttl_ms=output_ttl_ms)
        resp = self._call(self._stub.Matmul, req)
        return Result(_output(resp.c), Timings.from_proto(resp.timings))

    def softmax(self, x, *, kernel="", keep_output=False, output_ttl_ms=0) -> Result:
        """Softmax over the last dimension."""
        req = attn_pb2.SoftmaxRequest(x=_input(x), kernel=kernel, keep_output=keep_output,
                                      output_ttl_ms=output_ttl_ms)
        resp = self._call(self._stub.Softmax, req)
        return Result(_output(resp.y), Timings.from_proto(resp.timings))

    def attention(self, q, k, v, *, causal=False, scale=0.0, return_lse=False, kernel="",
                  keep_output=False, output_ttl_ms=0) -> Result:
        """O = softmax(scale . Q K^T [causal, bottom-right]) V for [B, H, S, D] tensors (GQA when
        K/V have fewer heads). scale 0 means 1/sqrt(D)."""
        req = attn_pb2.AttentionRequest(q=_input(q), k=_input(k), v=_input(v), causal=causal,
                                        scale=scale, return_lse=return_lse, kernel=kernel,
                                        keep_output=keep_output, output_ttl_ms=output_ttl_ms)
        resp = self._call(self._stub.Attention, req)
        lse = _output(resp.lse) if return_lse else None
        return Result(_output(resp.o), Timings.from_proto(resp.timings), lse)

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
                  causal=False, iterations=0, warmup=0) -> list:
        """Times variants on the server's device with inputs made there; BenchmarkResult list."""
        dtypes = {"float32": attn_pb2.D_TYPE_FLOAT32, "float16": attn_pb2.D_TYPE_FLOAT16,
                  "bfloat16": attn_pb2.D_TYPE_BFLOAT16}
        req = attn_pb2.BenchmarkRequest(op=op, dtype=dtypes[dtype], shape=list(shape), kernels=list(kernels),
                                        kv_heads=kv_heads, kv_len=kv_len, causal=causal,
                                        iterations=iterations, warmup=warmup)
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

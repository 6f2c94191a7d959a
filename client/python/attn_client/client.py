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
class Result:
    output: object  # numpy array, or BFloat16
    timings: Timings
    lse: Optional[np.ndarray] = None  # attention with return_lse


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

    def matmul(self, a, b, *, transpose_a=False, transpose_b=False, kernel="") -> Result:
        """C = op(A) . op(B); rank 3 operands are batched."""
        req = attn_pb2.MatmulRequest(a=encode(a), b=encode(b), transpose_a=transpose_a,
                                     transpose_b=transpose_b, kernel=kernel)
        resp = self._call(self._stub.Matmul, req)
        return Result(decode(resp.c), Timings.from_proto(resp.timings))

    def softmax(self, x, *, kernel="") -> Result:
        """Softmax over the last dimension."""
        resp = self._call(self._stub.Softmax, attn_pb2.SoftmaxRequest(x=encode(x), kernel=kernel))
        return Result(decode(resp.y), Timings.from_proto(resp.timings))

    def attention(self, q, k, v, *, causal=False, scale=0.0, return_lse=False, kernel="") -> Result:
        """O = softmax(scale . Q K^T [causal, bottom-right]) V for [B, H, S, D] tensors (GQA when
        K/V have fewer heads). scale 0 means 1/sqrt(D)."""
        req = attn_pb2.AttentionRequest(q=encode(q), k=encode(k), v=encode(v), causal=causal,
                                        scale=scale, return_lse=return_lse, kernel=kernel)
        resp = self._call(self._stub.Attention, req)
        lse = decode(resp.lse) if return_lse else None
        return Result(decode(resp.o), Timings.from_proto(resp.timings), lse)

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

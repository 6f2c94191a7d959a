"""Each method of attn.v1.AttnService is described once, in the proto (MethodTraits): these check
that the description is whole, that the client's retry policy follows it, and that the server
serves every method it declares through its method table."""

import json

import grpc
import pytest

from attn.v1 import attn_pb2
from attn_client.client import retry_service_config

SERVICE = attn_pb2.DESCRIPTOR.services_by_name["AttnService"]


def traits(method):
    return method.GetOptions().Extensions[attn_pb2.method_traits]


def test_every_method_has_a_unique_op_label():
    ops = [traits(m).op for m in SERVICE.methods]
    assert all(ops), [m.name for m in SERVICE.methods if not traits(m).op]
    assert len(set(ops)) == len(ops), ops


# What a user relies on: a retried call of these could apply twice (a token appended twice, a
# second tensor or cache made), so they must be marked; reads and pure ops must not be.
CHANGES_STATE = {"PutTensor", "DeleteTensor", "CreateKvCache", "DeleteKvCache", "ReleaseSequences",
                 "ForkSequence", "TruncateSequence", "Decode", "Prefill", "RegisterSharedMemory",
                 "UnregisterSharedMemory"}


def test_state_changing_methods_are_marked_and_only_they():
    marked = {m.name for m in SERVICE.methods if traits(m).changes_state}
    assert marked == CHANGES_STATE


def test_retry_policy_follows_the_proto():
    config = json.loads(retry_service_config())
    retried, once = config["methodConfig"]
    assert retried["name"] == [{"service": "attn.v1.AttnService"}]
    assert retried["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in once
    assert {n["method"] for n in once["name"]} == CHANGES_STATE


def test_the_server_serves_every_method_of_the_proto(server):
    """An empty request to each method: whatever the server answers, it is never UNIMPLEMENTED (a
    method of the proto without its table entry would be)."""
    channel = grpc.insecure_channel(server.address)
    try:
        for m in SERVICE.methods:
            path = f"/{SERVICE.full_name}/{m.name}"
            kwargs = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
            if m.client_streaming:
                call = channel.stream_unary(path, **kwargs)
                invoke = lambda: call(iter([b""]), timeout=10)
            elif m.server_streaming:
                call = channel.unary_stream(path, **kwargs)
                invoke = lambda: list(call(b"", timeout=10))
            else:
                call = channel.unary_unary(path, **kwargs)
                invoke = lambda: call(b"", timeout=10)
            try:
                invoke()
            except grpc.RpcError as e:
                assert e.code() != grpc.StatusCode.UNIMPLEMENTED, (m.name, e.details())
        with pytest.raises(grpc.RpcError) as e:
            channel.unary_unary(f"/{SERVICE.full_name}/NoSuchMethod")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        channel.close()

"""attn_client.aio.AsyncClient: attn_client.Client's KV-cache calls for asyncio, over grpc.aio.

    async with AsyncClient("127.0.0.1:50051", timeout=30) as c:
        info = await c.create_kv_cache(layers=4, kv_heads=2, head_dim=64, capacity_tokens=4096)
        a = asyncio.ensure_future(c.decode(info.handle, layer, ["a"], qa, ka, va))  # on its way
        hb = mlp(hb)                                       # the client's own work meanwhile
        ra = await a                                       # Client.decode()'s KvResult

The requests, the results (KvResult), the errors (AttnError), the routing of each cache's calls to
its replica and the exactly-once retries (KvRetry) are Client's: the same code builds and reads
them. Make it inside the event loop that uses it.
"""

import asyncio

import grpc
import grpc.aio

from attn.v1 import attn_pb2

from .client import (AttnError, KvResult, _Connection, _declared, _decode_request, _kv_cache_request,
                     _kv_result, _KvAttempts, _prefill_request, _sequence_ids)


class AsyncClient(_Connection):
    """A connection to one attnd (or several behind one target) for asyncio: the KV-cache calls of
    Client as coroutines. Constructor arguments as Client's."""

    _grpc = grpc.aio

    async def close(self):
        await self._channel.close()
        for channel in self._routes.take_channels():
            await channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def _call(self, method, request, wait_for_ready=None):
        try:
            return await method(request, timeout=self._timeout, metadata=_declared(self._metadata, request),
                                wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            raise AttnError(e.code(), e.details()) from None

    async def _send_kv(self, method, request):
        """Client._send_kv, awaiting: each wait between attempts is an asyncio.sleep."""
        tries = _KvAttempts(self._kv_retry, self._timeout, request)
        while True:
            try:
                return await self._call(method, request, wait_for_ready=tries.begin()), tries.count
            except AttnError as e:
                wait = tries.retry_after(e)
            await asyncio.sleep(wait)

    # ---- KV caches (Client's calls of the same names) ----

    async def create_kv_cache(self, **config) -> attn_pb2.KvCacheInfo:
        """Client.create_kv_cache's keyword arguments; its KvCacheInfo."""
        info = (await self._call(self._stub.CreateKvCache, _kv_cache_request(**config))).cache
        self._routes.learn(info)
        return info

    async def describe_kv_cache(self, handle: str) -> attn_pb2.KvCacheInfo:
        info = (await self._call(self._routes.of_cache(handle).DescribeKvCache,
                                 attn_pb2.DescribeKvCacheRequest(handle=handle))).cache
        self._routes.learn(info)
        return info

    async def delete_kv_cache(self, handle: str) -> int:
        freed = (await self._call(self._routes.of_cache(handle).DeleteKvCache,
                                  attn_pb2.DeleteKvCacheRequest(handle=handle))).freed_bytes
        self._routes.forget(handle)
        return freed

    async def release_sequences(self, cache: str, sequence_ids) -> int:
        req = attn_pb2.ReleaseSequencesRequest(cache=cache, sequence_ids=_sequence_ids(sequence_ids))
        return (await self._call(self._routes.of_cache(cache).ReleaseSequences, req)).freed_pages

    async def truncate_sequence(self, cache: str, sequence_id: str, length: int):
        req = attn_pb2.TruncateSequenceRequest(cache=cache, sequence_id=sequence_id, length=int(length))
        return await self._call(self._routes.of_cache(cache).TruncateSequence, req)

    async def decode(self, cache: str, layer: int, sequence_ids, q, k_new, v_new, **options) -> KvResult:
        """Client.decode, awaiting: the same arguments, result and errors, and the same resends of
        an exactly-once call. Calls in flight together on one cache run on the server in the
        order they arrive: a call on a (sequence, layer) waits for the one before it there."""
        req = _decode_request(cache, layer, sequence_ids, q, k_new, v_new, **options)
        resp, attempts = await self._send_kv(self._routes.of_cache(cache).Decode, req)
        return _kv_result(req, resp, attempts, options.get("out"), options.get("lse_out"))

    async def prefill(self, cache: str, layer: int, sequence_ids, lens, q, k, v, **options) -> KvResult:
        """Client.prefill, awaiting (as decode is Client.decode)."""
        req = _prefill_request(cache, layer, sequence_ids, lens, q, k, v, **options)
        resp, attempts = await self._send_kv(self._routes.of_cache(cache).Prefill, req)
        return _kv_result(req, resp, attempts, options.get("out"), options.get("lse_out"))

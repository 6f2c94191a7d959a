"""attn_client: a thin Python client for attnd (numpy arrays in and out, gRPC underneath).

    from attn_client import Client
    c = Client("127.0.0.1:50051")
    r = c.softmax(np.random.rand(8, 1000).astype(np.float32))
    r.output, r.timings.kernel_ns

float32 and float16 arrays go as they are; bfloat16 travels as raw bits in a BFloat16 wrapper
(numpy has no bfloat16): to_bfloat16(array) makes one, .to_float32() reads one back.
torch is needed only for CUDA regions (Client.register_cuda_tensor), imported when used.
Client.decode_async/prefill_async return concurrent.futures.Futures; attn_client.aio.AsyncClient
has the KV-cache calls as asyncio coroutines (grpc.aio).
"""

from .client import (AttnError, Client, CudaRegion, CudaTensor, KvResult, KvRetry, Resident, Result,
                     SharedMemoryRegion, ShmTensor, Timings)
from .tensors import BFloat16, to_bfloat16

__all__ = ["AttnError", "BFloat16", "Client", "CudaRegion", "CudaTensor", "KvResult", "KvRetry", "Resident",
           "Result", "SharedMemoryRegion", "ShmTensor", "Timings", "to_bfloat16"]

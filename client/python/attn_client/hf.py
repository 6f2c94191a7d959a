"""Hugging Face transformers (5.x) on attnd: an attention implementation and a KV cache.

    from attn_client import Client
    from attn_client.hf import AttnCache, register
    client = Client("127.0.0.1:50051")
    register(client)                                  # attn_implementation "attnd"
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnd")
    cache = AttnCache.from_model(client, model, batch_size=1, capacity_tokens=8192)
    out = model.generate(input_ids, past_key_values=cache, max_new_tokens=32)
    cache.close()                                     # frees the server's cache
    cache = AttnCache.from_model(client, model, kv_storage="float8_e4m3")   # K/V kept in float8

With an AttnCache the keys and values live on the server: each layer's new K/V go up once, with
the queries, in one Prefill (a prompt) or Decode (a token) call, and only the attention output
comes back. kv_storage="float8_e4m3" (a float16 or bfloat16 model) has the server store them as
float8 e4m3 with a float32 scale per (page, kv head), computed on append: twice the tokens in the
same memory, for e4m3's rounding (3 mantissa bits) of every cached element; what goes over the
wire and comes back keeps the model's dtype. Without an AttnCache (use_cache=False, or
transformers' own DynamicCache) each call is a one-shot Attention over the K/V the model hands
over. Sliding windows (Mistral, Gemma 2, Qwen2, gpt-oss), logit soft caps (Gemma 2) and
attention sinks (gpt-oss) are passed through; GQA/MQA need nothing. Padding (a 2D attention_mask
with zeros) is refused with an AttnCache; without one such calls, and any other mask that is not
plain causal, run in torch (`_torch_attention`).

torch and transformers are imported only inside the functions that need them, so that the config
helpers here (cache_config, window_left, dtype_name, kv_storage_name) work without them.
"""

import uuid
import weakref
from typing import Optional

import numpy as np

from .tensors import BFloat16

__all__ = ["AttnCache", "register", "cache_config", "window_left", "dtype_name", "kv_storage_name",
           "attention_function", "attnd_mask"]

_DTYPE_NAMES = {"float32": "float32", "float": "float32", "fp32": "float32", "f32": "float32",
                "float16": "float16", "half": "float16", "fp16": "float16", "f16": "float16",
                "bfloat16": "bfloat16", "bf16": "bfloat16"}
_FLOAT8_NAMES = ("float8_e4m3", "float8_e4m3fn", "fp8", "e4m3")  # float8_e4m3fn: torch's name


# ---- config mapping (no torch needed) ----

def dtype_name(dtype) -> str:
    """The attnd dtype name ("float32", "float16", "bfloat16") of a torch dtype, a numpy dtype or a
    string; ValueError for anything else (float64 and the integer types among them)."""
    s = str(dtype)
    if s.startswith("torch."):
        s = s[len("torch."):]
    name = _DTYPE_NAMES.get(s)
    if name is None:
        try:
            name = _DTYPE_NAMES.get(np.dtype(dtype).name)
        except TypeError:
            name = None
    if name is None:
        raise ValueError(f"dtype: attnd caches hold float32, float16 or bfloat16, got {dtype!r}")
    return name


def kv_storage_name(kv_storage, dtype: str) -> str:
    """How an AttnCache of `dtype` (a dtype_name) has the server store its K/V: "float8_e4m3" for
    "float8_e4m3" (or "fp8", "e4m3", torch.float8_e4m3fn), `dtype` itself for None, "" or `dtype`.
    ValueError naming kv_storage for anything else, and for float8 under a float32 cache (the
    server stores float8 for float16 and bfloat16 caches only)."""
    if kv_storage is None or kv_storage == "":
        return dtype
    s = str(kv_storage)
    if s.startswith("torch."):
        s = s[len("torch."):]
    if s in _FLOAT8_NAMES:
        if dtype == "float32":
            raise ValueError("kv_storage: float8_e4m3 stores float16 and bfloat16 caches, this one is float32 "
                             "(the model's dtype, or dtype=)")
        return "float8_e4m3"
    if _DTYPE_NAMES.get(s) == dtype:
        return dtype
    raise ValueError(f"kv_storage: expected float8_e4m3, or None for the cache's dtype ({dtype}), got {kv_storage!r}")


def window_left(sliding_window) -> Optional[int]:
    """attnd's window_left for Hugging Face's sliding_window W (a token sees the last W tokens,
    itself included: masking_utils.sliding_window_overlay keeps kv_idx > q_idx - W), that is
    W - 1; None (no window) for None or a W <= 0."""
    if sliding_window is None:
        return None
    w = int(sliding_window)
    return w - 1 if w > 0 else None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    if callable(get):
        try:
            return get(decoder=True)
        except TypeError:
            return get()
    return config


def cache_config(config) -> dict:
    """The attnd KV-cache shape of a (decoder) model config: layers, kv_heads, head_dim, and the
    q_heads the attention calls will have. head_dim: config.head_dim when set, else hidden_size //
    num_attention_heads; kv_heads: num_key_value_heads when set, else num_attention_heads."""
    config = _text_config(config)
    q_heads = int(config.num_attention_heads)
    kv_heads = getattr(config, "num_key_value_heads", None) or q_heads
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // q_heads
    if q_heads % int(kv_heads):
        raise ValueError(f"num_attention_heads {q_heads} is not a multiple of num_key_value_heads {kv_heads}")
    return {"layers": int(config.num_hidden_layers), "kv_heads": int(kv_heads), "head_dim": int(head_dim),
            "q_heads": q_heads}


# ---- torch <-> the client's arrays ----

def _to_wire(t, dtype: str):
    """A torch tensor as the client's array in `dtype` (numpy float32/float16, or BFloat16)."""
    import torch

    t = t.detach()
    if dtype == "bfloat16":
        t = t.to(device="cpu", dtype=torch.bfloat16).contiguous()
        return BFloat16(t.view(torch.int16).numpy().view(np.uint16))
    return t.to(device="cpu", dtype=getattr(torch, dtype)).contiguous().numpy()


def _from_wire(a, like):
    """The client's array as a torch tensor on `like`'s device, in `like`'s dtype."""
    import torch

    if isinstance(a, BFloat16):
        t = torch.from_numpy(np.ascontiguousarray(a.bits).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(device=like.device, dtype=like.dtype)


def _wire_dtype_of(t) -> str:
    try:
        return dtype_name(t.dtype)
    except ValueError:
        return "float32"  # float64 and the like go as float32


def _sinks_of(module, kwargs):
    sinks = kwargs.get("s_aux")
    if sinks is None:
        sinks = kwargs.get("sinks")
    if sinks is None:
        sinks = getattr(module, "sinks", None)
    return sinks


def _softcap_of(kwargs) -> float:
    softcap = kwargs.get("softcap")
    return float(softcap) if softcap else 0.0


# ---- the attention function and its mask ----

def _torch_attention(query, key, value, attention_mask, scaling, softcap=0.0, sinks=None):
    """Attention in torch, as transformers' eager paths compute it: q [B, Hq, S, D], k/v [B, Hkv, Sk,
    D] (GQA repeated here), an additive float or a boolean 4D mask (or None: no mask at all),
    softcap on the scaled scores, sinks joining the softmax denominator. Returns [B, S, Hq, D]."""
    import torch

    rep = query.shape[1] // key.shape[1]
    if rep > 1:
        key = key.repeat_interleave(rep, dim=1)
        value = value.repeat_interleave(rep, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :key.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.to(scores.dtype)
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1, scores.shape[2], 1)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined, dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous()


_LIVE_CACHES = weakref.WeakSet()  # the AttnCaches alive now: the attention function looks for its K/V there


def _pending_owner(module, key, value):
    """The AttnCache (and layer) whose update() just handed out `key`/`value`, or (None, None)."""
    layer = getattr(module, "layer_idx", None)
    for cache in list(_LIVE_CACHES):
        if layer is not None:
            p = cache._pending.get(layer)
            if p is not None and p[0] is key and p[1] is value:
                return cache, layer
        else:
            for idx, p in cache._pending.items():
                if p[0] is key and p[1] is value:
                    return cache, idx
    return None, None


def attention_function(client):
    """The function register() hands to transformers' AttentionInterface, bound to `client` for
    one-shot Attention calls: fn(module, query, key, value, attention_mask, scaling=None,
    dropout=0.0, **kwargs) -> (attn_output [B, S, Hq, D], None), query [B, Hq, S, D] and key/value
    [B, Hkv, Sk, D] as the models pass them."""

    def attnd_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and getattr(module, "training", False):
            raise ValueError("attnd attention: no dropout (inference only); call model.eval()")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        softcap = _softcap_of(kwargs)
        sinks = _sinks_of(module, kwargs)
        sliding_window = kwargs.get("sliding_window")
        is_causal = kwargs.get("is_causal")
        if is_causal is None:
            is_causal = getattr(module, "is_causal", True)

        cache, layer = _pending_owner(module, key, value)
        if cache is not None:
            if attention_mask is not None or not is_causal:
                cache._drop_pending(layer)
                raise ValueError("attnd: an AttnCache serves causal attention without padding only (batch rows "
                                 "of one length, attention_mask all ones); this call has a padding or custom "
                                 "mask, or a non-causal attention")
            out = cache._attend(layer, query, key, value, scale=float(scaling), window=window_left(sliding_window),
                                softcap=softcap, sinks=sinks)
            return out, None

        if attention_mask is not None or not is_causal:
            # a padding or custom mask, or bidirectional attention: torch computes it, as eager would
            return _torch_attention(query, key, value, attention_mask, scaling, softcap, sinks), None

        dtype = _wire_dtype_of(query)
        r = client.attention(_to_wire(query, dtype), _to_wire(key, dtype), _to_wire(value, dtype), causal=True,
                             scale=float(scaling), window_left=window_left(sliding_window), softcap=softcap,
                             sinks=None if sinks is None else _to_wire(sinks, "float32"))
        out = _from_wire(r.output, query)  # [B, Hq, S, D]
        return out.transpose(1, 2).contiguous(), None

    attnd_attention.__name__ = "attnd_attention"
    return attnd_attention


def attnd_mask(*args, **kwargs):
    """The mask function register() hands to transformers' AttentionMaskInterface (called by
    create_causal_mask & co. with keywords: batch_size, q_length, kv_length, q_offset, kv_offset
    (transformers < 5.4: cache_position instead of q_length/q_offset), mask_function,
    attention_mask [B, kv] bool or None, allow_is_causal_skip, allow_is_bidirectional_skip,
    local_size, use_vmap, dtype, config, device, ...). None (the attention function then applies
    causal masking and the layer's sliding window itself) for a plain causal or sliding-window
    mask without padding; otherwise transformers' eager_mask of the same arguments (0 / dtype min,
    [B, 1, q, kv]), which sends the call to torch (or, with an AttnCache, to an error). Plain: the
    caller allowed the is_causal skip and added no custom (vmap) pattern; bidirectional masks
    always come materialized."""
    from transformers.masking_utils import eager_mask

    attention_mask = kwargs.get("attention_mask")
    padded = attention_mask is not None and not bool(attention_mask.all())
    plain = (kwargs.get("allow_is_causal_skip", False) and not kwargs.get("use_vmap", False)
             and not kwargs.get("allow_is_bidirectional_skip", False))
    if plain and not padded:
        return None
    if "allow_is_bidirectional_skip" in kwargs:
        kwargs["allow_is_bidirectional_skip"] = False
    return eager_mask(*args, **kwargs)


def register(client, name: str = "attnd") -> str:
    """Registers attnd as attention implementation `name` (and its mask function under the same
    name) with transformers, so that from_pretrained/from_config(..., attn_implementation=name)
    and model.set_attn_implementation(name) accept it. Returns `name`."""
    try:
        from transformers import AttentionInterface, AttentionMaskInterface
    except ImportError:  # older layouts
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(name, attention_function(client))
    AttentionMaskInterface.register(name, attnd_mask)
    return name


# ---- the cache ----

def _cache_base():
    from transformers.cache_utils import Cache

    return Cache


def _layer_base():
    try:
        from transformers.cache_utils import CacheLayerMixin
    except ImportError:
        return object
    return CacheLayerMixin


_classes = {}


def _crop_target(seen: int, tokens_to_remove: int) -> int:
    """The length crop(tokens_to_remove) keeps, as transformers (5.15 on) reads the argument: a negative n
    removes the last |n| tokens, 0 removes nothing, and a positive n (the older meaning, which transformers
    still takes with a deprecation warning) is the length to keep."""
    n = int(tokens_to_remove)
    if n > 0:
        return n
    return max(seen - abs(n), 0)


def _classes_made():
    """AttnCache and its layer class, made on first use (they subclass transformers' classes).

    transformers 5.x's Cache exposes read-only properties (batch_size, is_compileable, is_initialized,
    is_sliding, is_croppable, is_linear, max_batch_size, max_cache_len) computed from its layers: an
    AttnCache keeps its own state under private names and overrides each of those properties, so that
    nothing here ever assigns to a name the base class owns."""
    if _classes:
        return _classes
    Cache, LayerBase = _cache_base(), _layer_base()

    class AttnLayer(LayerBase):
        """One layer of an AttnCache: lengths only (its K/V are on the server)."""

        is_compileable = False
        is_sliding = False    # the server applies each layer's window; the masks size full lengths
        is_croppable = True   # crop() truncates the server's sequences: no trace of the cut tokens stays

        def __init__(self, owner, layer_idx):
            if LayerBase is not object:
                LayerBase.__init__(self)  # keys, values = None; is_initialized = False
            else:
                self.keys, self.values = None, None
                self.is_initialized = False
            self._owner = weakref.ref(owner)
            self.layer_idx = layer_idx

        def lazy_initialization(self, key_states, value_states=None, *args, **kwargs):
            self.dtype, self.device = key_states.dtype, key_states.device
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            return self._owner().update(key_states, value_states, self.layer_idx)

        def get_seq_length(self, *args, **kwargs):
            return self._owner().get_seq_length(self.layer_idx)

        def get_mask_sizes(self, query_length, *args, **kwargs):
            return self._owner().get_mask_sizes(query_length, self.layer_idx)

        def get_max_length(self, *args, **kwargs):
            return -1  # no per-row maximum: the server's pages are shared by every row and layer

        def get_max_cache_shape(self, *args, **kwargs):  # transformers < 5.13 name of get_max_length
            return -1

        def reset(self):
            pass  # the owner releases the sequences

        def offload(self):
            pass

        def prefetch(self):
            pass

        def reorder_cache(self, beam_idx):
            raise NotImplementedError("AttnCache: no beam search (reorder_cache); use greedy or sampling")

    AttnLayer.__abstractmethods__ = frozenset()  # whatever a newer CacheLayerMixin adds, it is not used here

    class AttnCache(Cache):
        """A transformers Cache whose keys and values live in an attnd KV cache (one sequence per
        batch row). update() keeps the layer's new K/V aside and returns them as they are (the
        history never comes back); the attnd attention function recognizes them and runs Prefill
        (a prompt, or a layer's first call) or Decode (one token) for that layer on the server.
        Needs the model's attn_implementation to be the one register() made. Free it with close()
        (or a with block); __del__ tries too.

        dtype: the server cache's (and the wire's) dtype. kv_storage: how the server stores K/V;
        None (the default) in `dtype`, "float8_e4m3" in float8 e4m3 with a float32 scale per
        (page, kv head) computed on append (float16 and bfloat16 caches): one byte an element
        instead of two, for e4m3's rounding (3 mantissa bits, ~2^-4 relative) of each."""

        __hash__ = object.__hash__  # _LIVE_CACHES (a WeakSet) holds it, whatever Cache does with __eq__

        def __init__(self, client, config, batch_size: int = 1, capacity_tokens: Optional[int] = None,
                     dtype="float32", page_size: int = 0, ttl_ms: int = 0, kv_storage: Optional[str] = None):
            self._closed = True  # until the server's cache exists (close() and __del__ read it)
            self._handle, self._info = None, None
            shape = cache_config(config)
            self._client = client
            self._batch = int(batch_size)
            if self._batch < 1:
                raise ValueError(f"AttnCache: batch_size {batch_size} (one server sequence per row, at least 1)")
            self._num_layers, self._kv_heads, self._head_dim = shape["layers"], shape["kv_heads"], shape["head_dim"]
            self._dtype = dtype_name(dtype)
            self._kv_storage = kv_storage_name(kv_storage, self._dtype)
            if capacity_tokens is None:
                limit = getattr(_text_config(config), "max_position_embeddings", None) or 4096
                capacity_tokens = self._batch * min(int(limit), 4096)
            self._capacity = int(capacity_tokens)
            self._seen = [0] * self._num_layers     # tokens per row per layer, counted at update()
            self._stored = [0] * self._num_layers   # tokens per row per layer, on the server
            self._pending = {}                      # layer -> (key, value) handed out by update()
            layers = [AttnLayer(self, i) for i in range(self._num_layers)]
            try:
                Cache.__init__(self, layers=layers)
            except TypeError:  # a Cache whose __init__ takes no layers (transformers 4.x)
                self.layers = layers
            self._info = client.create_kv_cache(layers=self._num_layers, kv_heads=self._kv_heads,
                                                head_dim=self._head_dim, capacity_tokens=self._capacity,
                                                dtype=self._dtype, page_size=page_size, ttl_ms=ttl_ms,
                                                kv_storage="" if self._kv_storage == self._dtype else self._kv_storage)
            self._handle = self._info.handle
            tag = uuid.uuid4().hex[:12]
            self._sequence_ids = [f"hf-{tag}-{i}" for i in range(self._batch)]
            self._closed = False
            _LIVE_CACHES.add(self)

        @classmethod
        def from_model(cls, client, model, batch_size: int = 1, capacity_tokens: Optional[int] = None,
                       dtype=None, page_size: int = 0, ttl_ms: int = 0, kv_storage: Optional[str] = None):
            """A cache for `model` (its config; its dtype unless `dtype` is given); kv_storage
            "float8_e4m3" stores its K/V in float8 (a float16 or bfloat16 model)."""
            if dtype is None:
                dtype = getattr(model, "dtype", "float32")
            return cls(client, model.config, batch_size=batch_size, capacity_tokens=capacity_tokens,
                       dtype=dtype, page_size=page_size, ttl_ms=ttl_ms, kv_storage=kv_storage)

        # -- what it is (read-only) --

        @property
        def client(self):
            return self._client

        @property
        def handle(self) -> str:
            """The server's KV-cache handle."""
            return self._handle

        @property
        def info(self):
            """What CreateKvCache answered."""
            return self._info

        @property
        def sequence_ids(self) -> list:
            """The server sequence of each batch row."""
            return list(self._sequence_ids)

        @property
        def num_layers(self) -> int:
            return self._num_layers

        @property
        def kv_heads(self) -> int:
            return self._kv_heads

        @property
        def head_dim(self) -> int:
            return self._head_dim

        @property
        def capacity_tokens(self) -> int:
            return self._capacity

        @property
        def dtype(self) -> str:
            """The server cache's dtype name ("float32", "float16" or "bfloat16")."""
            return self._dtype

        @property
        def kv_storage(self) -> str:
            """How the server stores K/V: "float8_e4m3", or the cache's dtype name."""
            return self._kv_storage

        @property
        def batch_size(self) -> int:
            """The batch rows (server sequences) this cache was made for (Cache.batch_size's meaning)."""
            return self._batch

        @property
        def max_batch_size(self) -> int:  # transformers' deprecated name of batch_size
            return self._batch

        @max_batch_size.setter
        def max_batch_size(self, value):
            pass  # fixed by design; an older Cache.__init__ may assign it

        @property
        def max_cache_len(self) -> int:  # transformers' deprecated name of get_max_length()
            return -1

        @max_cache_len.setter
        def max_cache_len(self, value):
            pass  # fixed by design; an older Cache.__init__ may assign it

        @property
        def is_compileable(self) -> bool:
            return False  # every call goes over gRPC

        @is_compileable.setter
        def is_compileable(self, value):
            pass  # fixed by design; an older Cache.__init__ may assign it

        @property
        def is_sliding(self):
            return [False] * self._num_layers  # the server applies each layer's window itself

        @is_sliding.setter
        def is_sliding(self, value):
            pass  # fixed by design; an older Cache.__init__ may assign it

        @property
        def is_linear(self):
            return [False] * self._num_layers

        @property
        def is_croppable(self) -> bool:
            return True  # crop() truncates the server's sequences (TruncateSequence)

        @property
        def is_initialized(self) -> bool:
            return any(self._seen)

        @is_initialized.setter
        def is_initialized(self, value):
            pass  # fixed by design; an older Cache.__init__ may assign it

        def __len__(self):
            return self._num_layers

        # -- what transformers calls --

        def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
            """Keeps this layer's new K/V [B, Hkv, S, D] for the attention call that follows and
            returns them unchanged (cache_kwargs and the like are not needed)."""
            self._check_open()
            if not 0 <= layer_idx < self._num_layers:
                raise IndexError(f"AttnCache: layer {layer_idx}, the cache has {self._num_layers}")
            if layer_idx in self._pending:
                raise RuntimeError(
                    f"AttnCache: layer {layer_idx} was updated twice without an attnd attention call in between: "
                    "the model's attn_implementation must be the one attn_client.hf.register made")
            b, hkv, s, d = key_states.shape
            if b != self._batch or hkv != self._kv_heads or d != self._head_dim:
                raise ValueError(f"AttnCache: K/V of shape {tuple(key_states.shape)}, the cache holds batch "
                                 f"{self._batch}, {self._kv_heads} kv heads of {self._head_dim}")
            layer = self.layers[layer_idx]
            if not layer.is_initialized:
                layer.lazy_initialization(key_states, value_states)
            self._pending[layer_idx] = (key_states, value_states)
            self._seen[layer_idx] += s
            return key_states, value_states

        def get_seq_length(self, layer_idx: Optional[int] = 0, *args, **kwargs) -> int:
            i = 0 if layer_idx is None else int(layer_idx)
            return self._seen[i] if 0 <= i < self._num_layers else 0

        def get_query_offset(self, layer_idx: Optional[int] = 0, *args, **kwargs) -> int:
            """The position of the next query's first token (masking_utils asks; == get_seq_length)."""
            return self.get_seq_length(layer_idx)

        def get_mask_sizes(self, query_length, layer_idx: int = 0, *args, **kwargs):
            """(kv_length, kv_offset): the cached tokens plus the query's, from position 0. Takes
            the query length, or (transformers < 5.4) the cache_position tensor."""
            q = int(query_length.shape[0]) if hasattr(query_length, "shape") else int(query_length)
            return self.get_seq_length(layer_idx) + q, 0

        def get_max_length(self, layer_idx: Optional[int] = None, *args, **kwargs) -> int:
            return -1  # no per-row maximum: the server's pages are shared by every row and layer

        def get_max_cache_shape(self, layer_idx: int = 0, *args, **kwargs) -> int:  # the older name
            return -1

        def reset(self):
            """Forgets every sequence (their pages go back to the server's free list)."""
            self._check_open()
            if any(self._stored):  # a sequence exists on the server only once a Prefill stored it
                self._client.release_sequences(self._handle, self._sequence_ids)
            self._seen = [0] * self._num_layers
            self._stored = [0] * self._num_layers
            self._pending.clear()
            for layer in self.layers:
                layer.is_initialized = False

        def crop(self, tokens_to_remove: Optional[int] = None, *, max_length: Optional[int] = None):
            """Cuts every row back, at every layer, as transformers' Cache.crop (5.15 on) reads its
            argument: crop(-n) removes the last n tokens, crop(0) nothing, and a positive crop(n)
            (transformers' older, deprecated meaning) keeps the first n."""
            n = tokens_to_remove if tokens_to_remove is not None else max_length
            if n is None:
                raise TypeError("AttnCache.crop: give the tokens to remove (negative) or the length to keep")
            self._check_open()
            keep = _crop_target(self.get_seq_length(), n)
            self._pending.clear()
            if all(s <= keep for s in self._stored):
                self._seen = list(self._stored)
                return
            for sid in self._sequence_ids:
                self._client.truncate_sequence(self._handle, sid, keep)
            self._stored = [min(s, keep) for s in self._stored]
            self._seen = list(self._stored)

        def reorder_cache(self, beam_idx):
            raise NotImplementedError("AttnCache: no beam search (reorder_cache); use greedy or sampling")

        def batch_repeat_interleave(self, repeats: int):
            raise NotImplementedError("AttnCache: no batch expansion; make the cache with the final batch size")

        def batch_select_indices(self, indices):
            raise NotImplementedError("AttnCache: no batch selection")

        # -- the server side --

        def _check_open(self):
            if self._closed:
                raise RuntimeError("AttnCache: closed")

        def _drop_pending(self, layer):
            """Forgets a layer's pending K/V (their tokens were never stored)."""
            self._pending.pop(layer, None)
            self._seen[layer] = self._stored[layer]

        def _attend(self, layer, query, key, value, **options):
            """Runs this layer's pending K/V with `query` on the server: [B, S, Hq, D] back. A call
            that fails leaves the layer as it was (the server changes nothing on a failed call)."""
            try:
                return self._attend_on_server(layer, query, key, value, **options)
            finally:
                self._drop_pending(layer)

        def _attend_on_server(self, layer, query, key, value, *, scale, window, softcap, sinks):
            b, hq, s, d = query.shape
            dt = self._dtype
            q = _to_wire(query.transpose(1, 2).reshape(b * s, hq, d), dt)
            k = _to_wire(key.transpose(1, 2).reshape(b * s, key.shape[1], d), dt)
            v = _to_wire(value.transpose(1, 2).reshape(b * s, value.shape[1], d), dt)
            sinks = None if sinks is None else _to_wire(sinks, "float32")
            # Each row's length before the call: the server applies it once, so the client may
            # resend it when a response is lost.
            expected = [self._stored[layer]] * b
            if s == 1 and self._stored[layer] > 0:
                r = self._client.decode(self._handle, layer, self._sequence_ids, q, k, v, scale=scale,
                                        window_left=window, softcap=softcap, sinks=sinks,
                                        expected_lengths=expected)
            else:
                r = self._client.prefill(self._handle, layer, self._sequence_ids, [s] * b, q, k, v, scale=scale,
                                         window_left=window, softcap=softcap, sinks=sinks,
                                         expected_lengths=expected)
            want = self._stored[layer] + s
            if any(int(n) != want for n in r.lengths):
                raise RuntimeError(f"AttnCache: layer {layer} holds {list(r.lengths)} tokens on the server, "
                                   f"expected {want} per sequence")
            self._stored[layer] = want  # _drop_pending then keeps _seen == _stored
            return _from_wire(r.output, query).reshape(b, s, hq, d)

        def close(self):
            """Deletes the server's cache (idempotent)."""
            if getattr(self, "_closed", True):
                return
            self._closed = True
            _LIVE_CACHES.discard(self)
            self._client.delete_kv_cache(self._handle)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.close()

        def __del__(self):
            try:
                self.close()
            except Exception:
                pass

        def __repr__(self):
            seen = getattr(self, "_seen", None)
            return (f"AttnCache(handle={getattr(self, '_handle', None)!r}, layers={getattr(self, '_num_layers', '?')}, "
                    f"batch={getattr(self, '_batch', '?')}, seen={seen[0] if seen else 0}, "
                    f"dtype={getattr(self, '_dtype', '?')}, kv_storage={getattr(self, '_kv_storage', '?')})")

    AttnCache.__abstractmethods__ = frozenset()
    _classes["AttnCache"], _classes["AttnLayer"] = AttnCache, AttnLayer
    return _classes


def __getattr__(name):  # AttnCache is made when first asked for (it needs transformers)
    if name in ("AttnCache", "AttnLayer"):
        return _classes_made()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

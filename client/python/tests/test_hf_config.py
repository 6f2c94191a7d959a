"""attn_client.hf without torch or transformers: the config, window and dtype mappings, and the
AttnCache bookkeeping against a stand-in transformers Cache and a fake client (no server)."""

import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

from attn_client import hf


def llama_like(**kw):
    base = dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=128,
                max_position_embeddings=256)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cache_config_from_hidden_size():
    assert hf.cache_config(llama_like()) == {"layers": 2, "kv_heads": 2, "head_dim": 16, "q_heads": 8}


def test_cache_config_explicit_head_dim_wins():
    assert hf.cache_config(llama_like(head_dim=64))["head_dim"] == 64


def test_cache_config_head_dim_none_falls_back():
    assert hf.cache_config(llama_like(head_dim=None))["head_dim"] == 16


def test_cache_config_without_kv_heads_is_mha():
    cfg = llama_like()
    del cfg.num_key_value_heads
    assert hf.cache_config(cfg)["kv_heads"] == 8
    assert hf.cache_config(llama_like(num_key_value_heads=None))["kv_heads"] == 8


def test_cache_config_mqa_and_qwen2_gqa7():
    assert hf.cache_config(llama_like(num_key_value_heads=1))["kv_heads"] == 1
    qwen = llama_like(num_attention_heads=14, num_key_value_heads=2, hidden_size=896)
    assert hf.cache_config(qwen) == {"layers": 2, "kv_heads": 2, "head_dim": 64, "q_heads": 14}


def test_cache_config_bad_grouping():
    with pytest.raises(ValueError, match="multiple"):
        hf.cache_config(llama_like(num_attention_heads=8, num_key_value_heads=3))


def test_cache_config_uses_the_text_config():
    text = llama_like(head_dim=32)
    outer = SimpleNamespace(get_text_config=lambda decoder=False: text)
    assert hf.cache_config(outer)["head_dim"] == 32


@pytest.mark.parametrize("w, want", [(None, None), (0, None), (-1, None), (1, 0), (8, 7), (4096, 4095)])
def test_window_left(w, want):
    # HF: kv_idx > q_idx - W (the last W tokens, itself included); attnd: p - window_left .. p
    assert hf.window_left(w) == want


def test_window_left_matches_the_hf_overlay():
    w = 5
    for q in range(12):
        hf_keys = {kv for kv in range(q + 1) if kv > q - w}
        attnd_keys = set(range(max(0, q - hf.window_left(w)), q + 1))
        assert hf_keys == attnd_keys


@pytest.mark.parametrize("d, want", [("torch.float32", "float32"), ("torch.bfloat16", "bfloat16"),
                                     ("torch.float16", "float16"), ("bf16", "bfloat16"), ("half", "float16"),
                                     (np.float32, "float32"), (np.dtype(np.float16), "float16"),
                                     ("float32", "float32")])
def test_dtype_name(d, want):
    assert hf.dtype_name(d) == want


@pytest.mark.parametrize("d", ["torch.float64", "torch.int8", np.int32, "float8"])
def test_dtype_name_refuses(d):
    with pytest.raises(ValueError):
        hf.dtype_name(d)


@pytest.mark.parametrize("storage, dtype, want", [
    (None, "bfloat16", "bfloat16"), ("", "float32", "float32"), ("float16", "float16", "float16"),
    ("bf16", "bfloat16", "bfloat16"), ("float8_e4m3", "bfloat16", "float8_e4m3"), ("fp8", "float16", "float8_e4m3"),
    ("e4m3", "bfloat16", "float8_e4m3"), ("torch.float8_e4m3fn", "bfloat16", "float8_e4m3")])
def test_kv_storage_name(storage, dtype, want):
    assert hf.kv_storage_name(storage, dtype) == want


@pytest.mark.parametrize("storage, dtype, why", [("float8_e4m3", "float32", "float16 and bfloat16"),
                                                 ("fp8", "float32", "float32"),
                                                 ("float16", "bfloat16", "expected float8_e4m3"),
                                                 ("int8", "float16", "int8"), ("float8_e5m2", "bfloat16", "e5m2")])
def test_kv_storage_name_refuses(storage, dtype, why):
    with pytest.raises(ValueError, match="kv_storage") as e:
        hf.kv_storage_name(storage, dtype)
    assert why in str(e.value)


def test_importing_hf_imports_neither_torch_nor_transformers():
    import os
    import subprocess

    code = "import sys, attn_client, attn_client.hf; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ),
                         check=True).stdout.split()
    assert out == ["False", "False"]


# ---- AttnCache bookkeeping with a stand-in transformers (only where the real one is absent) ----

class FakeClient:
    def __init__(self):
        self.calls = []

    def create_kv_cache(self, **kw):
        self.calls.append(("create", kw))
        return SimpleNamespace(handle="h1", **kw)

    def delete_kv_cache(self, handle):
        self.calls.append(("delete", handle))
        return 0

    def release_sequences(self, cache, ids):
        self.calls.append(("release", cache, list(ids)))
        return 0

    def truncate_sequence(self, cache, sid, length):
        self.calls.append(("truncate", cache, sid, length))


@pytest.fixture
def fake_transformers(monkeypatch):
    try:
        import transformers  # noqa: F401
        pytest.skip("the real transformers is here: test_hf.py covers AttnCache")
    except ImportError:
        pass

    import abc

    # The shape of transformers 5.x's cache_utils, as far as AttnCache meets it: an abstract layer
    # class, and a Cache whose batch_size, is_* and max_* are read-only properties computed from
    # its layers (assigning to one raises AttributeError, as it did on the GPU machine).
    class CacheLayerMixin(abc.ABC):
        is_compileable = False
        is_croppable = False
        supports_early_init = True

        def __init__(self, **kwargs):
            self.keys = self.values = None
            self.is_initialized = False

        @abc.abstractmethod
        def lazy_initialization(self, key_states, value_states): ...

        @abc.abstractmethod
        def update(self, key_states, value_states, *args, **kwargs): ...

        @abc.abstractmethod
        def get_mask_sizes(self, query_length): ...

        @abc.abstractmethod
        def get_seq_length(self): ...

        @abc.abstractmethod
        def get_max_length(self): ...

    class Cache:
        def __init__(self, layers=None, layer_class_to_replicate=None, offloading=False,
                     offload_only_non_sliding=True):
            if (layers is None) == (layer_class_to_replicate is None):
                raise ValueError("exactly one of layers and layer_class_to_replicate")
            self.layers = layers if layers is not None else []
            self.layer_class_to_replicate = layer_class_to_replicate
            self.offloading = offloading

        def get_query_offset(self, layer_idx=0):
            return self.get_seq_length(layer_idx=layer_idx)

        def get_max_length(self, layer_idx=None):
            return max(layer.get_max_length() for layer in self.layers)

        @property
        def batch_size(self):
            sizes = {layer.batch_size for layer in self.layers if hasattr(layer, "batch_size")}
            return sizes.pop() if sizes else -1

        @property
        def max_batch_size(self):
            return self.batch_size

        @property
        def max_cache_len(self):
            return self.get_max_length()

        @property
        def is_compileable(self):
            return bool(self.layers) and all(layer.is_compileable for layer in self.layers)

        @property
        def is_initialized(self):
            return bool(self.layers) and all(layer.is_initialized for layer in self.layers)

        @property
        def is_croppable(self):
            return all(layer.is_croppable for layer in self.layers)

        @property
        def is_sliding(self):
            return [getattr(layer, "is_sliding", False) for layer in self.layers]

        @property
        def is_linear(self):
            return [False for _ in self.layers]

    cache_utils = types.ModuleType("transformers.cache_utils")
    cache_utils.Cache, cache_utils.CacheLayerMixin = Cache, CacheLayerMixin
    pkg = types.ModuleType("transformers")
    pkg.cache_utils = cache_utils
    monkeypatch.setitem(sys.modules, "transformers", pkg)
    monkeypatch.setitem(sys.modules, "transformers.cache_utils", cache_utils)
    monkeypatch.setattr(hf, "_classes", {})
    yield
    hf._classes.clear()


def kv(b, h, s, d):
    return SimpleNamespace(shape=(b, h, s, d), dtype="float32", device="cpu")


def test_attn_cache_bookkeeping(fake_transformers):
    client = FakeClient()
    cfg = llama_like(head_dim=64)
    cache = hf.AttnCache(client, cfg, batch_size=2, capacity_tokens=1024, dtype="torch.bfloat16")
    assert client.calls[0] == ("create", dict(layers=2, kv_heads=2, head_dim=64, capacity_tokens=1024,
                                              dtype="bfloat16", page_size=0, ttl_ms=0, kv_storage=""))
    assert cache.kv_storage == "bfloat16"
    assert len(cache.sequence_ids) == 2 and len(set(cache.sequence_ids)) == 2
    other = hf.AttnCache(FakeClient(), cfg, batch_size=2, capacity_tokens=1024)
    assert not set(cache.sequence_ids) & set(other.sequence_ids)  # unique per instance
    assert cache.get_seq_length() == 0 and not cache.is_compileable and cache.is_sliding == [False, False]
    # the base class's read-only properties, answered by AttnCache
    assert cache.batch_size == 2 and cache.max_batch_size == 2 and cache.dtype == "bfloat16"
    assert cache.get_max_length() == -1 and cache.max_cache_len == -1 and cache.is_croppable
    assert cache.is_linear == [False, False] and not cache.is_initialized and len(cache) == 2
    assert all(layer.get_max_length() == -1 for layer in cache.layers)
    with pytest.raises(AttributeError):
        cache.batch_size = 3
    other.close()

    k, v = kv(2, 2, 5, 64), kv(2, 2, 5, 64)
    assert cache.update(k, v, 0, {"cache_position": None}) == (k, v)  # the new K/V, as they came
    assert cache.get_seq_length(0) == 5 and cache.get_seq_length(1) == 0
    assert cache.get_mask_sizes(1, 0) == (6, 0)
    with pytest.raises(RuntimeError, match="attn_implementation"):  # no attnd attention consumed them
        cache.update(kv(2, 2, 1, 64), kv(2, 2, 1, 64), 0)
    with pytest.raises(ValueError, match="batch"):
        cache.update(kv(3, 2, 1, 64), kv(3, 2, 1, 64), 1)

    cache._pending.clear()
    cache._stored = [5, 5]  # as if the attnd attention calls had stored the 5 tokens
    cache._seen = [5, 5]
    assert cache.get_query_offset(0) == 5 and cache.is_initialized
    cache.crop(0)  # transformers 5.15 on: removes nothing
    cache.crop(7)  # the older meaning, a length to keep: longer than what is there
    assert not [c for c in client.calls if c[0] == "truncate"] and cache.get_seq_length() == 5
    cache.crop(-2)  # removes the last 2 tokens of every row
    assert [c for c in client.calls if c[0] == "truncate"] == [("truncate", "h1", sid, 3) for sid in cache.sequence_ids]
    assert cache.get_seq_length(0) == 3 and cache.get_seq_length(1) == 3
    cache.crop(2)  # keeps the first 2
    assert client.calls[-1] == ("truncate", "h1", cache.sequence_ids[-1], 2) and cache.get_seq_length() == 2
    cache.reset()
    assert client.calls[-1] == ("release", "h1", cache.sequence_ids) and cache.get_seq_length() == 0
    cache.reset()  # nothing on the server any more: no second release
    assert [c[0] for c in client.calls].count("release") == 1
    cache.close()
    cache.close()
    assert [c for c in client.calls if c[0] == "delete"] == [("delete", "h1")]
    with pytest.raises(RuntimeError, match="closed"):
        cache.update(k, v, 0)


def test_attn_cache_float8_storage(fake_transformers):
    client = FakeClient()
    cfg = llama_like(head_dim=64)
    cache = hf.AttnCache(client, cfg, capacity_tokens=256, dtype="torch.bfloat16", kv_storage="fp8")
    assert client.calls[0] == ("create", dict(layers=2, kv_heads=2, head_dim=64, capacity_tokens=256,
                                              dtype="bfloat16", page_size=0, ttl_ms=0, kv_storage="float8_e4m3"))
    assert cache.kv_storage == "float8_e4m3" and cache.dtype == "bfloat16"  # the wire keeps bfloat16
    assert "kv_storage=float8_e4m3" in repr(cache)
    cache.close()
    # refused before anything is made on the server: float8 stores float16 and bfloat16 caches
    refused = FakeClient()
    with pytest.raises(ValueError, match="kv_storage: float8_e4m3 stores float16 and bfloat16"):
        hf.AttnCache(refused, cfg, capacity_tokens=256, dtype="float32", kv_storage="float8_e4m3")
    with pytest.raises(ValueError, match="kv_storage: expected float8_e4m3"):
        hf.AttnCache(refused, cfg, capacity_tokens=256, dtype="float16", kv_storage="int4")
    assert refused.calls == []


def test_attn_cache_pending_owner(fake_transformers):
    cache = hf.AttnCache(FakeClient(), llama_like(head_dim=64), batch_size=1, capacity_tokens=64)
    k, v = kv(1, 2, 4, 64), kv(1, 2, 4, 64)
    cache.update(k, v, 1)
    assert hf._pending_owner(SimpleNamespace(layer_idx=1), k, v) == (cache, 1)
    assert hf._pending_owner(SimpleNamespace(layer_idx=0), k, v) == (None, None)
    assert hf._pending_owner(SimpleNamespace(), k, v) == (cache, 1)
    assert hf._pending_owner(SimpleNamespace(layer_idx=1), kv(1, 2, 4, 64), v) == (None, None)
    cache.close()


def test_attn_cache_half_built(fake_transformers):
    class Refusing(FakeClient):
        def create_kv_cache(self, **kw):
            raise RuntimeError("no room")

    with pytest.raises(RuntimeError, match="no room"):
        hf.AttnCache(Refusing(), llama_like(head_dim=64), batch_size=1, capacity_tokens=64)
    # a cache whose server side never came: repr and close work, nothing is deleted
    cache = hf.AttnCache.__new__(hf.AttnCache)
    assert "AttnCache(" in repr(cache)
    cache.close()
    with pytest.raises(ValueError, match="batch_size"):
        hf.AttnCache(FakeClient(), llama_like(head_dim=64), batch_size=0, capacity_tokens=64)


@pytest.mark.parametrize("seen, n, keep", [(10, -4, 6), (10, 0, 10), (10, 6, 6), (10, 12, 12), (3, -5, 0)])
def test_crop_target(seen, n, keep):
    assert hf._crop_target(seen, n) == keep

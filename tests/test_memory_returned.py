"""Memory comes back when a call ends: no reference cycle holds a SparseCache, a patched model or its state,
and the cache's own bookkeeping allocates no index tensors the size of its keys."""

import gc
import weakref

import pytest
import torch
from conftest import DEVICE
from helpers import left_padded, random_ids, tiny_model

import sparse_attn_hf.routing as routing
from sparse_attn_hf import Profile, SparseCache, SparseConfig, patch_model, unpatch_model
from sparse_attn_hf.compat import CACHE_ARG, cache_of

pytestmark = pytest.mark.compat  # also run on the oldest supported Transformers (.ci/run)

SETTINGS = SparseConfig(sink_size=2, local_size=8, decode_local_size=4, page_size=16, logical_page_size=4,
                        token_budget=32, streaming_fraction=0.5)


@pytest.fixture
def no_collector():
    """Reference counting only: what a cycle holds stays alive."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _patched():
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2).to(DEVICE)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(0))
    return patch_model(model, Profile.from_scores(model, scores), SETTINGS)


@torch.no_grad()
def test_the_cache_of_a_finished_generate_is_freed(no_collector, monkeypatch):
    made = []

    class Recorded(SparseCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr(routing, "SparseCache", Recorded)
    model = _patched()
    assert all(ref() is None for ref in made), "a cache of patch_model's warm-up (CUDA) outlived it"
    made.clear()
    ids, mask = left_padded(random_ids(2, 40), [0, 5])
    model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=40, do_sample=False)
    assert len(made) == 1 and made[0]() is None, "the SparseCache outlived generate()"
    out = model.generate(ids.to(DEVICE), attention_mask=mask.to(DEVICE), max_new_tokens=4, num_beams=2,
                         do_sample=False, return_dict_in_generate=True)
    assert made[1]() is cache_of(out)  # returned: alive while the caller holds it ...
    del out
    assert made[1]() is None  # ... and freed as soon as the caller drops it


@torch.no_grad()
def test_a_patched_model_is_freed_when_dropped(no_collector):
    model = _patched()
    model.generate(random_ids(1, 20).to(DEVICE), max_new_tokens=3, do_sample=False)
    refs = [weakref.ref(model), weakref.ref(model._sparse_attn_state), weakref.ref(model.model.layers[0].self_attn)]
    del model
    assert all(ref() is None for ref in refs), "a reference cycle keeps the patched model alive"


@torch.no_grad()
def test_unpatch_after_the_model_dropped_a_module_is_safe(no_collector):
    model = _patched()
    unpatch_model(model)
    assert not hasattr(model.model.layers[0].self_attn, "_sparse_attn_state")
    assert "generate" not in model.__dict__


@torch.no_grad()
def test_prefill_bookkeeping_allocates_nothing_key_sized():
    """Appending a prompt copies the keys into the pages and computes the page statistics from reshaped
    views: no temporary as large as the keys (the old path gathered the dense heads and expanded an int64
    page index to the keys' shape for scatter_reduce)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Storages(TorchDispatchMode):
        seen = {}  # data pointer -> bytes of every storage an op returned

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Storages.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return out

    model = _patched()
    cache = SparseCache(model, max_cache_len=2048)
    layer = cache.layers[0]
    keys = torch.randn(1, 2, 2000, 16, device=DEVICE)
    layer.update(keys, keys)
    kv_start = torch.zeros(1, dtype=torch.long, device=DEVICE)
    with Storages():
        layer.append(keys, keys, kv_start)
    kept = {t.untyped_storage().data_ptr() for t in [*layer._tensors.values(), keys]}
    temporaries = [size for ptr, size in Storages.seen.items() if ptr not in kept]
    assert max(temporaries, default=0) <= keys[:, :1].nbytes // 4, temporaries  # a quarter of one head's keys at most
    dense = layer._tensors["dense_key"][:, :, :2000]
    torch.testing.assert_close(layer._tensors["key_min"][:, :, :500], dense.unflatten(2, (500, 4)).amin(3))
    torch.testing.assert_close(layer._tensors["key_max"][:, :, :500], dense.unflatten(2, (500, 4)).amax(3))


@torch.no_grad()
def test_batch_selection_takes_indices_on_the_cache_device():
    """Transformers hands batch indices on the model's device (CUDA there): the cache maps its buffers and its
    own row count with them."""
    model = _patched()
    cache = SparseCache(model)
    ids, mask = left_padded(random_ids(3, 20), [0, 4, 2])
    model(ids.to(DEVICE), attention_mask=mask.to(DEVICE), **{CACHE_ARG: cache})
    keep = torch.tensor([2, 0], device=DEVICE)
    expected = {name: t[keep] for name, t in cache.layers[0]._tensors.items() if name != "ring_pos"}
    cache.batch_select_indices(keep)
    assert cache.layers[0].batch == 2 and cache.sequence.kv_start.tolist() == [2, 0]
    for name, tensor in expected.items():
        assert torch.equal(cache.layers[0]._tensors[name], tensor), name

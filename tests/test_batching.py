"""Transformers' continuous batching (``model.generate_batch``) on a patched model: the package's attention serves the
packed requests, each by the rule a single ``generate()`` applies (issue 33's first step, on the CPU)."""

import pytest
import torch
from helpers import random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig, batching, patch_model, unpatch_model

pytest.importorskip("transformers.generation.continuous_batching")
from transformers import GenerationConfig  # noqa: E402

GREEDY = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=-1, pad_token_id=0)


def _patched(streaming_from):
    model = tiny_model(heads=4, kv_heads=2, layers=2)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16, logical_page_size=4, decode_local_size=8,
        streaming_from=streaming_from))
    return model


def _batch(model, prompts):
    out = model.generate_batch(inputs=prompts, generation_config=GREEDY)
    return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]


def _selecting(monkeypatch=None):
    """A tiny patched model selecting pages past a budget of two 16-token pages every 4 steps, on the CPU too; with
    ``monkeypatch``, the list of lengths at which a request's selection is made (one entry per layer and request)."""
    from sparse_attn_hf.methods import batched_pages

    model = tiny_model(heads=4, kv_heads=2, layers=2)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        page_selection="always", streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16,
        logical_page_size=4, decode_local_size=8, streaming_from=0, token_budget=32, reuse_interval=4))
    made = []
    if monkeypatch is not None:
        choose = batched_pages.BatchedPages._choose
        monkeypatch.setattr(batched_pages.BatchedPages, "_choose",
                            staticmethod(lambda *args: made.append(args[5]) or choose(*args)))
    return model, made


@torch.no_grad()
@pytest.mark.parametrize("streaming_from", [0, None], ids=["window", "cost-model"])
def test_generate_batch_gives_each_request_what_generate_gives_it(streaming_from, monkeypatch):
    """Requests of 9, 40 and 70 tokens batched together: each request's greedy tokens equal the patched model's own
    generate() of its prompt (streaming heads: sink 4 + window 24 in prefill, the decode window 8 after; dense
    heads exact), and the package's attention served every packed call."""
    model = _patched(streaming_from)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 40, 70)]
    served = []
    packed = batching.packed_requests
    monkeypatch.setattr("sparse_attn_hf.attention.packed_requests",
                        lambda *args: served.append(1) or packed(*args))
    got = _batch(model, prompts)
    assert served, "the packed calls did not reach the package's attention"
    for prompt, tokens in zip(prompts, got):
        alone = model.generate(torch.tensor([prompt]), generation_config=GREEDY)[0, len(prompt):].tolist()
        assert tokens == alone
    unpatch_model(model)
    stock = _batch(model, prompts)  # the same model unpatched: the manager switches it as before (sdpa)
    assert stock != got, "the streaming heads' window should change some answer of these random weights"


@torch.no_grad()
def test_decode_fast_path_serves_decode_steps_through_the_block_table(monkeypatch):
    """The manager's decode fast path (Transformers offers it to flash's kernels only) runs the package's attention:
    every decode step of a batch of 9-, 40- and 70-token prompts goes through the block table (no read-back of
    the cache), the block table covers the model's context although the user set no width, and each request's
    tokens equal generate()'s. A model without the package keeps Transformers' decision (no fast path off flash)."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = _patched(0)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 40, 70)]
    steps = []
    step = batching.block_table_decode_step
    monkeypatch.setattr("sparse_attn_hf.attention.block_table_decode_step",
                        lambda *args: steps.append(args[2].shape[2]) or step(*args))
    got = _batch(model, prompts)
    assert len(steps) >= (GREEDY.max_new_tokens - 1) * 2 and max(steps) == 3  # both layers, the three requests
    for prompt, tokens in zip(prompts, got):
        alone = model.generate(torch.tensor([prompt]), generation_config=GREEDY)[0, len(prompt):].tolist()
        assert tokens == alone
    manager = model.init_continuous_batching(generation_config=GREEDY,
                                             continuous_batching_config=ContinuousBatchingConfig())
    config = manager.continuous_batching_config
    assert config.max_blocks_per_request * config.page_size >= model.config.max_position_embeddings
    unpatch_model(model)
    steps.clear()
    manager = model.init_continuous_batching(generation_config=GREEDY,
                                             continuous_batching_config=ContinuousBatchingConfig())
    assert manager.continuous_batching_config.max_blocks_per_request == 0  # sdpa on the CPU: Transformers' choice


@torch.no_grad()
def test_decode_fast_path_runs_the_triton_kernel_on_the_managers_own_pages(monkeypatch):
    """The Triton kernel (under the interpreter on the CPU) on the views the manager really hands over (pages of 256
    tokens interleaving layers and K/V, its block table, its padded request count): a 300-token prompt crosses a
    page; every request's tokens equal generate()'s."""
    from sparse_attn_hf import ops
    from sparse_attn_hf.kernels import block_table

    model = _patched(0)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 40, 300)]
    launches = []
    kernel = block_table.block_table_decode_triton
    monkeypatch.setattr(block_table, "block_table_decode_triton",
                        lambda *args, **kwargs: launches.append(args[4].shape) or kernel(*args, **kwargs))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    try:
        ops.set_backend("triton")
        out = model.generate_batch(inputs=prompts, generation_config=config)
    finally:
        ops.set_backend("auto")
    assert len(launches) >= 2 * 5 and all(shape[1] == 256 for shape in launches)  # the manager's page views
    for i, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt):].tolist()
        assert out[f"req_{i}"].generated_tokens == alone


@torch.no_grad()
def test_decode_fast_path_selects_each_requests_pages_as_generate_does(monkeypatch):
    """Past the token budget the dense heads select pages, each request at its own length: a budget of two 16-token
    pages, prompts of 9, 40, 70 and 70 tokens and 28 new tokens (the 9-token one crosses the budget while decoding;
    the two of 70 select in one call); selections made every 4 steps and reused between (found again from the
    request's own pages); every request's
    tokens equal generate()'s with the same settings, and differ from reading every token somewhere."""
    from sparse_attn_hf.methods import batched_pages

    model = tiny_model(heads=4, kv_heads=2, layers=2)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    settings = dict(streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16, logical_page_size=4,
                    decode_local_size=8, streaming_from=0, token_budget=32, reuse_interval=4)
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(page_selection="always", **settings))
    prompts = [random_ids(1, n, seed=seed)[0].tolist() for n, seed in ((9, 9), (40, 40), (70, 70), (70, 71))]
    config = GenerationConfig(max_new_tokens=28, do_sample=False, eos_token_id=-1, pad_token_id=0)
    made = []
    choose = batched_pages.BatchedPages._choose
    monkeypatch.setattr(batched_pages.BatchedPages, "_choose",
                        staticmethod(lambda *args: made.append(args[5]) or choose(*args)))
    out = model.generate_batch(inputs=prompts, generation_config=config)
    got = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    alone = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
    assert got == alone
    # the 70-token requests select at their first step (71 tokens) and every 4th after, together, in each layer
    assert {n for n in made if n >= 71} == set(range(71, 98, 4)) and made.count(71) == 2
    assert 33 in made  # the 9-token request: its first step past two pages
    unpatch_model(model)
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(page_selection="never", **settings))
    every = model.generate_batch(inputs=prompts, generation_config=config)
    assert [every[f"req_{i}"].generated_tokens for i in range(len(prompts))] != got


def test_the_cache_is_planned_without_an_attention_mask_the_package_never_reads(monkeypatch):
    """The manager's memory planner sets aside room for an attention mask for every attention but flash's; the
    package's reads cu_seq_lens and gets none, so the same memory plans a larger cache for it."""
    import copy

    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching.cache import PagedAttentionMemoryHandler

    monkeypatch.setattr(PagedAttentionMemoryHandler, "get_available_memory", lambda self: 1 << 30)
    model = tiny_model(heads=4, kv_heads=2, layers=2)
    stock = copy.deepcopy(model.config)
    patch_model(model, Profile.all_dense(model))
    planned = {}
    for config in (stock, model.config):
        block = 2 * 2 * 2 * 16 * 4 * 256  # K and V, 2 layers, 2 KV heads, head_dim 16, float32, pages of 256
        handler = PagedAttentionMemoryHandler(config=config, cb_config=ContinuousBatchingConfig(max_requests_per_batch=8),
                                              dtype=torch.float32, bytes_per_sector=block, tokens_per_sector=256,
                                              bytes_per_block=block, attn_types=["full_attention"])
        planned[config._attn_implementation] = (handler.num_attention_masks, handler.infer_max_batch_tokens_and_num_sectors())
    assert planned["sdpa"][0] == 1 and planned["sparse_attn_hf"][0] == 0
    assert planned["sparse_attn_hf"][1][1] > 2 * planned["sdpa"][1][1]  # sectors: at least twice the cache


def test_requests_of_a_packed_call_are_told_apart():
    """The manager's packing: a prompt (no past), a decode step (one token after a past), a prompt chunk after a
    past, and an empty place (its request count padded) are attended as such."""
    calls = []

    def attend(module, q, k, v, mask, scaling, position_ids=None, request=None, **kwargs):
        calls.append((q.shape[2], k.shape[2], request))
        return q.transpose(1, 2) * 0 + len(calls), None

    q = torch.randn(1, 2, 1 + 1 + 3, 4)
    k = torch.randn(1, 1, 5 + 8 + 6, 4)
    cu_q, cu_k = torch.tensor([0, 1, 2, 5, 5]), torch.tensor([0, 5, 13, 19, 19])
    out, _ = batching.packed_requests(attend, None, q, k, k, 0.5, {"cu_seq_lens_q": cu_q, "cu_seq_lens_k": cu_k,
                                                                   "position_ids": torch.arange(5)[None]})
    assert [(n_q, n_k) for n_q, n_k, _ in calls] == [(1, 5), (1, 8), (3, 6)]
    assert [c[2] for c in calls] == [batching.Request(True, 4), batching.Request(True, 7), batching.Request(False, 3)]
    assert out.shape == (1, 5, 2, 4) and out[0, :, 0, 0].tolist() == [1, 2, 3, 3, 3]


@torch.no_grad()
def test_requests_joining_and_leaving_a_running_batch_keep_their_answers():
    """A request that arrives while others decode, and one cancelled among them: every request that finishes gets
    what generate() gives its prompt alone."""
    import time

    model = _patched(0)
    prompts = {name: random_ids(1, n, seed=n)[0].tolist() for name, n in (("long", 70), ("short", 20), ("late", 33),
                                                                            ("cancelled", 45))}
    limits = {"long": 40, "short": 6, "late": 10, "cancelled": 40}
    manager = model.init_continuous_batching(generation_config=GREEDY)
    manager.start()
    try:
        for name in ("long", "short", "cancelled"):
            manager.add_request(prompts[name], request_id=name, max_new_tokens=limits[name], eos_token_id=-1)
        first = manager.get_result(timeout=60)  # the batch is decoding: "short" finishes first
        assert first is not None
        manager.cancel_request("cancelled")
        manager.add_request(prompts["late"], request_id="late", max_new_tokens=limits["late"], eos_token_id=-1)
        results = {first.request_id: first}
        deadline = time.time() + 120
        while not {"long", "short", "late"} <= results.keys() and time.time() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop(block=True)
    for name in ("long", "short", "late"):
        alone = model.generate(torch.tensor([prompts[name]]), generation_config=GREEDY,
                               max_new_tokens=limits[name])[0, len(prompts[name]):].tolist()
        assert results[name].generated_tokens == alone, name


@torch.no_grad()
def test_decode_steps_sharing_a_forward_with_a_prompt_select_pages_too(monkeypatch):
    """A request arriving while others decode past the token budget: the steps that share a forward with its prompt
    are served by the fast path's rule on the read-back keys (``packed_decode_rows``), page selection included, and
    every request still gets generate()'s tokens with the same settings."""
    import time

    model, _ = _selecting()
    served, fast = [], []
    rows, step = batching.packed_decode_rows, batching.block_table_decode_step
    monkeypatch.setattr("sparse_attn_hf.attention.packed_decode_rows",
                        lambda *args: (lambda out: served.append(out is not None) or out)(rows(*args)))
    monkeypatch.setattr("sparse_attn_hf.attention.block_table_decode_step", lambda *args: fast.append(1) or step(*args))
    prompts = {"long": random_ids(1, 70, seed=70)[0].tolist(), "late": random_ids(1, 50, seed=50)[0].tolist()}
    limits = {"long": 40, "late": 12}
    manager = model.init_continuous_batching(generation_config=GREEDY)
    manager.start()
    results = {}
    try:
        manager.add_request(prompts["long"], request_id="long", max_new_tokens=limits["long"], eos_token_id=-1)
        deadline = time.time() + 60
        while not fast and time.time() < deadline:  # "long" decodes: the next prompt shares its steps
            time.sleep(0.005)
        manager.add_request(prompts["late"], request_id="late", max_new_tokens=limits["late"], eos_token_id=-1)
        deadline = time.time() + 120
        while not {"long", "late"} <= results.keys() and time.time() < deadline:
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                results[result.request_id] = result
    finally:
        manager.stop(block=True)
    assert any(served), "no decode step shared a forward with the late prompt"
    for name in ("long", "late"):
        alone = model.generate(torch.tensor([prompts[name]]), generation_config=GREEDY,
                               max_new_tokens=limits[name])[0, len(prompts[name]):].tolist()
        assert results[name].generated_tokens == alone, name


def test_decode_steps_off_the_fast_path_select_pages_too(monkeypatch):
    """A manager without the decode fast path (``max_blocks_per_request=0``, as for a request longer than the block
    table) and with flash's variable-length kernel (made to look available; its reference runs on the CPU): decode
    steps within the token budget keep the three variable-length launches, steps past it go through the read-back
    row's rule (``packed_decode_rows``), page selection included, and every request gets generate()'s tokens."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model, _ = _selecting()
    monkeypatch.setattr("sparse_attn_hf.ops.varlen_available", lambda tensor: True)
    varlen, rows = [], []
    step, read_back = batching.packed_decode_step, batching.packed_decode_rows
    monkeypatch.setattr("sparse_attn_hf.attention.packed_decode_step",
                        lambda *args: (lambda out: varlen.append((int(args[-1]["max_length_k"]), out is not None))
                                       or out)(step(*args)))
    monkeypatch.setattr("sparse_attn_hf.attention.packed_decode_rows",
                        lambda *args: (lambda out: rows.append(out is not None) or out)(read_back(*args)))
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (9, 14, 20)]
    config = GenerationConfig(max_new_tokens=20, do_sample=False, eos_token_id=-1, pad_token_id=0)
    out = model.generate_batch(inputs=prompts, generation_config=config,
                               continuous_batching_config=ContinuousBatchingConfig(max_blocks_per_request=0))
    got = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    alone = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
    assert got == alone
    assert {served for longest, served in varlen if longest <= 32} == {True}  # within the budget: varlen launches
    assert {served for longest, served in varlen if longest > 32} == {False}  # past it: handed on, and served
    assert any(rows) and all(rows)


def test_a_request_on_a_finished_requests_pages_selects_its_own(monkeypatch):
    """One request after another on one manager: the second is given the first's freed pages, and its prompt ends
    just past the first's last selection (a selection kept by page slots would be found by the second). The second
    selects at its first decode step (selections are kept under the request's id, and the first's is dropped when
    its blocks are freed), and gets generate()'s tokens."""
    import time

    model, made = _selecting(monkeypatch)
    # the first: 40 tokens and 10 new, selections at 41, 45 and 49; the second: 50 tokens, first step at 51, which
    # would find a selection made at 49 under its first token's and its tail's slots
    prompts = {"first": random_ids(1, 40, seed=40)[0].tolist(), "second": random_ids(1, 50, seed=50)[0].tolist()}
    manager = model.init_continuous_batching(generation_config=GREEDY)
    manager.start()
    results = {}
    try:
        for name in ("first", "second"):
            manager.add_request(prompts[name], request_id=name, max_new_tokens=10, eos_token_id=-1)
            deadline = time.time() + 60
            while name not in results and time.time() < deadline:
                result = manager.get_result(timeout=1)
                if result is not None and result.is_finished():
                    results[result.request_id] = result
    finally:
        manager.stop(block=True)
    assert made == [41] * 2 + [45] * 2 + [49] * 2 + [51] * 2 + [55] * 2 + [59] * 2  # per layer
    for name in ("first", "second"):
        alone = model.generate(torch.tensor([prompts[name]]), generation_config=GREEDY,
                               max_new_tokens=10)[0, len(prompts[name]):].tolist()
        assert results[name].generated_tokens == alone, name


def test_page_selections_count_forwards_and_stop_under_graph_capture(monkeypatch):
    """The store counts forwards by layer index (one that does not grow starts the next); a call inside a CUDA-graph
    capture turns selection off for good (its replays would be unseen); a new manager starts with a fresh store."""
    from sparse_attn_hf.methods.batched_pages import BatchedPages

    pages = BatchedPages()
    for layer in (0, 1, 2, 0, 1, 0):
        pages.note(layer, torch.device("cpu"))
    assert pages.forward == 2 and not pages.graphed
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    pages.note(1, torch.device("cpu"))
    assert not pages.graphed  # a CPU call is never captured
    pages.note(2, torch.device("cuda"))
    assert pages.graphed and pages.selection(None, 2, *[None] * 6) is None
    model = _patched(0)
    model._sparse_attn_state.batched_pages = pages
    model.init_continuous_batching(generation_config=GREEDY)
    assert model._sparse_attn_state.batched_pages is None


def test_a_follow_up_turn_is_not_given_the_first_turns_blocks(monkeypatch, caplog):
    """Multi-turn on one manager: the second prompt is the first, its answer and 5 more tokens. Transformers' manager
    would share the first turn's cached blocks with it, whose answer's keys and values decode steps made (the
    decode window of 8 tokens) where generate() of the second prompt attends them by the prompt's rule, and the
    tokens would differ (this seed). The package turns sharing off for its attention, says so once, and the second
    turn gets generate()'s tokens; ``batching.PREFIX_SHARING`` turns it back on."""
    import logging
    import time

    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = tiny_model(heads=4, kv_heads=2, layers=2)
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(5))
    patch_model(model, Profile.from_scores(model, scores), SparseConfig(
        page_selection="never", streaming_fraction=0.5, sink_size=4, local_size=24, page_size=16,
        logical_page_size=4, decode_local_size=8, streaming_from=0))  # the decode window alone tells the rules apart
    first = random_ids(1, 40, seed=32)[0].tolist()

    def alone(prompt, new_tokens):  # the answer may hold the pad token: the mask says every token is the prompt's
        ids = torch.tensor([prompt])
        return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GREEDY,
                              max_new_tokens=new_tokens)[0, len(prompt):].tolist()

    answer = alone(first, 40)
    follow = first + answer + random_ids(1, 5, seed=7)[0].tolist()

    def turns():
        manager = model.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=(
            ContinuousBatchingConfig(page_size=16, num_blocks=64)))  # sharing: Transformers' default
        manager.start()
        results, sharing = {}, None
        try:
            for name, prompt in (("first", first), ("follow", follow)):
                manager.add_request(prompt, request_id=name, max_new_tokens=20, eos_token_id=-1)
                deadline = time.time() + 60
                while name not in results and time.time() < deadline:
                    result = manager.get_result(timeout=1)
                    if result is not None and result.is_finished():
                        results[result.request_id] = result.generated_tokens
                sharing = manager.batch_processor.cache.use_prefix_sharing
        finally:
            manager.stop(block=True)
        return results, sharing

    monkeypatch.setattr("sparse_attn_hf._log._seen", set())  # said once per process: maybe by an earlier test
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        results, sharing = turns()
    assert not sharing and "without prefix sharing" in caplog.text
    assert results["first"] == answer[:20]
    assert results["follow"] == alone(follow, 20)
    monkeypatch.setattr(batching, "PREFIX_SHARING", True)
    shared, sharing = turns()
    assert sharing and shared["follow"] != results["follow"]  # what sharing would have given


def test_a_request_recomputed_for_want_of_cache_is_said(monkeypatch, caplog):
    """A cache of 8 blocks of 16 tokens for two requests of 40 and 44 tokens with 40 new each: the manager evicts
    one and will prefill its prompt and generated tokens again (a soft reset), which attends those tokens by the
    prompt's rule, not the decode steps' (its answer may then differ from its generate()). The user is told once."""
    import logging

    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = _patched(0)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (40, 44)]
    config = GenerationConfig(max_new_tokens=40, do_sample=False, eos_token_id=-1, pad_token_id=0)
    monkeypatch.setattr("sparse_attn_hf._log._seen", set())
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        out = model.generate_batch(inputs=prompts, generation_config=config, continuous_batching_config=(
            ContinuousBatchingConfig(page_size=16, num_blocks=8)))
    assert all(len(out[f"req_{i}"].generated_tokens) == 40 for i in range(2))
    assert caplog.text.count("soft reset") == 1


def test_a_gpu_manager_runs_the_package_unless_switched_off(monkeypatch, caplog):
    """On a GPU (the model's device made to read "cuda") the manager keeps the package's attention (``ON_GPU``, on
    by default); switched off, it is handed sdpa (Transformers' manager refuses a name it does not know), says so
    once, and is told to put the package's attention back when it stops."""
    import logging
    import types

    from transformers.generation.continuous_batching.continuous_api import ContinuousBatchingManager

    from sparse_attn_hf.state import ATTENTION_NAME

    model = _patched(0)
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cuda")))
    manager = types.SimpleNamespace(_original_attn_impl=None)
    assert batching.ON_GPU is True
    ContinuousBatchingManager.switch_to_cb_friendly_attn(manager, model, True)
    assert model.config._attn_implementation == ATTENTION_NAME and manager._original_attn_impl is None
    monkeypatch.setattr(batching, "ON_GPU", False)
    monkeypatch.setattr("sparse_attn_hf._log._seen", set())
    with caplog.at_level(logging.WARNING, logger="sparse_attn_hf"):
        ContinuousBatchingManager.switch_to_cb_friendly_attn(manager, model, True)
    assert model.config._attn_implementation == "sdpa" and manager._original_attn_impl == ATTENTION_NAME
    assert "ON_GPU is False" in caplog.text
    model.set_attn_implementation(manager._original_attn_impl)  # as the manager's stop() does
    assert model.config._attn_implementation == ATTENTION_NAME


def test_a_request_left_out_of_steps_keeps_its_selection(monkeypatch):
    """The ``prefill_first`` scheduler with a 64-token batch budget and two requests per batch leaves a decoding
    request out of the forwards that hold a 150-token prompt's chunks. The left-out request finds its selection
    again when it comes back (kept under its id, not its row) and selects on generate()'s schedule, every 4 steps
    from its first; every request gets generate()'s tokens."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model, made = _selecting(monkeypatch)
    sizes = {"a": (40, 30), "b": (8, 6), "c": (150, 3)}  # (prompt, new tokens)
    prompts = {name: random_ids(1, n, seed=n)[0].tolist() for name, (n, _) in sizes.items()}
    manager = model.init_continuous_batching(generation_config=GREEDY, continuous_batching_config=(
        ContinuousBatchingConfig(scheduler_type="prefill_first", max_batch_tokens=64, max_requests_per_batch=2,
                                 page_size=16, num_blocks=64)))
    manager.start()
    results = {}
    try:
        for name, (_, new) in sizes.items():
            manager.add_request(prompts[name], request_id=name, max_new_tokens=new, eos_token_id=-1)
        while len(results) < 3:
            result = manager.get_result(timeout=60)
            assert result is not None
            if result.is_finished():
                results[result.request_id] = result.generated_tokens
    finally:
        manager.stop(block=True)
    # "a" selects at 41, 45, ..., 69 (its last step); "c" at its one step past 150; each in its one dense layer
    assert sorted(set(made)) == list(range(41, 70, 4)) + [151]
    for name, (_, new) in sizes.items():
        ids = torch.tensor([prompts[name]])
        alone = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=GREEDY,
                               max_new_tokens=new)[0, ids.shape[1]:].tolist()
        assert results[name] == alone, name


def test_lengths_read_on_the_host_once_per_forward():
    """cu_seq_lens are read once per forward and tensor (layers in order share them), again when a forward starts
    (the layer index does not grow) or another tensor comes, and per thread."""
    import threading

    import torch

    from sparse_attn_hf.batching import _on_host

    reads = []

    class Lengths:
        def __init__(self, values):
            self.values = values

        def tolist(self):
            reads.append(self.values)
            return list(self.values)

    first, window = Lengths([0, 3, 5]), Lengths([0, 2, 4])  # full-attention layers and sliding ones, alternating
    assert [_on_host(layer, (first, window)[layer % 2]) for layer in range(6)] == [[0, 3, 5], [0, 2, 4]] * 3
    assert reads == [[0, 3, 5], [0, 2, 4]]
    first.values = [0, 1, 9]  # the manager's static buffer, refilled for the next step
    assert _on_host(0, first) == [0, 1, 9] and len(reads) == 3  # a new forward reads again
    other = []
    thread = threading.Thread(target=lambda: other.append(_on_host(1, first)))
    thread.start()
    thread.join()
    assert other == [[0, 1, 9]] and len(reads) == 4  # another thread keeps its own
    assert _on_host(1, torch.tensor([0, 7])) == [0, 7]


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_decode_step_matches_each_request_attended_alone(dtype):
    """A decode step of every packed request in variable-length launches (``batching.packed_decode_step``: all
    keys, the decode window and the sink keys before it, merged by log-sum-exp) equals the per-request path, for
    lengths below the window, between it and sink + window, past it, and a one-token request. On the CPU the
    variable-length op runs its reference; on a GPU flash's kernel."""
    from conftest import DEVICE

    from helpers import assert_close_by_rule

    from sparse_attn_hf import ops
    from sparse_attn_hf.attention import sparse_attention_forward
    from sparse_attn_hf.kernels.layout import LogitTerms

    model = _patched(0).to(DEVICE, dtype)  # sink 4, decode window 8; one streaming KV head per layer
    gen = torch.Generator().manual_seed(11)
    lengths = [1, 6, 10, 12, 40]
    for layer in (0, 1):
        module = model.model.layers[layer].self_attn
        state = module._sparse_attn_state
        cu_k = torch.tensor([0] + lengths).cumsum(0).to(DEVICE)
        q = torch.randn(1, 4, len(lengths), 16, generator=gen).to(DEVICE, dtype)
        kv = torch.randn(2, sum(lengths), 2, 16, generator=gen).to(DEVICE, dtype)  # the manager's [T, Hkv, D]
        k, v = (x.transpose(0, 1).unsqueeze(0) for x in kv)
        kwargs = {"cu_seq_lens_q": torch.arange(len(lengths) + 1, device=DEVICE), "cu_seq_lens_k": cu_k,
                  "max_length_q": 1, "max_length_k": max(lengths)}
        assert batching.decode_only(q, kwargs)
        got = batching.packed_decode_step(state, module, q, k, v, LogitTerms(0.25), kwargs)
        alone, _ = batching.packed_requests(sparse_attention_forward, module, q, k, v, 0.25, dict(kwargs))
        golden = torch.empty(1, len(lengths), 4, 16, dtype=torch.float64)  # the rule, in float64, by hand
        _, streaming = state.head_lists(layer)
        for r, n in enumerate(lengths):
            start = int(cu_k[r])
            for head in range(4):
                slots = torch.arange(n)
                seen = (slots < 4) | (slots >= n - 8) if head // 2 in streaming else torch.ones(n, dtype=torch.bool)
                keys, values = (x[start : start + n, head // 2].double().cpu()[seen] for x in kv)
                probs = torch.softmax(keys @ q[0, head, r].double().cpu() * 0.25, 0)
                golden[0, r, head] = probs @ values
        assert got.shape == alone.shape == (1, len(lengths), 4, 16)
        assert_close_by_rule(got.float().cpu(), golden.float().cpu(), alone.float().cpu())
        # the streaming heads' rows differ from every head's full attention past sink + window: the merge is used
        full, _ = ops.varlen_attention(q[0].transpose(0, 1), kv[0], kv[1], kwargs["cu_seq_lens_q"], cu_k, 1, 40,
                                       scale=0.25)
        assert not torch.allclose(got[0, -1].float(), full[-1].float(), atol=1e-3)


@torch.no_grad()
def test_packed_decode_step_of_dense_heads_is_full_attention_and_softcap_declines():
    """Every head dense: the packed decode step is each request's full attention over its keys (one launch). A model
    whose layer has logit terms flash lacks (soft-capping) gets None: the per-request path serves it."""
    from sparse_attn_hf.kernels.layout import LogitTerms

    model = tiny_model(heads=4, kv_heads=2, layers=2)
    patch_model(model, Profile.all_dense(model))
    module = model.model.layers[1].self_attn
    state = module._sparse_attn_state
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 17]
    cu_k = torch.tensor([0] + lengths).cumsum(0)
    q = torch.randn(1, 4, 2, 16, generator=gen)
    kv = torch.randn(2, 20, 2, 16, generator=gen)
    k, v = (x.transpose(0, 1).unsqueeze(0) for x in kv)
    kwargs = {"cu_seq_lens_q": torch.arange(3), "cu_seq_lens_k": cu_k, "max_length_q": 1, "max_length_k": 17}
    got = batching.packed_decode_step(state, module, q, k, v, LogitTerms(0.25), kwargs)
    for r, n in enumerate(lengths):
        start = int(cu_k[r])
        keys, values = (x[start : start + n].transpose(0, 1).repeat_interleave(2, 0) for x in kv)
        expected = torch.softmax(q[0, :, r, None] @ keys.transpose(-1, -2) * 0.25, -1) @ values  # [4, 1, 16]
        torch.testing.assert_close(got[0, r], expected[:, 0], rtol=1e-5, atol=1e-5)
    assert batching.packed_decode_step(state, module, q, k, v, LogitTerms(0.25, 30.0), kwargs) is None


@torch.no_grad()
def test_batched_page_selection_on_real_weights_and_held_out_text(default_model, monkeypatch):
    """The default model's shipped profile on held-out text (never used to fit it), three prompts of 500-1100 tokens
    past a budget of four 64-token pages, 16 new tokens: generate_batch gives every request the greedy tokens of
    generate() with the same page selection (which selected, every 4 steps), as without one."""
    from sparse_attn_hf import patched
    from sparse_attn_hf.eval.heldout import heldout_text
    from sparse_attn_hf.methods import batched_pages

    made = []
    choose = batched_pages.BatchedPages._choose
    monkeypatch.setattr(batched_pages.BatchedPages, "_choose",
                        staticmethod(lambda *args: made.append(args[5]) or choose(*args)))

    model, tokenizer = default_model
    ids = tokenizer(heldout_text("reporting")[:40000], add_special_tokens=False).input_ids
    prompts = [ids[start:start + n] for start, n in ((0, 1100), (1500, 500), (2500, 800))]
    config = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    for mode in ("always", "never"):
        with patched(model, config=SparseConfig(page_selection=mode, token_budget=256)):
            out = model.generate_batch(inputs=prompts, generation_config=config)
            got = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
            alone = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
        assert got == alone, mode
    assert sorted(set(made)) == [n + k for n in (500, 800, 1100) for k in (1, 5, 9, 13)]  # each request, every 4

"""The page-selection oracle and the attention-mass recall (issue: held-out fidelity, page selection)."""

import pytest
import torch
from conftest import DEVICE
from helpers import random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig, patched
from sparse_attn_hf.eval import page_oracle


def test_mass_recall_on_a_hand_example():
    mass = torch.tensor([[[0.5, 0.2, 0.1, 0.2]]])
    pages = torch.tensor([[[0, -1]]], dtype=torch.int32)
    assert page_oracle.mass_recall(mass, pages, tail_first=3).item() == pytest.approx(0.7)  # pages 0 and 3
    assert page_oracle.mass_recall(mass, pages[:, :, :0], tail_first=0).item() == 1.0  # everything read


def test_page_mass_sums_the_groups_attention_per_page():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8, generator=gen), torch.randn(2, 3, 50, 8, generator=gen)
    kv_start = torch.tensor([0, 7])
    mass = page_oracle.page_mass(q, k, kv_start=kv_start, seen=45, page_size=16, scale=0.3)
    assert mass.shape == (2, 3, 3)
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 3), 4.0))  # each of the 4 query heads holds 1
    scores = (q @ k[:, :, :45].transpose(-1, -2)) * 0.3
    scores[1, :, :, :7] = float("-inf")
    probs = torch.softmax(scores, -1).sum(2)
    torch.testing.assert_close(mass[:, :, 1], probs[:, :, 16:32].sum(-1))
    assert mass[1, :, 0].min() > 0 and probs[1, :, :7].sum() == 0


@pytest.mark.parametrize("seed", range(4))
def test_oracle_pages_equal_brute_force_top_k(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, heads, n_pages, page, budget = 2, 3, 11, 16, 5 * 16
    mass = torch.rand(batch, heads, n_pages, generator=gen)
    kv_start = torch.tensor([0, int(torch.randint(1, 60, (1,), generator=gen))])
    pages, tail_first = page_oracle.oracle_pages(mass, kv_start=kv_start, budget=budget, page_size=page)
    assert tail_first == n_pages - 1 and pages.shape == (batch, heads, budget // page - 1)
    for b in range(batch):
        first_real = int(kv_start[b]) // page
        for h in range(heads):
            candidates = [p for p in range(first_real + 1, tail_first)]
            ranked = sorted(candidates, key=lambda p: -float(mass[b, h, p]))
            expected = {first_real, *ranked[: budget // page - 2]}
            assert set(pages[b, h].tolist()) == expected


@torch.no_grad()
def test_oracle_recall_is_at_least_quests_on_the_same_step():
    """The first decode step sees the same cache either way: there the oracle's pages hold at least the mass of
    Quest's (same budget, same always-kept pages)."""
    model = tiny_model("llama", heads=6, kv_heads=2, layers=2, head_dim=16).to(DEVICE)
    ids = random_ids(1, 300).to(DEVICE)
    config = SparseConfig(token_budget=64, page_size=16, logical_page_size=4, reuse_interval=1, page_selection="always")
    recalls = {}
    with patched(model, Profile.all_dense(model), config):
        for kind in ("quest", "oracle"):
            with page_oracle.recording(kind, scale=16**-0.5) as got:
                model.generate(ids, max_new_tokens=2, do_sample=False)
            recalls[kind] = torch.tensor(got)
    assert recalls["quest"].shape == recalls["oracle"].shape == (2 * 2,)  # one step x 2 layers x 2 KV heads
    assert (recalls["oracle"] >= recalls["quest"] - 1e-6).all()
    assert (recalls["oracle"] <= 1 + 1e-6).all() and (recalls["quest"] > 0).all()
    assert recalls["oracle"].mean() > recalls["quest"].mean()  # the bound does not find the best pages here


def test_recording_rejects_an_unknown_selector():
    with pytest.raises(ValueError, match="quest"):
        with page_oracle.recording("best", scale=1.0):
            pass


def test_per_head_variant_shares_the_budget_round_robin():
    """Two query heads of one KV head that like different pages each get their best pages in turn."""
    dim, lp, page = 4, 16, 16
    n = 8  # pages; page 7 is the tail
    key_min = torch.zeros(1, 1, n, dim)
    key_max = torch.zeros(1, 1, n, dim)
    key_max[0, 0, [1, 2], 0] = torch.tensor([5.0, 4.0])  # head 0 (looks along dim 0) likes pages 1, 2
    key_max[0, 0, [4, 5], 1] = torch.tensor([3.0, 2.0])  # head 1 (dim 1) likes pages 4, 5, less strongly
    query = torch.zeros(1, 1, 2, dim)
    query[0, 0, 0, 0] = query[0, 0, 1, 1] = 1.0
    common = dict(kv_start=torch.zeros(1, dtype=torch.long), seen=n * page, budget=4 * page, page_size=page,
                  logical_page_size=lp)
    pages, tail = page_oracle.per_head_pages(query, key_min, key_max, **common)
    assert tail == 7 and set(pages[0, 0].tolist()) == {0, 1, 4}  # sink, then each head's best page
    from sparse_attn_hf.methods.page_selection import quest_pages

    quest, _ = quest_pages(query, key_min, key_max, **common)
    assert set(quest[0, 0].tolist()) == {0, 1, 2}  # the group maximum favours head 0's pages


def test_recent_variant_keeps_the_newest_pages_and_the_best_of_the_rest():
    """A quarter of the selected pages (here 2 of 7) are the newest before the tail; the sink page and the
    bound's best fill the rest."""
    gen = torch.Generator().manual_seed(3)
    page, n = 16, 20  # pages; page 19 is the tail
    key_min = torch.randn(1, 2, n, 8, generator=gen)
    key_max = key_min + torch.rand(1, 2, n, 8, generator=gen)
    query = torch.randn(1, 2, 3, 8, generator=gen)
    common = dict(kv_start=torch.zeros(1, dtype=torch.long), seen=n * page, budget=8 * page, page_size=page,
                  logical_page_size=page)
    pages, tail = page_oracle.recent_pages(query, key_min, key_max, **common)
    assert tail == 19 and pages.shape == (1, 2, 7)
    from sparse_attn_hf.kernels.reference import page_scores

    bound = page_scores(query, key_min, key_max)[..., :19].amax(2)  # [1, 2, pages]
    for h in range(2):
        chosen = set(pages[0, h].tolist())
        assert {0, 17, 18} <= chosen
        best = set(torch.topk(bound[0, h, 1:17], 4).indices.add(1).tolist())
        assert chosen - {0, 17, 18} == best


@pytest.mark.parametrize("radius", [1.0, 0.5])
def test_mass_estimate_variant_equals_the_oracle_where_bounds_are_exact(radius):
    """Pages whose logical pages hold identical keys have exact bounds (min = max = the key): the estimated mass
    is then the true mass, so the variant picks the oracle's pages, whatever the shrink towards the midpoint."""
    generator = torch.Generator().manual_seed(5)
    batch, heads, groups, dim, page, logical, seen = 2, 2, 3, 16, 16, 4, 16 * 9 + 3
    n_logical = -(-seen // logical)
    per_logical = torch.randn(batch, heads, n_logical, dim, generator=generator)
    keys = per_logical.repeat_interleave(logical, dim=2)[:, :, :seen]
    query = torch.randn(batch, heads, groups, dim, generator=generator) * 2
    kv_start = torch.tensor([0, 20])  # row 1: a padded start (its first page holds padding only)
    scale = dim ** -0.5
    pages, tail = page_oracle.mass_estimate_pages(query, per_logical, per_logical, kv_start=kv_start, seen=seen,
                                                  budget=4 * page, page_size=page, logical_page_size=logical,
                                                  scale=scale, radius=radius)
    mass = page_oracle.page_mass(query, keys, kv_start=kv_start, seen=seen, page_size=page, scale=scale)
    # the true mass of real tokens only: padded keys of row 1's first real page still hold statistics here
    expected, expected_tail = page_oracle.oracle_pages(mass, kv_start=kv_start, budget=4 * page, page_size=page)
    assert tail == expected_tail == 9
    assert torch.equal(pages[0].sort(-1).values, expected[0].sort(-1).values)
    assert (pages[1] == 1).any(-1).all()  # row 1's first real page (slot 20 is in page 1) is always kept


def test_rerank_variant_is_the_oracle_when_the_short_list_holds_every_page():
    """With a short list as long as the context, the second stage reads every candidate page's keys: its choice is
    the oracle's; with a short list of 2x the budget it picks only pages the bound short-listed."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, groups, dim, page, logical, seen = 1, 2, 3, 16, 16, 4, 16 * 12 + 5
    keys = torch.randn(batch, heads, 256, dim, generator=generator)
    query = torch.randn(batch, heads, groups, dim, generator=generator) * 2
    n_logical = -(-seen // logical)
    stored = keys[:, :, : n_logical * logical].clone()
    stored[:, :, seen:] = 0  # unwritten slots hold zeros, as in the cache
    key_min = stored.view(batch, heads, n_logical, logical, dim).amin(3)
    key_max = stored.view(batch, heads, n_logical, logical, dim).amax(3)
    kv_start, scale = torch.zeros(batch, dtype=torch.long), dim ** -0.5
    common = dict(kv_start=kv_start, seen=seen, budget=4 * page, page_size=page, logical_page_size=logical,
                  scale=scale)
    pages, tail = page_oracle.rerank_pages(query, keys, key_min, key_max, factor=100, **common)
    mass = page_oracle.page_mass(query, keys, kv_start=kv_start, seen=seen, page_size=page, scale=scale)
    expected, expected_tail = page_oracle.oracle_pages(mass, kv_start=kv_start, budget=4 * page, page_size=page)
    assert tail == expected_tail == 12
    assert torch.equal(pages.sort(-1).values, expected.sort(-1).values)
    short, _ = page_oracle.rerank_pages(query, keys, key_min, key_max, factor=2, **common)
    bound = page_oracle._page_bounds(query, key_min, key_max, seen=seen, budget=4 * page, page_size=page,
                                     logical_page_size=logical)[0].amax(2)
    listed = torch.topk(bound, 6, dim=-1).indices
    assert all(int(p) in listed[0, h].tolist() + [0] for h in range(heads) for p in short[0, h])

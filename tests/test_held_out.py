"""The profiler's held-out choice of the default streaming fraction (rule, refusal, metadata, measurement)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from helpers import random_ids, tiny_model

from sparse_attn_hf import Profile, SparseConfig
from sparse_attn_hf.api import patched
from sparse_attn_hf.eval.heldout import heldout_text
from sparse_attn_hf.profiler import held_out
from sparse_attn_hf.profiler.report import report_text


def _rows(losses: dict) -> list[dict]:
    return [{"fraction": f, "cells": 40, "dense_correct": 30, "lost": lost} for f, lost in losses.items()]


class _Tok:
    """Decodes token ids as their numbers (answers compared as text)."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_rule_takes_the_largest_fraction_with_a_margin():
    choice = held_out.choose_fraction(_rows({0.3: 0, 0.35: 0, 0.4: 1, 0.45: 3, 0.5: 0}))
    # 0.5 loses nothing but 0.55 was not measured: no margin, not taken; 0.4 loses one
    assert choice["fraction"] == 0.35
    assert [r["fraction"] for r in choice["rows"]] == [0.3, 0.35, 0.4, 0.45, 0.5]


def test_rule_fails_on_a_knife_edge_and_the_refusal_names_the_flag():
    choice = held_out.choose_fraction(_rows({0.25: 0, 0.3: 2, 0.35: 1}))
    assert choice["fraction"] is None  # 0.25 loses nothing but 0.3 loses two
    with pytest.raises(ValueError, match=held_out.ALLOW_FLAG):
        held_out.check_default(0.25, choice)
    held_out.check_default(0.25, choice, allow=True)
    passing = held_out.choose_fraction(_rows({0.25: 0, 0.3: 1}))
    held_out.check_default(0.25, passing)
    with pytest.raises(ValueError, match="exceeds the held-out choice 0.25"):
        held_out.check_default(0.3, passing)


def test_choice_round_trips_through_the_profile_file(tmp_path):
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2)
    choice = held_out.choose_fraction(_rows({0.3: 0, 0.35: 1}))
    profile = Profile.from_scores(model, torch.rand(2, 2), fraction_choice=held_out.to_metadata(choice, "choosing"))
    loaded = Profile.load(profile.save(tmp_path / "p.safetensors"))
    assert held_out.from_metadata(loaded.fraction_choice) == {**choice, "choosing_text": "choosing"}
    assert "fraction chosen on choosing: 0.3" in report_text(loaded)
    assert "not checked on held-out text" in report_text(Profile.from_scores(model, torch.rand(2, 2)))


@torch.no_grad()
def test_measure_counts_cells_lost_against_dense():
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2).to(DEVICE)
    tokens = [random_ids(1, 60, seed=s).to(DEVICE) for s in (1, 2)]

    dense = [_Tok().decode(model.generate(ids, max_new_tokens=3, do_sample=False)[0, 60:]) for ids in tokens]
    assert dense[1] != "1 2 3"
    # a real judge: the first cell expects dense's own answer, the second one that dense does not give
    cells = [(tokens[0], lambda answer: answer == dense[0]), (tokens[1], lambda answer: answer == "1 2 3")]
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(0))
    profile = Profile.from_scores(model, scores, sink_size=1, local_size=3)  # a 4-token window binds at 60
    exact, streaming = held_out.measure(model, _Tok(), profile, cells, [0.0, 1.0], tokens[0], max_new_tokens=3)
    assert exact["fraction"] == 0.0 and streaming["fraction"] == 1.0
    assert exact["dense_correct"] == 1 and exact["lost"] == 0 and exact["cell_lost"] == [False, False]
    assert exact["text_kl"] < 1e-6 and exact["first_token_kl"] < 1e-6, exact
    # every head streams over 4 tokens: the first cell's answer changes; the second was never right
    assert streaming["dense_correct"] == 1 and streaming["lost"] == 1 and streaming["gained"] == 0, streaming
    assert streaming["cell_lost"] == [True, False] and streaming["first_token_kl"] > 1e-4, streaming

    # the text KL is KL(dense || patched) per position, averaged: computed here independently
    dense_logp = F.log_softmax(model(tokens[0], use_cache=False).logits[0].float(), dim=-1)
    with patched(model, profile, SparseConfig(streaming_fraction=1.0)):
        sparse_logp = F.log_softmax(model(tokens[0], use_cache=False).logits[0].float(), dim=-1)
    expected = float(F.kl_div(sparse_logp, dense_logp, log_target=True, reduction="none").sum(-1).mean())
    assert expected > 1e-4 and abs(streaming["text_kl"] - expected) < 1e-4 * expected, (streaming, expected)
    # and the 4-token window still predicts closer to dense than a uniform guess over the vocabulary does
    # (measured: 0.0055 against 0.013)
    uniform = float((dense_logp.exp() * (dense_logp + math.log(dense_logp.shape[-1]))).sum(-1).mean())
    assert streaming["text_kl"] < uniform, (streaming, uniform)


def test_held_out_halves_are_disjoint_text():
    choosing, reporting = heldout_text("choosing"), heldout_text("reporting")
    assert len(choosing) > 100_000 and len(reporting) > 100_000
    assert choosing[:2000] not in reporting and reporting[:2000] not in choosing
    with pytest.raises(ValueError, match="part"):
        heldout_text("fitting")


@torch.no_grad()
def test_measure_stops_a_fraction_once_it_has_lost_two_cells():
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2).to(DEVICE)
    prompts = [random_ids(1, 60, seed=s).to(DEVICE) for s in range(1, 7)]

    dense = [_Tok().decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0, 60:]) for ids in prompts]
    cells = [(ids, lambda answer, d=d: answer == d) for ids, d in zip(prompts, dense)]  # dense is right
    profile = Profile.from_scores(model, torch.rand(2, 2), sink_size=1, local_size=3)
    (row,) = held_out.measure(model, _Tok(), profile, cells, [1.0], prompts[0], max_new_tokens=4)
    assert row["dense_correct"] == 6
    assert row["lost"] == 2 and row["stopped_after"] < 6, row  # every head streams over 4 tokens: answers change


@torch.no_grad()
def test_measure_takes_further_settings_and_names_the_lost_cells():
    """A token budget below the context is passed through (the held-out fidelity benchmark's budget rows)."""
    model = tiny_model("llama", heads=4, kv_heads=2, layers=2).to(DEVICE)
    prompts = [random_ids(1, 70, seed=s).to(DEVICE) for s in range(1, 4)]

    dense = [_Tok().decode(model.generate(ids, max_new_tokens=6, do_sample=False)[0, 70:]) for ids in prompts]
    cells = [(ids, lambda answer, d=d: answer == d) for ids, d in zip(prompts, dense)]
    profile = Profile.all_dense(model)
    (exact,) = held_out.measure(model, _Tok(), profile, cells, [0.0], prompts[0], max_new_tokens=6)
    assert exact["lost"] == 0 and exact["cell_lost"] == [False] * 3
    (budget,) = held_out.measure(model, _Tok(), profile, cells, [0.0], prompts[0], max_new_tokens=6,
                                 stop_at_lost=None, settings={"token_budget": 32, "page_size": 16,
                                                              "logical_page_size": 16})
    # 32 tokens of a 70-token context per decode step: answers change (measured: all three), while the prefill
    # (the first answer token, the text) stays exact: the budget applies to decode steps only
    assert budget["lost"] >= 2 and budget["lost"] == sum(budget["cell_lost"]), budget
    assert budget["first_token_kl"] < 1e-6 and budget["text_kl"] < 1e-6, budget
    # a budget that covers the whole context (70 + 6 tokens) reads every page: exact again
    (covering,) = held_out.measure(model, _Tok(), profile, cells, [0.0], prompts[0], max_new_tokens=6,
                                   stop_at_lost=None, settings={"token_budget": 80, "page_size": 16,
                                                                "logical_page_size": 16})
    assert covering["lost"] == 0 and covering["cell_lost"] == [False] * 3, covering
    with pytest.raises(ValueError, match="token_budget"):
        held_out.measure(model, _Tok(), profile, cells, [0.0], prompts[0], settings={"token_budget": 33})


def test_late_key_prompts_hide_the_key_late_and_judge_by_it(default_model):
    _, tokenizer = default_model
    from sparse_attn_hf.eval.prose import prose_text

    prompts = held_out.late_key_prompts(tokenizer, prose_text("alice"), lengths=(2048,), depths=(0.7, 0.95),
                                        seeds=(0, 1))
    assert [(p["depth"], p["seed"]) for p in prompts] == [(0.7, 0), (0.95, 0), (0.7, 1), (0.95, 1)]
    for p in prompts:
        assert abs(p["ids"].shape[1] - 2048) < 64 and p["key"] in tokenizer.decode(p["ids"][0, p["span"]])
    distances = {p["depth"]: p["key_distance"] for p in prompts if p["seed"] == 0}
    assert distances[0.95] < 256 < distances[0.7]  # inside and past the default model's local window
    assert prompts[0]["key"] != prompts[2]["key"]  # each seed its own key ...
    assert not torch.equal(prompts[0]["ids"][:, :200], prompts[2]["ids"][:, :200])  # ... and its own filler
    cells = held_out.late_key_cells(tokenizer, prose_text("alice"), lengths=(2048,), depths=(0.9,), seeds=(3,))
    [(ids, check)] = cells
    key = held_out.late_key_prompts(tokenizer, prose_text("alice"), lengths=(2048,), depths=(0.9,), seeds=(3,))[0]["key"]
    assert check(f"The pass key is {key}.") and not check("The pass key is 12345.")


def test_the_fraction_is_chosen_on_every_named_text_with_late_keys(default_model, monkeypatch):
    """choose-fraction builds its cells from each choosing text (two genres by default), late passkeys included,
    and records the texts in the profile's metadata."""
    from types import SimpleNamespace

    from sparse_attn_hf.profiler import cli

    model, tokenizer = default_model
    seen = {}

    def measure(model, tokenizer, profile, cells, fractions, text_ids, **kwargs):
        seen["cells"], seen["fractions"] = len(cells), fractions
        return [{"fraction": f, "cells": len(cells), "dense_correct": 10, "lost": int(f > 0.3), "first_token_kl": 0.0,
                 "text_kl": 0.0} for f in fractions]

    monkeypatch.setattr(held_out, "measure", measure)
    args = SimpleNamespace(choosing_texts=held_out.CHOOSING_TEXTS, choice_lengths=(1024, 2048), fractions=(0.25, 0.3),
                           text_tokens=64, streaming_fraction=None, allow_unchecked_fraction=False)
    profile = cli._choose_fraction(args, model, tokenizer, Profile.from_scores(model, torch.rand(30, 3)))
    per_text = 2 * 5 * 2 * 2 + 4 * 5  # needle and passkey cells at 2 lengths x 5 depths x 2 offsets; late keys at 2K
    assert seen["cells"] == 2 * per_text and seen["fractions"] == [0.25, 0.3, 0.35]
    assert profile.streaming_fraction == 0.3
    choice = held_out.from_metadata(profile.fraction_choice)
    assert choice["choosing_text"] == "heldout:choosing + prose:lcet10 (with late passkeys)"

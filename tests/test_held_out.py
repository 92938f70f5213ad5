"""The profiler's held-out choice of the default streaming fraction (rule, refusal, metadata, measurement)."""

import pytest
import torch
from conftest import DEVICE
from helpers import random_ids, tiny_model

from sparse_attn_hf import Profile
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

    cells = [(ids, lambda answer: True) for ids in tokens]  # every cell right for dense
    scores = torch.rand(2, 2, generator=torch.Generator().manual_seed(0))
    rows = held_out.measure(model, _Tok(), Profile.from_scores(model, scores), cells, [0.0, 1.0], tokens[0],
                            max_new_tokens=3)
    assert [r["fraction"] for r in rows] == [0.0, 1.0]
    assert rows[0]["lost"] == 0 and rows[0]["dense_correct"] == 2 and rows[0]["text_kl"] < 1e-6
    assert rows[1]["text_kl"] >= 0


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
    assert len(budget["cell_lost"]) == 3 and budget["lost"] == sum(budget["cell_lost"])
    with pytest.raises(ValueError, match="token_budget"):
        held_out.measure(model, _Tok(), profile, cells, [0.0], prompts[0], settings={"token_budget": 33})

"""The profiler: gate training, attention statistics, the SampleAttention sweep, Duo import, the CLI."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sparse_attn_hf import Profile, SparseConfig, patch_model, unpatch_model
from sparse_attn_hf.eval.haystack import haystack_text
from sparse_attn_hf.profiler import cli
from sparse_attn_hf.profiler.calibration import Calibration, length_grid
from sparse_attn_hf.profiler.duo_import import import_duo, read_gates
from sparse_attn_hf.profiler.gates import GateSettings, _lr_factor, train_gates

# the command lines pass caches under the installed release's keyword: no deprecation warning
pytestmark = pytest.mark.filterwarnings("error::FutureWarning")

LAYERS, KV_HEADS = 2, 2
TINY_ARGS = ["--lengths", "200,260", "--sink", "8", "--local", "32", "--text-tokens", "128", "--dense-below", "0",
             "--crossover-lengths", "256,512"]  # timed on a GPU only


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "</s>", "<s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([haystack_text("all")], trainer)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a BPE tokenizer trained on the haystack, saved as a model directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = _tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=16, max_position_embeddings=1024,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def _run(argv):
    cli.main([str(a) for a in argv])


def test_calibration_samples_are_seeded_and_hold_their_answer(tiny):
    _, _, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    first, again = (calibration.samples(3, (200, 260), seed=5) for _ in range(2))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again))
    other = calibration.samples(3, (200, 260), seed=6)
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, other))
    for sample in first:
        rows = sample.answer_rows
        answer = tokenizer.decode(sample.input_ids[0, rows.start + 1 : rows.stop + 1])
        assert answer.strip() == sample.key
        needle = tokenizer.decode(sample.input_ids[0, sample.needle])
        assert sample.key in needle
    assert length_grid((200, 200)) == [200]
    with pytest.raises(ValueError, match="MIN,MAX"):
        length_grid((300, 200))


def test_calibration_rejects_empty_and_short_text(tiny, tmp_path):
    _, _, tokenizer = tiny
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        Calibration.from_file(tokenizer, empty)
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(ValueError, match="longer text"):
        Calibration.from_file(tokenizer, short)
    with pytest.raises(FileNotFoundError):
        Calibration.from_file(tokenizer, tmp_path / "missing.txt")


def test_lr_schedule_warms_up_and_decays():
    steps = 100
    factors = [_lr_factor(s, steps) for s in range(steps)]
    assert factors[0] == pytest.approx(0.1)
    assert factors[19] == 1.0 and factors[50] == 1.0
    assert factors[-1] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(factors[:20], factors[1:20]))


def test_gate_training_learns_and_is_deterministic(tiny):
    _, model, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    settings = GateSettings(steps=6, lr=0.05, sink=8, local=32, lengths=(200, 260), seed=3)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = train_gates(model, calibration, settings)
    second = train_gates(model, calibration, settings)
    assert torch.equal(first.gates, second.gates)
    assert first.gates.shape == (LAYERS, KV_HEADS)
    assert ((first.gates >= 0) & (first.gates <= 1)).all()
    assert (first.gates < 1).any()  # the L1 penalty moved them
    assert first.losses[0][0] < 1e-8 < max(loss for loss, _ in first.losses)  # gates at 1 start equal to full
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights untouched
    assert not any(p.requires_grad is False for p in model.parameters())  # requires_grad restored
    third = train_gates(model, calibration, GateSettings(**{**settings.__dict__, "seed": 4}))
    assert not torch.equal(first.gates, third.gates)


PLANTED = (1, 0)  # (layer, KV head) made a retrieval head


def _planted_model(model, tokenizer, *, wire: bool = True):
    """A copy of ``model`` whose KV head ``PLANTED`` (its 2 query heads) retrieves the passkey's digits wherever they
    are: hidden unit 0 is 1 in every token's embedding, unit 1 is 1 only in the digit tokens'; the head's query reads
    unit 0 and its key unit 1 in RoPE's slowest dimension (its partner, and every other q/k dimension of the head,
    zeroed), so every query attends to the digits; its value reads unit 1, so the head outputs a sizable vector when
    it finds digits and ~0 when it does not. ``wire=False``: same embedding and value, the head's query and key left
    random (near-uniform attention): the control, to which far digits matter little."""
    import copy

    model = copy.deepcopy(model)
    attn = model.model.layers[PLANTED[0]].self_attn
    d = model.config.head_dim
    groups = model.config.num_attention_heads // model.config.num_key_value_heads
    slow = d // 2 - 1  # rotate_half pairs dimension i with i + d/2; i = d/2 - 1 turns slowest (~3e-4 rad a token)
    heads = range(PLANTED[1] * groups, (PLANTED[1] + 1) * groups)  # the KV head's query heads
    kv = slice(PLANTED[1] * d, (PLANTED[1] + 1) * d)
    digits = tokenizer.convert_tokens_to_ids(list("0123456789"))
    assert tokenizer.unk_token_id not in digits
    with torch.no_grad():
        embed = model.get_input_embeddings().weight
        embed[:, 0], embed[:, 1] = 1.0, 0.0
        embed[digits, 1] = 1.0
        if wire:
            attn.k_proj.weight[kv] = 0.0
            attn.k_proj.weight[kv.start + slow, 1] = 2.0
            for h in heads:
                attn.q_proj.weight[h * d : (h + 1) * d] = 0.0
                attn.q_proj.weight[h * d + slow, 0] = 2.0
        attn.v_proj.weight[kv] = 0.0
        attn.v_proj.weight[kv, 1] = 0.3  # sized so the final norm does not flatten the gate's effect
    return model, digits


def test_gate_training_keeps_a_planted_retrieval_head_dense(tiny):
    """Gate training finds the head that needs far tokens: a head planted to retrieve the passkey's digits (placed
    beyond sink + local from the answer) keeps the highest gate by a wide margin and is the one head a 0.75 streaming
    fraction leaves dense; in the unwired control (same embedding and value, random query and key) it is not singled
    out."""
    _, model, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    settings = GateSettings(steps=10, lr=0.1, sink=8, local=32, lengths=(200, 260), seed=0)
    planted, digits = _planted_model(model, tokenizer)
    # the construction works: at the first answer row the planted head looks at the needle's far digits
    sample = calibration.sample(random.Random(0), 230)
    ids, row = sample.input_ids, sample.answer_rows.start
    far = [p for p, t in enumerate(ids[0].tolist()) if t in digits and p < row - settings.local]
    assert len(far) >= 10 and sample.needle.start <= far[0]  # the key, twice
    previous = planted.config._attn_implementation
    planted.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            weights = planted(ids, output_attentions=True).attentions[PLANTED[0]][0, :, row]
    finally:
        planted.set_attn_implementation(previous)
    mine = torch.arange(weights.shape[0]) // (weights.shape[0] // KV_HEADS) == PLANTED[1]  # its query heads
    assert (weights[mine][:, far].sum(-1) > 0.99).all()
    assert (weights[~mine][:, far].sum(-1) < 0.2).all()

    others = torch.ones(LAYERS, KV_HEADS, dtype=torch.bool)
    others[PLANTED] = False
    gates = train_gates(planted, calibration, settings).gates
    assert gates[PLANTED] > 0.8 and gates[PLANTED] - gates[others].max() > 0.5, gates
    expected = others.clone()  # streaming: every head but the planted one
    assert torch.equal(Profile.from_scores(planted, gates).streaming_heads(0.75), expected), gates

    control = train_gates(_planted_model(model, tokenizer, wire=False)[0], calibration, settings).gates
    assert control[PLANTED] - control[others].max() < 0.1, control


def test_gate_training_resumes_to_the_same_gates(tiny):
    _, model, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    settings = GateSettings(steps=5, sink=8, local=32, lengths=(200, 260), seed=1)
    saved = {}
    whole = train_gates(model, calibration, settings, on_step=lambda step, state: saved.setdefault(step, state))
    resumed = train_gates(model, calibration, settings, resume=saved[2])
    assert torch.allclose(whole.gates, resumed.gates, atol=1e-7)
    assert len(resumed.losses) == 3


def test_gate_training_checks_lengths(tiny):
    _, model, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    with pytest.raises(ValueError, match="positions"):
        train_gates(model, calibration, GateSettings(steps=1, lengths=(200, 4096)))
    with pytest.raises(ValueError, match="sink \\+ local"):
        train_gates(model, calibration, GateSettings(steps=1, sink=128, local=256, lengths=(200, 260)))


def test_cli_duo_end_to_end(tiny, tmp_path):
    folder, model, _ = tiny
    out = tmp_path / "tiny.safetensors"
    _run([folder, "--out", out, "--method", "duo", "--steps", "4", "--save-every", "2", *TINY_ARGS,
          "--alphas", "0.5,0.95", "--rws", "0.1", "--sweep-prompts", "1"])
    profile = Profile.load(out)
    assert profile.head_score.shape == (LAYERS, KV_HEADS)
    assert "DuoAttention gates: 4 steps" in profile.method
    assert profile.command.startswith("python -m sparse_attn_hf.profile ") and "--steps 4" in profile.command
    assert (profile.sink_size, profile.local_size) == (8, 32)
    sweep = json.loads(profile.sweep)
    assert len(sweep["rows"]) == 2
    if torch.cuda.is_available() and sweep["chosen"]:  # the GPU run times the crossover
        assert [t["length"] for t in sweep["dense_below"]["timings"]] == [256, 512]
    else:
        assert sweep["dense_below"]["measured"] is False
    if sweep["chosen"]:
        assert profile.alpha == sweep["chosen"]["alpha"]
    else:
        assert profile.alpha == 1.0
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert not (tmp_path / "tiny.safetensors.checkpoint").exists()  # removed once the profile is written
    patch_model(model, out)  # the result patches the model it was made for
    unpatch_model(model)


def test_cli_stats_is_deterministic(tiny, tmp_path):
    folder, _, _ = tiny
    paths = [tmp_path / f"s{i}.safetensors" for i in range(2)]
    for path in paths:
        _run([folder, "--out", path, "--method", "stats", "--samples", "2", "--no-sweep", "--device", "cpu", *TINY_ARGS])
    first, second = (Profile.load(p) for p in paths)
    assert torch.equal(first.head_score, second.head_score)
    assert sorted(first.head_score.flatten().tolist()) == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # ranks
    assert first.sweep == ""


def test_cli_resume_goes_on_from_the_checkpoint(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    out = tmp_path / "r.safetensors"
    base = [folder, "--out", out, "--method", "duo", "--save-every", "1", "--no-sweep", "--device", "cpu", *TINY_ARGS]
    _run([*base, "--steps", "3"])
    whole = Profile.load(out).head_score
    # a run stopped after 2 steps leaves its checkpoint; --resume finishes it
    from sparse_attn_hf.profiler import gates as gates_module

    real = gates_module.train_gates

    def stop_after_two(*args, on_step=None, **kwargs):
        def limited(step, state):
            on_step(step, state)
            if step == 2:
                raise KeyboardInterrupt
        return real(*args, on_step=limited, **kwargs)

    gates_module.train_gates = stop_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            _run([*base, "--steps", "3"])
    finally:
        gates_module.train_gates = real
    assert (tmp_path / "r.safetensors.checkpoint").is_file()
    _run([*base, "--steps", "3", "--resume"])
    assert "resuming from step 2" in capsys.readouterr().out
    assert torch.allclose(Profile.load(out).head_score, whole, atol=1e-7)
    with pytest.raises(SystemExit):  # other settings do not resume from it
        (tmp_path / "r.safetensors.checkpoint").write_bytes((tmp_path / "r.safetensors").read_bytes())
        _run([*base, "--steps", "4", "--resume"])


def test_cli_rejects_bad_inputs(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    with pytest.raises(SystemExit):
        _run([tmp_path / "nowhere", "--out", tmp_path / "x.safetensors"])
    assert "not downloaded" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit):
        _run([folder, "--out", tmp_path / "x.safetensors", "--text", empty, *TINY_ARGS])
    assert "is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _run([folder, "--out", tmp_path / "x.bin", *TINY_ARGS])
    assert ".safetensors" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    with pytest.raises(SystemExit):  # refused before the model is even loaded
        _run([folder, "--out", tmp_path / "afile" / "x.safetensors", *TINY_ARGS])
    assert "cannot write --out" in capsys.readouterr().err


def test_cli_rejects_an_unsupported_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, GPT2Config

    model = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=320))
    model.save_pretrained(tmp_path / "gpt2")
    _tokenizer().save_pretrained(tmp_path / "gpt2")
    with pytest.raises(SystemExit):
        _run([tmp_path / "gpt2", "--out", tmp_path / "x.safetensors", *TINY_ARGS])
    assert "not supported" in capsys.readouterr().err


def _duo_folder(path, rows, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "full_attention_heads.tsv").write_text("\n".join("\t".join(f"{v:.18e}" for v in row) for row in rows) + "\n")
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    return path


def test_import_duo_folder(tiny, tmp_path):
    folder, model, _ = tiny
    rng = random.Random(0)
    rows = [[rng.random() for _ in range(KV_HEADS)] for _ in range(LAYERS)]
    duo = _duo_folder(tmp_path / "lr=0.02-reg=0.05", rows, {"model_name": "models/Tiny-Llama", "sink_size": 16,
                                                           "recent_size": 64, "lr": 0.02, "reg_weight": 0.05})
    out = tmp_path / "duo.safetensors"
    _run(["import-duo", duo, "--model", folder, "--out", out, "--streaming-fraction", "0.25"])
    profile = Profile.load(out)
    assert torch.allclose(profile.head_score, torch.tensor(rows))
    assert profile.model_name == "Tiny-Llama" and profile.sink_size == 16 and profile.decode_local_size == 64
    assert profile.streaming_fraction == 0.25 and "reg_weight=0.05" in profile.method
    assert profile.fingerprint is None  # made from the config alone: no weight check
    patch_model(model, out)
    assert model._sparse_attn_state.streaming.sum() == 1
    unpatch_model(model)
    direct = import_duo(duo, model)  # from a loaded model: with its weight fingerprint
    assert direct.fingerprint is not None


def test_import_duo_rejects_bad_folders(tiny, tmp_path):
    _, model, _ = tiny
    with pytest.raises(FileNotFoundError, match="does not exist"):
        import_duo(tmp_path / "none", model)
    (tmp_path / "nofile").mkdir()
    with pytest.raises(FileNotFoundError, match="full_attention_heads.tsv"):
        import_duo(tmp_path / "nofile", model)
    wrong = _duo_folder(tmp_path / "wrong", [[0.5] * 3] * LAYERS)
    with pytest.raises(ValueError, match="2 layers x 3 heads.*2 layers x 2 KV heads"):
        import_duo(wrong, model)
    per_query = _duo_folder(tmp_path / "query", [[0.5] * 4] * LAYERS)
    with pytest.raises(ValueError, match="one value per query head"):
        import_duo(per_query, model)
    outside = _duo_folder(tmp_path / "outside", [[0.5, 1.5]] * LAYERS)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        read_gates(outside / "full_attention_heads.tsv")
    ragged = tmp_path / "ragged.tsv"
    ragged.write_text("0.1\t0.2\n0.3\n")
    with pytest.raises(ValueError, match="line 2 has 1 values"):
        read_gates(ragged)
    text = tmp_path / "text.tsv"
    text.write_text("0.1\tabc\n")
    with pytest.raises(ValueError, match="not a number"):
        read_gates(text)
    bad_json = _duo_folder(tmp_path / "badjson", [[0.5] * KV_HEADS] * LAYERS)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        import_duo(bad_json, model)


def test_report_command(tiny, tmp_path, capsys):
    _, model, _ = tiny
    profile = Profile.from_scores(model, torch.tensor([[0.1, 0.9], [0.4, 0.6]]), model_name="tiny")
    path = profile.save(tmp_path / "p.safetensors")
    _run(["report", path, "--streaming-fraction", "0.5"])
    text = capsys.readouterr().out
    assert "streaming heads at fraction 0.5: 2 of 4; per layer [1, 1]" in text
    assert (tmp_path / "p.png").stat().st_size > 10_000


def test_activation_checkpointing_gives_the_same_gates(tiny):
    _, model, tokenizer = tiny
    calibration = Calibration.from_text(tokenizer, held_out=128)
    settings = GateSettings(steps=2, sink=8, local=32, lengths=(200, 260), seed=2)
    plain = train_gates(model, calibration, settings)
    recomputed = train_gates(model, calibration, GateSettings(**{**settings.__dict__, "checkpointing": True}))
    assert torch.allclose(plain.gates, recomputed.gates, atol=1e-6)
    assert not model.training  # left as it was
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe", "phi3"])
def test_profiler_runs_on_newer_families(family):
    """Gate training and the statistics scorer on tiny Qwen3, Qwen3-MoE and Phi-3 models; the scores make a
    profile that patches the model."""
    from helpers import tiny_model

    from sparse_attn_hf.profile.attention_stats import stats_scores

    tokenizer = _tokenizer()
    model = tiny_model(family, heads=4, kv_heads=KV_HEADS, layers=LAYERS, vocab=len(tokenizer))
    calibration = Calibration.from_text(tokenizer, held_out=128)
    result = train_gates(model, calibration, GateSettings(steps=3, lr=0.05, sink=8, local=32, lengths=(200, 260),
                                                          seed=3))
    assert result.gates.shape == (LAYERS, KV_HEADS) and (result.gates < 1).any()
    scores = stats_scores(model, calibration, calibration.samples(2, (200, 260), seed=1), sink=8, local=32,
                          text_tokens=128)
    assert scores.shape == (LAYERS, KV_HEADS) and ((scores >= 0) & (scores <= 1)).all()
    _check_profile_patches(model, Profile.from_scores(model, result.gates), calibration)


def _check_profile_patches(model, profile, calibration, *, reference: bool = True):
    """``profile`` patches ``model`` and its labels drive the attention: with a window that binds at 200 tokens the
    patched logits leave the unpatched ones and equal PyTorch's attention under loop-built masks for those labels
    (``reference``: families without learned sinks or soft-capping); generate() continues the same prefill."""
    from helpers import independent_logits

    ids = calibration.samples(1, (200, 200), seed=2)[0].input_ids
    stock = model(ids).logits
    patch_model(model, profile, SparseConfig(sink_size=8, local_size=32, streaming_fraction=0.5, streaming_from=0))
    try:
        state = model._sparse_attn_state
        covered = list(profile.layers)
        assert torch.equal(state.streaming[covered], profile.streaming_heads(0.5)[covered])
        logits = model(ids).logits
        assert not torch.allclose(logits, stock, atol=1e-4), "the profile's streaming heads changed nothing"
        if reference:
            torch.testing.assert_close(logits, independent_logits(model, ids), rtol=1e-4, atol=1e-5)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        torch.testing.assert_close(out.logits[0], logits[:, -1], rtol=1e-4, atol=1e-5)
    finally:
        unpatch_model(model)

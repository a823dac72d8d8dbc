"""``infopt distill`` end to end on tiny random models (output loads with load_model /
load_quantized), argument errors, layer-truncated students/drafts and the DistillSpec
measurement (the speculative output stays exactly the target's)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt.cli import main
from infopt.distill.draft import int4_draft, measure_speculative
from infopt.distill.recipes import layer_truncated

TOKENIZER = Path.home() / ".cache" / "infopt" / "models" / "smollm2-135m"


def tiny(seed=0, layers=4, vocab=101):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True)).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def test_layer_truncated_is_a_working_smaller_model():
    target = tiny()
    small = layer_truncated(target, [0, 1, 3])
    assert small.config.num_hidden_layers == 3 and len(small.model.layers) == 3
    assert [layer.self_attn.layer_idx for layer in small.model.layers] == [0, 1, 2]
    assert torch.equal(small.model.layers[2].mlp.up_proj.weight,
                       target.model.layers[3].mlp.up_proj.weight)
    assert small.model.layers[0] is not target.model.layers[0]  # a copy
    ids = torch.randint(1, 101, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # cached decoding equals a full forward
        out = small.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                             do_sample=False)
        full = small(input_ids=out[:, :-1]).logits[0, -5:].argmax(-1)
    assert torch.equal(out[0, -5:], full)
    with pytest.raises(ValueError, match=r"keep must name layers in \[0, 4\)"):
        layer_truncated(target, [0, 4])


def test_measure_speculative_output_is_the_targets():
    target = tiny()
    rows = measure_speculative(target, {"draft": layer_truncated(target, 2)},
                               [torch.tensor([[5, 6, 7, 8]]), torch.tensor([[9, 3]])],
                               max_new_tokens=12, num_draft_tokens=3, repeats=1)
    assert rows["draft"]["identical"] is True
    assert 0.0 <= rows["draft"]["acceptance_rate"] <= 1.0 and rows["target"]["speedup"] == 1.0


def test_int4_self_draft_is_fast_and_exact():
    """DistillSpec's int4 self-draft: int4 RTN weights x int8 activations, int8 head; the
    speculative output is still exactly the target's."""
    import copy

    import infopt.quant as q

    target = tiny(layers=2)  # K = 32, 64: one partial group of 128 per row
    draft = int4_draft(copy.deepcopy(target))
    int4 = [m for m in draft.modules() if isinstance(m, q.Int4Linear)]
    assert int4 and all(m.act_dtype == "int8" for m in int4)
    assert isinstance(draft.get_output_embeddings(), q.Int8Linear)
    rows = measure_speculative(target, {"int4": draft}, [torch.tensor([[5, 6, 7, 8, 5, 6]])],
                               max_new_tokens=10, num_draft_tokens=3, repeats=1)
    assert rows["int4"]["identical"] is True and rows["int4"]["acceptance_rate"] > 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    if not (TOKENIZER / "tokenizer.json").exists():
        pytest.skip("needs the cached smollm2-135m tokenizer (python -m infopt.models)")
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("distill_cli")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    for name, layers, seed in (("teacher", 3, 1), ("student", 2, 2)):
        m = tiny(seed, layers, vocab=len(tok))
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "data.txt").write_text("\n\n".join(
        f"Paragraph {i}: the quick brown fox jumps over the lazy dog number {i}."
        for i in range(100)))
    return root


def run_cli(models, out, *extra):
    return main(["distill", "--teacher", str(models / "teacher"), "--student",
                 str(models / "student"), "--data", str(models / "data.txt"), "--steps", "3",
                 "--seq-len", "32", "--batch-size", "2", "--eval-tokens", "64", "--quiet",
                 "--out", str(out), *extra])


def test_cli_int4_student_loads_with_load_quantized(models, tmp_path, capsys):
    assert run_cli(models, tmp_path / "q", "--student-quant", "int4", "--lr", "1e-3") == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    model = infopt.load_quantized(tmp_path / "q")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Int4Linear"
    summary = json.loads((tmp_path / "q" / "distill.json").read_text())
    assert summary["config"]["fields"]["fake_quant"] == "int4"
    assert summary["after"]["eval_kl"] >= 0 and summary["before"]["eval_ppl"] > 1


def test_cli_fp_student_loads_with_load_model(models, tmp_path):
    assert run_cli(models, tmp_path / "f", "--loss", "jsd", "--beta", "0.3",
                   "--student-layers", "1") == 0
    model, tok = infopt.load_model(tmp_path / "f", progress=False)
    assert model.config.num_hidden_layers == 1
    ids = torch.tensor([tok("hello world")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_cli_bad_arguments_exit_2(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(models, tmp_path / "b", "--beta", "2")
    assert e.value.code == 2
    assert "argument --beta: beta must be a number in [0.0, 1.0]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_cli(models, tmp_path / "b", "--loss", "kl")
    assert run_cli(models, tmp_path / "b", "--data", str(tmp_path / "missing.txt")) == 1
    assert "is not 'sharegpt', 'text' or an existing file" in capsys.readouterr().err


def test_distillspec_with_a_separate_draft_model(models, tmp_path, capsys):
    """``python -m infopt.distill.draft --draft model``: a smaller model of the target's
    tokenizer, LoRA-trained on the int4 grid, measured as an int4 draft; the speculative
    output stays exactly the target's for both drafts."""
    from infopt.distill import draft

    out = tmp_path / "ds.json"
    assert draft.main(["--model", str(models / "teacher"), "--draft", "model", "--draft-model",
                       str(models / "student"), "--int4-draft", "--lora-rank", "2",
                       "--steps", "2", "--batch-size", "2", "--seq-len", "24",
                       "--prompt-len", "8", "--prompts", "2", "--new-tokens", "6",
                       "--eval-tokens", "40", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["draft_model"] == str(models / "student") and res["int4"] is True
    # both drafts' quality against the target, per domain
    for name in ("undistilled", "distilled"):
        assert set(res["quality"][name]) == {"prose", "code", "chat"}
        for q in res["quality"][name].values():
            assert q["n_tokens"] == 39 and q["kl"] > 0 and 0 <= q["top1"] <= 1
            assert q["ppl_draft"] > 1 and q["ppl_target"] > 1
    assert res["config"]["fields"]["lora_rank"] == 2
    assert res["config"]["fields"]["fake_quant"] == "int4"
    for name in ("undistilled", "distilled"):
        assert res["rows"][name]["identical"] is True
    assert "distilled / undistilled speedup" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        draft.main(["--model", str(models / "teacher"), "--draft", "model"])
    assert e.value.code == 2
    assert "--draft-model NAME is required with --draft model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        draft.main(["--model", str(models / "teacher"), "--draft-model", str(models / "student")])
    with pytest.raises(SystemExit) as e:
        draft.main(["--model", str(models / "teacher"), "--draft", "model", "--draft-model",
                    str(models / "student"), "--keep", "0,1"])
    assert e.value.code == 2
    assert "--keep applies to --draft layers only" in capsys.readouterr().err
    for bad, msg in (("-1", "--eval-tokens must be >= 0, got -1"),
                     ("100000", "(the held-out articles' length in this model's tokens), got "
                      "100000")):
        with pytest.raises(SystemExit):
            draft.main(["--model", str(models / "teacher"), "--eval-tokens", bad])
        assert msg in capsys.readouterr().err


def test_distillspec_layer_draft_keeps_the_first_six_and_the_last_layer(models, tmp_path):
    from transformers import AutoTokenizer

    from infopt.distill import draft

    tok = AutoTokenizer.from_pretrained(models / "teacher")
    tiny(3, 8, vocab=len(tok)).save_pretrained(tmp_path / "deep")
    tok.save_pretrained(tmp_path / "deep")
    out = tmp_path / "ds.json"
    assert draft.main(["--model", str(tmp_path / "deep"), "--steps", "1", "--batch-size", "2",
                       "--seq-len", "24", "--prompt-len", "8", "--prompts", "1",
                       "--new-tokens", "4", "--accept-prompts", "0", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["keep"] == [0, 1, 2, 3, 4, 5, 7]


def test_draft_samples_are_the_drafts_continuations_with_a_generated_only_mask():
    from infopt.distill.data import DistillData
    from infopt.distill.draft import draft_samples

    draft = tiny(5)
    windows = torch.randint(1, 101, (3, 12), generator=torch.Generator().manual_seed(1))
    out = draft_samples(draft, DistillData(windows), 5, 4, batch_size=2, seed=3)
    assert out.input_ids.shape == (5, 12)
    # prompts cycle over the windows; the rest is sampled, and only that counts in the loss
    assert torch.equal(out.input_ids[:, :4], windows[[0, 1, 2, 0, 1], :4])
    assert not out.loss_mask[:, :4].any() and out.loss_mask[:, 4:].all()
    again = draft_samples(draft, DistillData(windows), 5, 4, batch_size=2, seed=3)
    other = draft_samples(draft, DistillData(windows), 5, 4, batch_size=2, seed=4)
    assert torch.equal(out.input_ids, again.input_ids)  # seeded
    assert not torch.equal(out.input_ids, other.input_ids)
    with pytest.raises(ValueError, match=r"prompt_len must be in \[1, 11\]"):
        draft_samples(draft, DistillData(windows), 2, 12)


def test_distillspec_int4_self_draft_on_draft_generated_data_in_bf16(models, tmp_path, capsys):
    """``--draft int4 --dtype bf16 --draft-data N --trainable ...``: the draft samples its
    training data once, the named weights train on the int4 grid under bf16 autocast, the
    output of both drafts stays exactly the target's, and the fp32 target is back to measure."""
    from infopt.distill import draft

    out = tmp_path / "ds.json"
    assert draft.main(["--model", str(models / "teacher"), "--draft", "int4", "--dtype", "bf16",
                       "--trainable", "*down_proj*,*o_proj*", "--draft-data", "3",
                       "--lmbda", "0", "--steps", "2", "--batch-size", "2", "--seq-len", "24",
                       "--prompt-len", "8", "--prompts", "2", "--new-tokens", "6",
                       "--chunk-size", "5", "--accept-prompts", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    fields = res["config"]["fields"]
    assert res["draft_data"] == 3 and fields["dtype"] == "bf16" and fields["chunk_size"] == 5
    assert fields["trainable"] == ["*down_proj*", "*o_proj*"]
    for name in ("undistilled", "distilled"):
        assert res["rows"][name]["identical"] is True
    assert "draft-generated data: 3 x 24 tokens" in capsys.readouterr().out
    for bad, msg in ((["--draft-data", "-1"], "--draft-data must be >= 0"),
                     (["--trainable", "*o_proj*", "--lora-rank", "2"],
                      "--trainable selects weights for full training")):
        with pytest.raises(SystemExit):
            draft.main(["--model", str(models / "teacher"), "--draft", "int4", *bad])
        assert msg in capsys.readouterr().err


def test_target_samples_are_the_targets_greedy_continuations_of_distinct_prompts(models):
    """Sequence-level KD data for greedy speculation: evenly spaced, distinct training prompts,
    each continued by the target's own greedy output; only the generated tokens count."""
    from transformers import AutoTokenizer

    from infopt.distill.data import token_windows, training_text
    from infopt.distill.draft import target_samples

    tok = AutoTokenizer.from_pretrained(models / "teacher")
    target = infopt.load_model(str(models / "teacher"), dtype=torch.float32)[0]
    target.generation_config.eos_token_id = None  # every row runs to its full length
    out = target_samples(target, tok, 3, 6, 14, max_num_seqs=2)
    windows = token_windows(tok, training_text(), 6).input_ids
    picks = windows[torch.arange(3) * windows.shape[0] // 3]
    assert out.input_ids.shape == (3, 14) and len({tuple(r) for r in picks.tolist()}) == 3
    assert torch.equal(out.input_ids[:, :6], picks)
    assert not out.loss_mask[:, :6].any() and out.loss_mask[:, 6:].all()
    with torch.no_grad():
        ref = target.generate(picks[1:2], attention_mask=torch.ones_like(picks[1:2]),
                              do_sample=False, max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out.input_ids[1], ref[0])
    with pytest.raises(ValueError, match=r"n must be in \[1, "):
        target_samples(target, tok, 0, 6, 14)
    with pytest.raises(ValueError, match=r"prompt_len must be in \[1, 5\]"):
        target_samples(target, tok, 2, 6, 6)


def test_distillspec_on_target_generated_data(models, tmp_path, capsys):
    from infopt.distill import draft

    out = tmp_path / "ds.json"
    assert draft.main(["--model", str(models / "teacher"), "--draft", "model", "--draft-model",
                       str(models / "student"), "--teacher-data", "3", "--lmbda", "0",
                       "--steps", "2", "--batch-size", "2", "--seq-len", "16",
                       "--prompt-len", "6", "--prompts", "1", "--new-tokens", "4",
                       "--eval-tokens", "0", "--accept-prompts", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["teacher_data"] == 3 and res["data_seconds"] > 0
    replay = res["replayed_acceptance"]
    assert set(replay) == {"undistilled", "distilled"}
    assert replay["distilled"]["n_tokens"] <= 2 * 4
    assert set(replay["distilled"]["accepted_per_step"]) == {"1", "2", "3", "4", "6"}
    assert res["rows"]["distilled"]["identical"] is True
    assert "target-generated data: 3 x 16 tokens" in capsys.readouterr().out
    for bad, msg in ((["--teacher-data", "-2"], "--teacher-data must be >= 0, got -2"),
                     (["--teacher-data", "2", "--draft-data", "2"],
                      "--teacher-data and --draft-data each replace the training text"),
                     (["--accept-prompts", "41"], "--accept-prompts must be in [0, 40]")):
        with pytest.raises(SystemExit):
            draft.main(["--model", str(models / "teacher"), *bad])
        assert msg in capsys.readouterr().err


def test_accepted_per_step_replays_greedy_verification():
    from infopt.distill.draft import accepted_per_step

    row = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    # k=2: accept 0-1 (target writes 2), accept 3-4 (bonus 5), accept 6-7: 6 in 3 steps
    assert accepted_per_step([row], 2) == 2.0
    # k=4: accept 0-1 (target writes 2), accept 3-6 (bonus 7): 6 in 2 steps
    assert accepted_per_step([row], 4) == 3.0
    # a row of rejections: one target token per step, nothing accepted
    assert accepted_per_step([row, torch.zeros(3, dtype=torch.bool)], 1) == (1 + 1 + 1) / (
        3 + 3)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        accepted_per_step([row], 0)


def test_greedy_acceptance_of_the_target_itself_is_total(models):
    """The target as its own draft agrees everywhere: k tokens accepted per step but at a
    row's end; a different draft agrees less, and bad prompt counts are refused."""
    from transformers import AutoTokenizer

    from infopt.distill.draft import greedy_acceptance

    tok = AutoTokenizer.from_pretrained(models / "teacher")
    target = infopt.load_model(str(models / "teacher"), dtype=torch.float32)[0]
    target.generation_config.eos_token_id = None
    student = infopt.load_model(str(models / "student"), dtype=torch.float32)[0]
    res = greedy_acceptance(target, {"self": target, "other": student}, tok, 3, 9, ks=(1, 4))
    assert res["self"]["agreement"] == 1.0 and res["self"]["n_tokens"] == 3 * 9
    # 9 tokens per row: k=4 accepts 4 (+1 bonus), then the last 4: 2 steps, 8 accepted
    # k=1: one accepted + one bonus per step, the fifth step at the last token
    assert res["self"]["accepted_per_step"] == {1: 1.0, 4: 4.0}
    assert 0 <= res["other"]["agreement"] < 1
    with pytest.raises(ValueError, match=r"n_prompts must be in \[1, 40\]"):
        greedy_acceptance(target, {"self": target}, tok, 41, 4)

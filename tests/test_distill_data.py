"""Distillation data sources: teacher generation (engine and HF generate agree under greedy),
user files, token windows, the held-out split of the Lee corpus."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt import distill as D


def tiny(seed=0, vocab=101):
    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def test_teacher_generate_engine_equals_hf_greedy():
    teacher = tiny()
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13], [4]]
    a = D.teacher_generate(teacher, None, prompts, 6, use_engine=True)
    b = D.teacher_generate(teacher, None, prompts, 6, use_engine=False)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_mask, b.loss_mask)
    assert a.input_ids.shape == (3, 11)
    assert a.loss_mask.sum(1).tolist() == [6, 6, 6]
    assert torch.equal(a.input_ids[1, :5], torch.tensor(prompts[1]))
    assert not a.loss_mask[1, :5].any() and a.loss_mask[1, 5:].all()


def test_load_texts_from_files(tmp_path):
    (tmp_path / "a.txt").write_text("first para\nstill first\n\nsecond\n\n\n")
    assert D.load_texts(str(tmp_path / "a.txt")) == ["first para\nstill first", "second"]
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "x"}) + "\n"
                                      + json.dumps({"prompt": "y"}) + "\n")
    assert D.load_texts(str(tmp_path / "b.jsonl")) == ["x", "y"]
    (tmp_path / "c.json").write_text(json.dumps(["p", "q", "r"]))
    got = D.load_texts(str(tmp_path / "c.json"), n=2, seed=1)
    assert len(got) == 2 and set(got) <= {"p", "q", "r"}
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="d.jsonl:1: each line needs a 'text' or 'prompt'"):
        D.load_texts(str(tmp_path / "d.jsonl"))
    with pytest.raises(ValueError, match="is not 'sharegpt', 'text' or an existing file"):
        D.load_texts(str(tmp_path / "missing.txt"))


def test_token_windows_cut_with_eos_between_texts():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [len(w) for w in text.split()]}

    d = D.token_windows(Tok(), ["a bb ccc", "dddd e"], 3)
    assert d.input_ids.tolist() == [[1, 2, 3], [0, 4, 1]]  # the trailing EOS is dropped
    with pytest.raises(ValueError, match="fewer than seq_len=50"):
        D.token_windows(Tok(), ["a"], 50)


def test_data_validation():
    with pytest.raises(ValueError, match="input_ids must be an int64 tensor"):
        D.DistillData(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        D.DistillData(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))


def test_training_text_is_disjoint_from_evaluation_and_calibration():
    from infopt.eval.texts import _lee_path, lee_articles

    if not _lee_path().exists():
        pytest.skip("the Lee corpus is not cached")
    arts = lee_articles()
    train = D.training_text()
    assert train == arts[40:150]
    # evaluation reads the corpus start (articles 0-~15 for 4096 tokens); calibration 150-299
    head = "\n".join(arts[:40])
    assert not any(a in head for a in train)


def test_heldout_eval_tokens_end_before_training_articles():
    from pathlib import Path

    from infopt.eval.texts import _lee_path, lee_articles

    tok_dir = Path.home() / ".cache" / "infopt" / "models" / "smollm2-135m"
    if not _lee_path().exists() or not (tok_dir / "tokenizer.json").exists():
        pytest.skip("needs the cached Lee corpus and smollm2-135m tokenizer")
    from transformers import AutoTokenizer

    from infopt.distill.recipes import eval_token_ids

    tok = AutoTokenizer.from_pretrained(tok_dir)
    seen = tok.decode(eval_token_ids(tok, 4096))
    first_train = lee_articles()[40]
    assert first_train[:60] not in seen
    assert lee_articles()[0][:60] in seen

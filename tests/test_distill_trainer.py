"""The distillation trainer on tiny random Llamas: the student's KL to the teacher really
drops, a resumed run is bit-identical, bad runs stop with clear errors, fake-quantized
students export to infopt's int4 format computing what was trained, LoRA merges exactly,
offline top-k shards round-trip and train, on-policy batches score only sampled tokens."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import infopt
from infopt import distill as D

VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical resume needs the same reduction order
    yield
    torch.set_num_threads(n)


def tiny(seed=0, layers=2, hidden=32, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def ids(n=16, length=24, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def teacher():
    t = tiny(1, layers=3)
    with torch.no_grad():  # a peaked teacher: its distribution is worth learning
        t.lm_head.weight.mul_(8.0)
    return t


def kl_to(teacher, student, x):
    with torch.no_grad():
        return D.forward_kl(student(input_ids=x).logits, teacher(input_ids=x).logits).item()


@pytest.mark.parametrize("loss", ["forward_kl", "jsd", "tvd"])
def test_student_kl_to_teacher_drops(teacher, loss):
    student = tiny(2)
    held = ids(4, 24, seed=99)
    before = kl_to(teacher, student, held)
    cfg = D.DistillConfig(loss=loss, steps=30, batch_size=4, lr=3e-3, chunk_size=7,
                          log_every=5)
    res = D.distill(student, teacher, ids(), cfg, progress=False)
    after = kl_to(teacher, student, held)
    assert after < 0.7 * before, (before, after)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert all(h["tok_s"] > 0 for h in res.history)


def test_resume_is_bit_identical(teacher, tmp_path):
    base = tiny(3)
    cfg = D.DistillConfig(steps=6, batch_size=3, grad_accum=2, lr=2e-3, save_every=3,
                          keep_checkpoints=2, warmup_steps=2, lmbda=0.5, prompt_len=8)
    full = copy.deepcopy(base)
    D.distill(full, teacher, ids(), cfg, out_dir=tmp_path / "a", progress=False)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    # the same run interrupted after step 3: drop its last checkpoint and resume
    import shutil

    shutil.copytree(tmp_path / "a" / "checkpoint-3", tmp_path / "b" / "checkpoint-3")
    resumed = copy.deepcopy(base)
    res = D.distill(resumed, teacher, ids(), cfg, out_dir=tmp_path / "b", resume=True,
                    progress=False)
    assert res.resumed_from == 3
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    # and both differ from the start (training happened)
    assert not torch.equal(full.lm_head.weight, base.lm_head.weight)


def test_resume_refuses_another_config_or_student(teacher, tmp_path):
    cfg = D.DistillConfig(steps=2, batch_size=2, save_every=1)
    D.distill(tiny(4), teacher, ids(), cfg, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"config differs \(lr: checkpoint 0.0001, now 0.01"):
        D.distill(tiny(4), teacher, ids(), D.DistillConfig(steps=2, batch_size=2, lr=1e-2),
                  out_dir=tmp_path, resume=True, progress=False)
    # run-control fields may change
    D.distill(tiny(4), teacher, ids(), D.DistillConfig(steps=2, batch_size=2, save_every=2),
              out_dir=tmp_path, resume=True, progress=False)
    D.distill(tiny(5), teacher, ids(), D.DistillConfig(steps=2, batch_size=2,
                                                       frozen=("*embed*",)),
              out_dir=tmp_path / "f", progress=False)
    with pytest.raises(ValueError, match="frozen weights differ"):
        D.distill(tiny(6), teacher, ids(), D.DistillConfig(steps=2, batch_size=2,
                                                           frozen=("*embed*",)),
                  out_dir=tmp_path / "f", resume=True, progress=False)
    with pytest.raises(ValueError, match="holds no checkpoint"):
        D.distill(tiny(4), teacher, ids(), cfg, out_dir=tmp_path / "none", resume=True,
                  progress=False)


def test_nan_loss_stops_naming_the_step(teacher):
    bad = copy.deepcopy(teacher)
    with torch.no_grad():
        bad.lm_head.weight[3, 0] = float("nan")
    with pytest.raises(RuntimeError, match="loss is nan at step 1 "):
        D.distill(tiny(2), bad, ids(), D.DistillConfig(steps=3, batch_size=2), progress=False)


def test_vocabulary_mismatch_refused(teacher):
    with pytest.raises(ValueError, match="student vocabulary size 80 != teacher vocabulary "
                                         "size 64"):
        D.distill(tiny(2, vocab=80), teacher, ids(), D.DistillConfig(steps=1), progress=False)
    # with a token map (the student's 64 ids are the teacher's) it trains
    small, big = tiny(2), tiny(7, vocab=80)
    res = D.distill(small, big, ids(), D.DistillConfig(steps=2, batch_size=2),
                    token_map=torch.arange(64) + 16, progress=False)
    assert res.steps == 2


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="loss must be one of"):
        D.DistillConfig(loss="kl")
    with pytest.raises(ValueError, match="alpha must be a number in"):
        D.DistillConfig(alpha=2)
    with pytest.raises(ValueError, match="fake_quant must be one of"):
        D.DistillConfig(fake_quant="int3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        D.DistillConfig(dtype="fp16")


def test_fake_quant_export_computes_what_was_trained(teacher, tmp_path):
    student = tiny(2, hidden=128)
    t = tiny(1, hidden=128)
    cfg = D.DistillConfig(steps=4, batch_size=2, fake_quant="int4", group_size=32, lr=1e-3)
    D.distill(student, t, ids(), cfg, progress=False)
    assert isinstance(student.model.layers[0].mlp.down_proj, D.DistillLinear)
    assert not isinstance(student.lm_head, D.DistillLinear)  # the head stays as quant skips it
    x = ids(2, 20, seed=5)
    with torch.no_grad():
        trained = student(input_ids=x).logits
    D.export_student(student, None, tmp_path, quant="int4", group_size=32)
    loaded = infopt.load_quantized(tmp_path)
    assert type(loaded.model.layers[0].mlp.down_proj).__name__ == "Int4Linear"
    with torch.no_grad():
        out = loaded(input_ids=x).logits
    torch.testing.assert_close(out, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_no_grad_forward_reuses_the_rounded_weight_until_it_changes(lora_rank):
    from infopt.distill.student_linear import DistillLinear

    torch.manual_seed(0)
    lin = DistillLinear.from_linear(torch.nn.Linear(64, 16), fake_quant_group=32,
                                    lora_rank=lora_rank)
    if lora_rank:
        torch.nn.init.normal_(lin.lora_b)
    x = torch.randn(3, 64)
    with torch.no_grad():
        a = lin(x)
        assert lin(x) is not a and torch.equal(lin(x), a)
        assert lin.__dict__["_rounded"] is not None
    assert torch.equal(lin(x).detach(), a)  # the autograd path computes the same
    for p in ([lin.weight] + ([lin.lora_b] if lora_rank else [])):
        with torch.no_grad():  # an optimizer step: in place
            p.add_(0.05)
            b = lin(x)
        assert not torch.equal(b, a)
        assert torch.equal(lin(x).detach(), b)
        a = b


def test_frozen_fake_quant_linear_reuses_its_rounded_weight_in_training():
    from infopt.distill.student_linear import DistillLinear
    from infopt.quant.formats import fake_quantize_int4

    torch.manual_seed(0)
    lin = DistillLinear.from_linear(torch.nn.Linear(64, 16), fake_quant_group=32)
    lin.weight.requires_grad_(False)
    x = torch.randn(3, 64, requires_grad=True)
    rounded = fake_quantize_int4(lin.weight.detach(), 32)
    out = lin(x)  # grad enabled, but nothing of this linear trains
    cached = lin.__dict__["_rounded"]
    assert cached is not None and torch.equal(cached[1], rounded)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, rounded, lin.bias))
    out.sum().backward()  # the gradient still reaches the input
    torch.testing.assert_close(x.grad, rounded.sum(0).expand(3, -1))
    assert lin(x.detach()) is not out and lin.__dict__["_rounded"] is cached
    # under bf16 autocast the cached copy is bf16 (no per-forward cast) and it is the rounding
    # of the current weight, re-made after an in-place change
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lin(x.detach())
    assert lin.__dict__["_rounded"][1].dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(x.detach(), rounded, lin.bias)
    torch.testing.assert_close(y, ref)
    with torch.no_grad():
        lin.weight.mul_(2)
    out2 = lin(x.detach())
    torch.testing.assert_close(
        out2, torch.nn.functional.linear(x.detach(), fake_quantize_int4(lin.weight, 32), lin.bias))


def test_lora_trains_adapters_only_and_merges(teacher, tmp_path):
    student = tiny(2)
    before = {n: p.clone() for n, p in student.named_parameters()}
    cfg = D.DistillConfig(steps=3, batch_size=2, lora_rank=4, lr=1e-2)
    D.distill(student, teacher, ids(), cfg, progress=False)
    lora = [n for n, _ in student.named_parameters() if "lora_" in n]
    assert lora and all("_proj" in n for n in lora)
    for n, p in student.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, before[n]), n
    x = ids(2, 20, seed=6)
    with torch.no_grad():
        trained = student(input_ids=x).logits
    D.export_student(student, None, tmp_path)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, trained, rtol=1e-4, atol=1e-5)


def test_offline_topk_shards_roundtrip_and_train(teacher, tmp_path):
    data = D.teacher_topk(teacher, D.DistillData(ids(6)), k=VOCAB, temperature=2.0)
    paths = D.save_shards(data, tmp_path, shard_size=4, metadata={"teacher": "tiny"})
    assert len(paths) == 2
    back = D.load_shards(tmp_path)
    assert torch.equal(back.input_ids, data.input_ids) and back.temperature == 2.0
    assert torch.equal(back.targets.indices, data.targets.indices)
    # k = V: training on the offline targets equals training on the live teacher
    a, b = tiny(2), tiny(2)
    cfg = D.DistillConfig(steps=3, batch_size=2, temperature=2.0, lr=1e-3)
    D.distill(a, None, back, cfg, progress=False)
    D.distill(b, teacher, D.DistillData(ids(6)), cfg, progress=False)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="temperature 2.0"):
        D.distill(tiny(2), None, back, D.DistillConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="teacher is None"):
        D.distill(tiny(2), None, ids(), D.DistillConfig(steps=1), progress=False)


def test_on_policy_scores_sampled_tokens(teacher):
    student = tiny(2)
    x = ids(2, 12)
    torch.manual_seed(0)
    gen = D.sample_continuations(student, x[:, :5], 7)
    assert gen.shape == (2, 12) and torch.equal(gen[:, :5], x[:, :5])
    res = D.distill(student, teacher, ids(), D.DistillConfig(steps=3, batch_size=2, lmbda=1.0,
                                                             prompt_len=8, log_every=1),
                    progress=False)
    assert len(res.history) == 3 and all(h["div"] > 0 for h in res.history)


def test_periodic_eval_reports_ppl_and_kl(teacher):
    cfg = D.DistillConfig(steps=4, batch_size=2, eval_every=2, lr=3e-3)
    res = D.distill(tiny(2), teacher, ids(), cfg, eval_ids=ids(1, 40, seed=9)[0],
                    eval_window=16, progress=False)
    evals = [h for h in res.history if "eval_kl" in h]
    assert [h["step"] for h in evals] == [2, 4]
    assert all(h["eval_ppl"] > 1 and h["eval_kl"] > 0 for h in evals)


def test_hidden_state_matching_trains_projection(teacher):
    student = tiny(2, hidden=16)
    cfg = D.DistillConfig(steps=2, batch_size=2, hidden_weight=1.0,
                          hidden_layer_map=((1, 1), (2, 3)), alpha=0.5)
    res = D.distill(student, teacher, ids(), cfg, progress=False)
    assert res.steps == 2


def test_bf16_and_gradient_checkpointing_run(teacher):
    student = tiny(2)
    cfg = D.DistillConfig(steps=2, batch_size=2, dtype="bf16", gradient_checkpointing=True,
                          log_every=1)
    res = D.distill(student, teacher, ids(), cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in res.history)
    assert all(p.dtype == torch.float32 for p in student.parameters())
    assert not student.is_gradient_checkpointing


def test_chunked_path_runs_the_decoder_alone_with_the_same_hidden_states():
    from infopt.distill.trainer import _hidden_and_head

    model = tiny(4)
    x = ids(2, 10, seed=9)
    calls = []
    h = model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        hid, head, states = _hidden_and_head(model, x, chunked=True)
        assert not calls  # no head over a (non-contiguous) last-position slice
        full = model(input_ids=x, output_hidden_states=True)
    h.remove()
    assert head is model.get_output_embeddings()
    torch.testing.assert_close(hid, full.hidden_states[-1])
    assert len(states) == len(full.hidden_states)
    torch.testing.assert_close(head(hid), full.logits)


def test_bf16_chunked_loss_is_close_to_fp32(teacher):
    """The bf16 path (autocast trunk, heads under autocast) computes the fp32 loss to bf16
    precision; the loss over non-contiguous position chunks equals the unchunked one."""
    losses = {}
    for dtype, chunk in (("fp32", None), ("fp32", 5), ("bf16", 5)):
        student = tiny(2)
        cfg = D.DistillConfig(steps=1, batch_size=4, dtype=dtype, chunk_size=chunk, lr=1e-9,
                              log_every=1)
        losses[(dtype, chunk)] = D.distill(student, teacher, ids(), cfg,
                                           progress=False).history[0]["loss"]
    assert losses[("fp32", 5)] == pytest.approx(losses[("fp32", None)], rel=1e-5)
    assert losses[("bf16", 5)] == pytest.approx(losses[("fp32", None)], rel=3e-2)

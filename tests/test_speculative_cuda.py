"""Speculative decoding on a CUDA device (skipped without one): greedy identity for every draft
source, left-padded batches, and sampling with a device generator."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from infopt import speculative as sp

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VOCAB = 101


def tiny_llama(seed=0, layers=4, vocab=VOCAB):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval().cuda()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model, ids, n):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              do_sample=False)


@pytest.mark.parametrize("source", ["self", "other", "prompt_lookup", "layer_skip"])
def test_cuda_greedy_identical(source):
    target = tiny_llama(0)
    draft = {"self": target, "other": tiny_llama(1, layers=2), "prompt_lookup": "prompt_lookup",
             "layer_skip": sp.LayerSkipConfig(skip=(2,))}[source]
    g = torch.Generator().manual_seed(0)
    for plen, n in [(1, 9), (7, 30)]:
        ids = torch.randint(1, VOCAB, (1, plen), generator=g).cuda()
        out = sp.generate(target, ids, draft, n, num_draft_tokens=3)
        assert out.sequences.device.type == "cuda"
        assert torch.equal(out.sequences, hf_greedy(target, ids, n)), (source, plen)
    lens = [6, 2, 4]
    ids = torch.zeros(3, 6, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, 6 - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, 6 - n:] = 1
    out = sp.generate(target, ids.cuda(), draft, 16, attention_mask=mask.cuda())
    for b, n in enumerate(lens):
        ref = hf_greedy(target, ids[b:b + 1, 6 - n:].cuda(), 16)
        assert out.sequences[b, 6:].tolist() == ref[0, n:].tolist(), (source, b)


def test_cuda_sampling_first_token_distribution():
    target, draft = tiny_llama(0, vocab=8), tiny_llama(1, layers=1, vocab=8)
    with torch.no_grad():
        target.lm_head.weight.mul_(8)
    prompt = torch.tensor([[1, 2, 3]], device="cuda")
    with torch.inference_mode():
        p = torch.softmax(target(prompt).logits[0, -1].float() / 0.8, -1).double().cpu()
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = 20_000
    out = sp.generate(target, prompt.expand(rows, -1), draft, 2, do_sample=True,
                      temperature=0.8, eos_token_id=[], generator=gen, num_draft_tokens=1)
    counts = torch.bincount(out.sequences[:, 3].cpu(), minlength=8).double()
    exp = p * rows
    keep = exp >= 5
    stat = ((counts[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    pval = torch.special.gammaincc(torch.tensor((keep.sum().item() - 1) / 2.0,
                                                dtype=torch.float64), stat / 2)
    assert pval > 1e-3
    again = sp.generate(target, prompt.expand(rows, -1), draft, 2, do_sample=True,
                        temperature=0.8, eos_token_id=[], num_draft_tokens=1,
                        generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(out.sequences, again.sequences)

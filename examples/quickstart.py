"""Quickstart: load the embedded model, wrap it, generate, and measure quality.

    python examples/quickstart.py

Runs offline once the model is cached (the first run fetches and converts it).
"""

import torch

import infopt
from infopt.eval import compare, perplexity


def main() -> None:
    torch.manual_seed(0)
    model, tok = infopt.load_model("smollm2-135m", dtype=torch.float32)
    print("wrap_model options:", infopt.accepted_options())
    model = infopt.wrap_model(model)  # no options: an exact no-op

    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    print(repr(tok.decode(out[0], skip_special_tokens=True)))

    print("perplexity (default text, 1024 tokens):", perplexity(model, tok, max_tokens=1024).ppl)
    bf16, _ = infopt.load_model("smollm2-135m", dtype=torch.bfloat16)
    r = compare(model, bf16, tok, max_tokens=1024, prompts=[])
    print(f"bf16 vs fp32: ppl {r.ppl_ref:.3f} -> {r.ppl_cand:.3f}, KL {r.kl_mean:.5f}, "
          f"top-1 agreement {r.top1_agreement:.3f}")

    x = torch.randn(4, 576)
    w = torch.ones(576)
    y = infopt.ops.rms_norm(x, w)  # AUTO: the C++ kernel on CPU when it builds
    assert torch.allclose(y, infopt.ops.rms_norm(x, w, backend="reference"), atol=1e-5)
    print(infopt.ops.format_backend_report())


if __name__ == "__main__":
    main()

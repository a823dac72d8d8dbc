"""``distill``: a small functional training loop (student toward teacher).

One step = ``grad_accum`` micro-batches of ``batch_size`` sequences; each micro-batch is
either off-policy (the data's sequences) or, with probability ``lmbda``, on-policy (the
student samples the continuation of the first ``prompt_len`` tokens and the teacher scores
it). The loss is ``alpha * CE + (1 - alpha) * T^2 * divergence`` (+ hidden-state matching),
computed in chunks over the sequence (:func:`~infopt.distill.chunked_distill_loss`).

Determinism: the data order, the on-policy choice and the sampling RNG derive from
``(seed, step, micro-batch)`` only, and checkpoints hold the exact fp32 tensors and AdamW
state, so a run resumed from a checkpoint continues bit-identically (same machine, same
threads).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..logs import get_logger, progress_bar
from ..module_walk import matches_any
from .align import HiddenStateLoss, check_vocab, map_teacher_logits
from .checkpoint import fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint
from .config import DistillConfig
from .data import DistillData, sampled_batch
from .losses import chunked_distill_loss
from .student_linear import attach, export_int4, merge

__all__ = ["DistillResult", "distill", "evaluate", "export_student"]

_log = get_logger("infopt.distill")


@dataclasses.dataclass
class DistillResult:
    """What :func:`distill` did: ``history`` holds one dict per logged step (``step``,
    ``loss``, ``ce``, ``div``, ``lr``, ``tok_s``) and per evaluation (``eval_ppl``,
    ``eval_kl``, ...); ``checkpoint`` is the last one written (None without ``out_dir``)."""

    student: nn.Module
    steps: int
    history: list[dict[str, Any]]
    checkpoint: Path | None = None
    resumed_from: int = 0


def _lr(cfg: DistillConfig, step: int) -> float:
    """Linear warmup, then cosine from lr to ``min_lr_ratio * lr`` at ``steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * frac))


def _rows(cfg: DistillConfig, n: int, micro: int) -> torch.Tensor:
    """Sequence indices of global micro-batch ``micro``: epochs of seeded permutations."""
    idx = []
    for j in range(micro * cfg.batch_size, (micro + 1) * cfg.batch_size):
        epoch, pos = divmod(j, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
        idx.append(int(perm[pos]))
    return torch.tensor(idx)


def _trainable(student: nn.Module, cfg: DistillConfig) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` per the config; returns the trainable (name, parameter) pairs in
    module order. Tied parameters appear once (named_parameters deduplicates)."""
    out = []
    for name, p in student.named_parameters():
        if cfg.lora_rank:
            train = ".lora_" in f".{name}"
        else:
            train = matches_any(name, cfg.trainable) and not matches_any(name, cfg.frozen)
        p.requires_grad_(train)
        if train:
            out.append((name, p))
    if not out:
        raise ValueError(f"no student parameter is trainable (trainable={list(cfg.trainable)}, "
                         f"frozen={list(cfg.frozen)})")
    return out


def _hidden_and_head(model: nn.Module, ids: torch.Tensor, chunked: bool) -> tuple[Any, Any, Any]:
    """``(final hidden [B, L, H] or logits, head or None, all hidden states)``."""
    if not chunked:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
        return out.logits, None, out.hidden_states
    head = model.get_output_embeddings()
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if isinstance(decoder, nn.Module) and decoder is not model:
        # The decoder alone: the causal LM would also apply its head to the last position, a
        # non-contiguous [B, 1, H] slice that makes the head copy its [V, H] weight per row.
        out = decoder(input_ids=ids, use_cache=False, output_hidden_states=True)
    else:
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], head, out.hidden_states


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _under(ctx: Any, fn: Any) -> Any:
    """``fn`` called inside the (re-enterable) context manager ``ctx``."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with ctx:
            return fn(x)
    return run


def _micro_loss(student, teacher, batch: DistillData, cfg, token_map, matcher) -> Any:
    ids = batch.input_ids
    chunked = cfg.chunk_size is not None
    amp = torch.autocast("cpu" if ids.device.type == "cpu" else ids.device.type,
                         dtype=torch.bfloat16) if cfg.dtype == "bf16" else contextlib.nullcontext()
    with amp:
        s_h, s_head, s_states = _hidden_and_head(student, ids, chunked)
    # position j predicts token j + 1: compare positions 0..L-2
    labels = ids[:, 1:]
    mask = (torch.ones_like(labels, dtype=torch.bool) if batch.loss_mask is None
            else batch.loss_mask[:, 1:].to(torch.bool))
    t_states = None
    if batch.targets is not None:
        teacher_spec = batch.targets.slice(slice(0, ids.shape[1] - 1))
    else:
        with torch.no_grad(), amp:
            t_in = ids if token_map is None else token_map[ids]
            t_h, t_head, t_states = _hidden_and_head(teacher, t_in, chunked)
        if token_map is not None:
            base = t_head or _identity
            t_head = lambda h: map_teacher_logits(base(h), token_map)  # noqa: E731
        t_h = t_h[:, :-1]
        teacher_spec = (t_h, t_head) if chunked else (
            t_h if token_map is None else t_head(t_h))
    if chunked and cfg.dtype == "bf16":
        # the chunked loss applies the heads later, outside ``amp``: their [c, H] x [H, V]
        # matmuls in bf16 too
        s_head = _under(amp, s_head)
        if batch.targets is None:
            teacher_spec = (teacher_spec[0], _under(amp, teacher_spec[1]))
    parts = chunked_distill_loss(
        s_h[:, :-1], s_head or _identity, teacher_spec, labels, kind=cfg.loss, alpha=cfg.alpha,
        beta=cfg.beta, temperature=cfg.temperature, mask=mask, chunk_size=cfg.chunk_size)
    if matcher is not None:
        if t_states is None:
            raise ValueError("hidden_weight > 0 needs a live teacher (offline top-k targets "
                             "hold no hidden states)")
        hid = matcher(s_states, t_states, batch.loss_mask)
        parts.loss = parts.loss + cfg.hidden_weight * hid
    return parts


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module | None, eval_ids: torch.Tensor, *,
             window: int = 256) -> dict[str, float]:
    """Held-out quality: ``eval_ppl`` of the student, and with a teacher ``eval_kl`` (mean
    KL(teacher || student) per token), ``eval_top1`` and ``eval_ppl_teacher``
    (:func:`infopt.eval.compare` on the same windows)."""
    from ..eval import compare, perplexity

    if teacher is None:
        r = perplexity(student, None, eval_ids, max_tokens=None, window=window)
        return {"eval_ppl": r.ppl}
    c = compare(teacher, student, None, texts=[eval_ids], prompts=[], max_tokens=None,
                window=window)
    return {"eval_ppl": c.ppl_cand, "eval_kl": c.kl_mean, "eval_top1": c.top1_agreement,
            "eval_ppl_teacher": c.ppl_ref}


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data: DistillData | torch.Tensor,
    config: DistillConfig | None = None,
    *,
    out_dir: str | Path | None = None,
    resume: bool = False,
    eval_ids: torch.Tensor | None = None,
    eval_window: int = 256,
    token_map: torch.Tensor | None = None,
    student_tokenizer: Any = None,
    teacher_tokenizer: Any = None,
    progress: bool | None = None,
) -> DistillResult:
    """Train ``student`` (in place) toward ``teacher`` on ``data``.

    Args:
        student: a HF causal LM (its linears are swapped for
            :class:`~infopt.distill.student_linear.DistillLinear` when ``config`` asks for LoRA or
            fake quantization; :func:`export_student` turns them back).
        teacher: a HF causal LM, frozen (None when ``data`` carries offline top-k targets).
        data: :class:`DistillData` or int64 token ids ``[N, L]``.
        out_dir: where ``checkpoint-<step>`` directories go (every ``save_every`` steps and
            at the end).
        resume: continue from the newest checkpoint in ``out_dir`` (refused if its config
            differs in anything but run control, see :mod:`.config`).
        eval_ids: held-out token ids ``[T]`` evaluated every ``eval_every`` steps and at the
            end (keep them disjoint from ``data``).
        token_map: student id -> teacher id (see :func:`~infopt.distill.check_vocab`).
    Raises:
        ValueError: bad input, mismatched vocabularies, a checkpoint of another run.
        RuntimeError: the loss became NaN / inf (naming the step).
    """
    cfg = config if config is not None else DistillConfig()
    if not isinstance(cfg, DistillConfig):
        raise TypeError(f"config must be a DistillConfig, got {type(cfg).__name__}")
    data = DistillData(data) if isinstance(data, torch.Tensor) else data
    if not isinstance(data, DistillData):
        raise TypeError(f"data must be DistillData or an int64 tensor [N, L], got "
                        f"{type(data).__name__}")
    if teacher is None and data.targets is None:
        raise ValueError("teacher is None: give a teacher model or data with offline targets "
                         "(infopt.distill.teacher_topk / load_shards)")
    if teacher is None and cfg.lmbda > 0:
        raise ValueError("lmbda > 0 (on-policy) needs a live teacher to score the samples")
    if data.targets is not None and data.temperature != cfg.temperature:
        raise ValueError(f"the offline targets were made at temperature {data.temperature}, "
                         f"the config asks for {cfg.temperature}; they must match")
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoints are)")
    if data.input_ids.shape[1] <= cfg.prompt_len and cfg.lmbda > 0:
        raise ValueError(f"prompt_len={cfg.prompt_len} leaves nothing to sample in sequences "
                         f"of {data.input_ids.shape[1]} tokens")
    if teacher is not None:
        token_map = check_vocab(student, teacher, student_tokenizer=student_tokenizer,
                                teacher_tokenizer=teacher_tokenizer, token_map=token_map)
        teacher.eval()
        teacher.requires_grad_(False)
    elif data.targets is not None and int(data.targets.indices.max()) >= \
            student.get_output_embeddings().weight.shape[0]:
        raise ValueError("the offline targets index tokens beyond the student's vocabulary")

    if cfg.fake_quant or cfg.lora_rank:
        attach(student, fake_quant_group=cfg.group_size if cfg.fake_quant else None,
               lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
               lora_targets=cfg.lora_targets, seed=cfg.seed)
    params = _trainable(student, cfg)
    matcher = None
    if cfg.hidden_weight > 0:
        matcher = HiddenStateLoss(cfg.hidden_layer_map, student.config.hidden_size,
                                  teacher.config.hidden_size, kind=cfg.hidden_loss)
        params += [(f"hidden_loss.{n}", p) for n, p in matcher.named_parameters()]
    frozen = [(n, p) for n, p in student.named_parameters() if not p.requires_grad]
    frozen_fp = fingerprint(frozen)
    decay = [p for _, p in params]
    opt = torch.optim.AdamW(decay, lr=cfg.lr, betas=cfg.adam_betas,
                            weight_decay=cfg.weight_decay)
    start, history, ckpt = 0, [], None
    if resume:
        ckpt = latest_checkpoint(out_dir)
        if ckpt is None:
            raise ValueError(f"resume=True but {out_dir} holds no checkpoint-<step> directory")
        start, history = load_checkpoint(ckpt, params, opt, cfg, frozen_fp)
        _log.info("resumed from %s at step %d", ckpt, start)
    resumed_from = start
    if cfg.gradient_checkpointing and hasattr(student, "gradient_checkpointing_enable"):
        student.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    student.train()
    bar = progress_bar(progress, total=cfg.steps, initial=start, desc="distill", unit="step")
    n_seq = len(data)
    t_last, tok_last = time.perf_counter(), 0
    try:
        for step in range(start, cfg.steps):
            lr = _lr(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            sums = {"loss": 0.0, "ce": 0.0, "div": 0.0}
            for m in range(cfg.grad_accum):
                micro = step * cfg.grad_accum + m
                torch.manual_seed(cfg.seed * 1_000_003 + micro)
                batch = data.rows(_rows(cfg, n_seq, micro))
                if cfg.lmbda > 0 and torch.rand(()).item() < cfg.lmbda:
                    ids = batch.input_ids
                    batch = sampled_batch(student, ids[:, : cfg.prompt_len],
                                          ids.shape[1] - cfg.prompt_len,
                                          temperature=cfg.gen_temperature)
                parts = _micro_loss(student, teacher, batch, cfg, token_map, matcher)
                loss = parts.loss / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"distill: the loss is {loss.item()} at step {step + 1} (micro-batch "
                        f"{m + 1} of {cfg.grad_accum}); stopped. Lower lr "
                        f"(now {lr:.3g}), check the data and the teacher's logits, or use "
                        "dtype='fp32'"
                    )
                loss.backward()
                sums["loss"] += loss.item()
                sums["ce"] += parts.ce / cfg.grad_accum
                sums["div"] += parts.div / cfg.grad_accum
                tok_last += parts.n_tokens
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in params], cfg.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            done = step + 1
            now = time.perf_counter()
            tok_s = tok_last / max(now - t_last, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.4f}", tok_s=f"{tok_s:.0f}")
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
                history.append({"step": done, **sums, "lr": lr, "tok_s": tok_s})
                t_last, tok_last = now, 0
            if eval_ids is not None and cfg.eval_every and done % cfg.eval_every == 0 \
                    and done != cfg.steps:
                history.append({"step": done, **evaluate(student, teacher, eval_ids,
                                                         window=eval_window)})
                student.train()
                t_last = time.perf_counter()
            if out_dir is not None and ((cfg.save_every and done % cfg.save_every == 0)
                                        or done == cfg.steps):
                if done == cfg.steps and eval_ids is not None:
                    history.append({"step": done, **evaluate(student, teacher, eval_ids,
                                                             window=eval_window)})
                ckpt = save_checkpoint(out_dir, done, params, opt, cfg, frozen_fp, history)
        if out_dir is None and eval_ids is not None and start < cfg.steps:
            history.append({"step": cfg.steps, **evaluate(student, teacher, eval_ids,
                                                          window=eval_window)})
    finally:
        bar.close()
        if cfg.gradient_checkpointing and hasattr(student, "gradient_checkpointing_disable"):
            student.gradient_checkpointing_disable()
        student.eval()
    return DistillResult(student, cfg.steps, history, ckpt, resumed_from)


def export_student(student: nn.Module, tokenizer: Any, out_dir: str | Path, *,
                   quant: str | None = None, group_size: int = 128) -> Path:
    """Write the distilled student so the rest of infopt loads it.

    ``quant=None``: merged fp weights via ``save_pretrained`` (load with
    ``infopt.load_model(out_dir)``). ``quant="int4"``: merged, RTN-quantized to infopt's int4
    format on the grid the fake quantization trained on, and saved with
    :func:`infopt.quant.save_quantized` (load with ``infopt.load_quantized(out_dir)``; the
    tokenizer is saved beside it either way). Modifies ``student`` in place.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if quant not in (None, "int4"):
        raise ValueError(f"quant must be None or 'int4', got {quant!r}")
    if quant == "int4":
        from ..quant import save_quantized

        export_int4(student, group_size)
        save_quantized(student, out)
    else:
        merge(student)
        student.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out

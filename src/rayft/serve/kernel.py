"""The CPU kernel of batched LoRA (lora_kernel.c), compiled for this machine on first use.

Why a kernel: on CPU a decoding step is bound by memory traffic. Per-row stacks (the bmm path in
lora.py, kept for GPUs and half precision) read an adapter's weights once per row that uses it and
copy them into the stacks whenever rows join; the kernel reads them in place, once per adapter and
step, so its cost follows the distinct adapters of a batch rather than its rows
(benchmarks/lora_layouts.py measures both). fp32 only: the serving dtype on CPU.

The library is cached under rayft_home()/kernels, keyed by the source, the compiler and the CPU,
written to a temporary name and renamed, so processes that build it at once do not collide. With
no C compiler (or a failed build) serving falls back to the stacks, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Callable, Optional

import torch  # loads torch's libgomp.so.1 first: the kernel's OpenMP then runs on torch's threads

SOURCE = Path(__file__).with_name("lora_kernel.c")
ITEM_ROWS = 4  # rows per work item; an item is a_ptr, b_ptr, rank, count, then ITEM_ROWS row indices
MAX_RANK = 1024
FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3"])  # the second: compilers without either flag

log = logging.getLogger(__name__)


def c_compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


@lru_cache(maxsize=None)
def cpu_lora_kernel() -> Optional[Callable]:
    """lora_add(x_ptr, out_ptr, tokens, in, out, items_ptr, n_items), or None where it cannot be built."""
    compiler = c_compiler()
    if compiler is None:
        log.warning("rayft serve: no C compiler found; batched LoRA runs on per-row stacks (slower on CPU)")
        return None
    errors = []
    for flags in FLAG_SETS:
        try:
            library = ctypes.CDLL(str(_build(compiler, flags)))
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(f"{' '.join(flags)}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
            continue
        function = library.lora_add
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                             ctypes.c_void_p, ctypes.c_int64]
        function.restype = None
        return function
    log.warning("rayft serve: the batched-LoRA kernel did not build (%s); using per-row stacks", "; ".join(errors))
    return None


def _build(compiler: str, flags: list[str]) -> Path:
    from rayft.models.resolve import rayft_home

    source = SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(b"\0".join([source, version.encode(), " ".join(flags).encode(), _cpu_id().encode()]))
    target = rayft_home() / "kernels" / f"lora_kernel-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run([compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(built)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(result.stderr or f"{compiler} exited with {result.returncode}")
        os.replace(built, target)
    return target


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine() + platform.processor()
    return platform.machine() + "".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))

"""Devices and dtypes: the one table of dtype names and the one resolver of device names.

    DTYPES                              "fp32" | "bf16" | "fp16" -> torch dtype name (no torch import)
    canonical_dtype("bfloat16")         -> "bf16"   (long names are aliases; "auto" stays "auto")
    torch_dtype("bf16")                 -> torch.bfloat16   ("auto" -> None: keep the loaded dtype)
    resolve_dtype("auto", device)       -> the compute dtype "auto" means on that device (CPU: fp32
                                           unmeasured; gpt2lab.dtype_choice measures it)
    resolve_device("auto")              -> cuda if torch sees a GPU, else cpu (mps only when asked)
    cpu_name(), cpu_flags()             -> this CPU's model name and instruction-set flags (/proc/cpuinfo)
    check_fits(nbytes, device, what, fix)  UserError when `nbytes` more cannot be allocated on the device
                                        (CPU: MemAvailable, or the room under RLIMIT_AS; CUDA: free memory)

Only the functions that return torch objects import torch, so command-line parsers can use the
names here without it.
"""

from __future__ import annotations

import os
import platform
import re
from typing import TYPE_CHECKING, Literal

from gpt2lab.console import format_bytes
from gpt2lab.errors import UserError

if TYPE_CHECKING:
    import torch

DTYPES: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Short dtype name -> the torch attribute (torch.float32, ...); the long names are accepted as aliases."""
DTYPE_CHOICES = ("auto", *DTYPES)
DtypeName = Literal[DTYPE_CHOICES]
"""A dtype setting (train.dtype, --dtype): "auto" or a short name of the table above."""
DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
_ALIASES = {long: short for short, long in DTYPES.items()}
_DEVICE_RE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def canonical_dtype(name: str) -> str:
    """"auto", "fp32", "bf16" or "fp16" for a dtype name or alias ("float32", "bfloat16", "float16")."""
    name = _ALIASES.get(name, name)
    if name not in DTYPE_CHOICES:
        raise UserError(f"unknown dtype {name!r}; use one of {', '.join(DTYPE_CHOICES)} "
                        f"(or {', '.join(_ALIASES)})")
    return name


def check_device_name(name: str) -> str:
    """`name` if it is one of auto, cpu, cuda, cuda:N, mps; else a UserError (no torch needed)."""
    if not _DEVICE_RE.fullmatch(name):
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return name


def torch_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype of a name or alias; None and "auto" -> None (the caller keeps what it has)."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    name = canonical_dtype(name)
    return None if name == "auto" else getattr(torch, DTYPES[name])


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype ("fp32", "bf16", "fp16"; "int8", which stands for int8 decoding),
    or str(dtype) for any other."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name if name == "int8" else str(dtype))


def resolve_dtype(name: str, device: torch.device, *, fp16_without_bf16: bool = True) -> torch.dtype:
    """The compute (autocast) dtype for `name` on `device`: auto = bf16 on CUDA with bf16 support,
    fp16 on older CUDA GPUs (fp32 there if not `fp16_without_bf16`), fp32 elsewhere.

    fp32 is auto's answer on a CPU only without measuring: bf16 there is ~100x slower on CPUs without
    bf16 units and ~3x faster on those with AMX. `gpt2lab.dtype_choice.resolve` (same arguments,
    plus what the run repeats) times it instead and is what train, eval, sample and bench use."""
    import torch

    if canonical_dtype(name) != "auto":
        return torch_dtype(name)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if fp16_without_bf16 else torch.float32
    return torch.float32


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of "auto" (cuda if torch sees a GPU, else cpu), "cpu", "cuda", "cuda:N" or
    "mps"; a UserError when the requested device is not there. torchrun ranks move cuda to cuda:LOCAL_RANK
    (`parallel.init_distributed`)."""
    import torch

    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} requested but torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} requested but MPS is not available; use --device cpu")
    return device


def _cpuinfo_field(name: str) -> str | None:
    """Field `name` of the first processor in /proc/cpuinfo (None where there is none: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """This CPU's model name (/proc/cpuinfo "model name"; else platform.processor() or the machine type)."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> set[str]:
    """This CPU's instruction-set flags (/proc/cpuinfo "flags", e.g. avx512_bf16, amx_bf16; empty where unknown)."""
    return set((_cpuinfo_field("flags") or "").split())


# --------------------------------------------------------------------------------------------------
# Memory


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str] | None:
    """(bytes that allocations on `device` can still get, where that figure comes from), or None where
    it is unknown (mps, a system without /proc). CPU: MemAvailable of /proc/meminfo, or the room left
    under the process's address-space limit (RLIMIT_AS, `ulimit -v`) if that is less; CUDA: the
    device's free memory, with what torch's caching allocator holds unused."""
    kind = device.split(":")[0] if isinstance(device, str) else device.type
    if kind == "cuda":
        import torch

        device = torch.device(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # torch's, free to reuse
        return torch.cuda.mem_get_info(device)[0] + cached, f"free on {device}"
    if kind != "cpu":
        return None
    figures = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        figures.append((kib * 1024, "available on this machine"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/statm", encoding="ascii") as f:
                mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            figures.append((max(0, limit - mapped), "left under this process's address-space limit (ulimit -v)"))
    except (ImportError, OSError, ValueError):
        pass
    return min(figures) if figures else None


def check_fits(nbytes: int, device: torch.device | str, what: str, fix: str) -> None:
    """UserError "WHAT needs N of memory, but M is available...; FIX" when `nbytes` more bytes cannot be
    allocated on `device` (see `available_memory`; nothing is checked where that is unknown)."""
    available = available_memory(device)
    if available is not None and nbytes > available[0]:
        free, where = available
        raise UserError(f"{what} needs {format_bytes(nbytes)} of memory, but {format_bytes(free)} is {where}; {fix}")

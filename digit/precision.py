"""Numeric precision of a stage: what `precision: auto | no | fp32 | bf16 | fp16` means on this machine.

bf16 autocast pays only where the hardware computes bf16: CUDA GPUs from Ampere on, and CPUs with
AVX512-BF16 / AMX (or AVX-512 cores, which oneDNN runs bf16 on). Elsewhere PyTorch falls back to
scalar code: on an AVX2-only AMD EPYC (2 cores) a 256x256 bf16 matmul took 24.6 ms against 0.26 ms
in fp32, so a bf16 run of the default pipeline would take days. Hence `auto` (the default of the
trainers): bf16 where it is native, fp32 elsewhere. The resolved value goes into every trainer's
checkpoint fingerprint and summary, so outputs say how they were made and a checkpoint is never
resumed at another precision.
"""

from __future__ import annotations

import functools

import torch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    """The device Accelerate picks for a single process: CUDA when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@functools.lru_cache(maxsize=None)
def _native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type == "cpu":
        check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(check()) if check is not None else False
    return False


def native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: the one Accelerate picks) runs bf16 matmuls in hardware."""
    return _native_bf16(torch.device(device or default_device()).type)


def unsupported(precision: str, device: torch.device | str | None = None) -> str | None:
    """Why `precision` cannot run well on `device`, or None. For params checks, before heavy work."""
    device = torch.device(device or default_device())
    if precision == "fp16" and device.type != "cuda":
        return "fp16 needs a CUDA GPU; use auto or no"
    if precision == "bf16" and not native_bf16(device):
        return (f"bf16 is emulated in software on this {device.type.upper()} (no AVX512-BF16/AMX; "
                f"CPU capability {torch.backends.cpu.get_cpu_capability()}), about 100x slower than fp32; "
                "use auto (bf16 where the hardware has it, else fp32) or no")
    return None


def resolve_precision(precision: str, device: torch.device | str | None = None) -> str:
    """A params precision as Accelerate's mixed_precision on `device`: no | bf16 | fp16."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "no"
    return "no" if precision == "fp32" else precision

"""Run metadata for result files: hardware, versions, command line and date (no timing: see measure.py)."""
from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from tempspec_engine.attention import cpu_attention_enabled
from tempspec_engine.layer_ops import cpu_layer_ops_enabled
from tempspec_engine.linear import (ALL_ROWS, cpu_kernel_enabled, cpu_kernel_max_rows, kernel_isa,
                                    torch_bf16_matmul_is_fast)

VERSIONED = ("transformers", "numpy", "matplotlib", "triton")  # besides python, torch and tempspec


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else platform.processor() or the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
        if name:
            return name
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name for a CUDA device, the CPU's (cpu_name) otherwise."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


def nvidia_driver() -> Optional[str]:
    """The NVIDIA driver version from nvidia-smi, or None."""
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip().splitlines() or [None])[0] if res.returncode == 0 else None


def package_version(name: str) -> Optional[str]:
    """An installed package's version (its distribution metadata, else its module's __version__), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return __import__(name).__version__
    except (ImportError, AttributeError):
        return None


def cpu_kernels_meta() -> dict:
    """Which of tempspec's CPU kernels this process uses: onednn_bf16, cpu_linear_kernel, cpu_linear_kernel_isa (its
    variant, or None), cpu_linear_kernel_max_rows, cpu_attention_kernel, cpu_layer_ops (collect_meta)."""
    rows = cpu_kernel_max_rows()
    return {"onednn_bf16": torch_bf16_matmul_is_fast(), "cpu_linear_kernel": cpu_kernel_enabled(),
            "cpu_linear_kernel_isa": kernel_isa() if cpu_kernel_enabled() else None,
            "cpu_linear_kernel_max_rows": "all" if rows == ALL_ROWS else rows,
            "cpu_attention_kernel": cpu_attention_enabled(), "cpu_layer_ops": cpu_layer_ops_enabled()}


def collect_meta(device) -> dict:
    """Hardware, versions, command line and time of the run: device_name, cpu, cpu_count, torch_threads, platform,
    versions {python, torch, tempspec, and transformers / numpy / matplotlib / triton where installed}, command,
    date (UTC, ISO 8601 to the second); on CPU loadavg [1, 5, 15 min], onednn_bf16 (whether torch has a fast bf16
    matrix product here), cpu_linear_kernel (whether bf16 linear layers run tempspec's kernel), cpu_linear_kernel_isa
    (its variant: avx512bf16 or avx2) and cpu_linear_kernel_max_rows ("all" or the most input rows it takes: tempspec_engine/linear.py),
    cpu_attention_kernel (whether attention of a few queries runs tempspec's kernel: tempspec_engine/attention.py),
    cpu_layer_ops (whether norms, SiLU products, RoPE and cache stores run the fused kernels: layer_ops.py);
    cuda (its version) on a CUDA device."""
    device = torch.device(device)
    from tempspec_engine import __version__ as tempspec_version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in VERSIONED:
        version = package_version(name)
        if version is not None:
            versions[name] = version
    versions["tempspec"] = tempspec_version
    meta = {"device_name": device_name(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(), "versions": versions,
            "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name] + sys.argv),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        meta["loadavg"] = list(os.getloadavg())
    if device.type == "cpu":
        meta.update(cpu_kernels_meta())
    if device.type == "cuda" and torch.version.cuda:
        meta["cuda"] = torch.version.cuda
    return meta

"""What a benchmark ran on: CPU, cores, threads, versions. Recorded with every result."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import numba
import numpy as np

import fastbn

from .roofline import l3_cache_bytes


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux, else the platform module)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_identity() -> str | None:
    """Vendor, family, model and stepping: they tell CPUs apart where the model name is
    generic (virtual machines often report just "AMD EPYC")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return None
    if "vendor_id" not in fields:
        return None
    return (f"{fields['vendor_id']} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}")


def cpu_flags() -> list[str]:
    """The SIMD extensions relevant to the kernels' vector width."""
    wanted = ("avx512f", "avx2", "avx", "sse4_2", "neon", "asimd")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in present]
    except OSError:
        pass
    return []


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none). On a shared machine
    they say whether other work competed with the run: a pool of 2 threads on 2 cores waits
    for a time slice whenever one of its threads is descheduled."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python and of every package a row may depend on."""
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "python": platform.python_version(),
        "fastbn": fastbn.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba-cuda": _version("numba-cuda"),
        "scipy": _version("scipy"),
        "threadpoolctl": _version("threadpoolctl"),
        "torch": torch_version,
    }


def thread_pools() -> list[dict] | str:
    """The native thread pools loaded in this process (BLAS, OpenMP), as threadpoolctl reports
    them: library, API, version, thread count, threading layer. A spinning BLAS pool beside
    Numba's changes what a small benchmark measures, so a run records them. A string says why
    they are unknown."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "threadpoolctl is not installed (pip install threadpoolctl)"
    keep = ("user_api", "internal_api", "prefix", "version", "num_threads", "threading_layer",
            "architecture", "filepath")
    return [{k: pool[k] for k in keep if k in pool} for pool in threadpool_info()]


def threading_layer() -> str:
    """Numba's threading layer; only known once a parallel kernel has run in this process."""
    try:
        return numba.threading_layer()
    except ValueError:
        return "not yet chosen"


def gpu_l2_bytes() -> int | None:
    """L2 cache size of the CUDA device the cuda rows run on (None without a real GPU)."""
    if gpu_name() is None:
        return None
    from numba import cuda
    return getattr(cuda.get_current_device(), "L2_CACHE_SIZE", None)


def gpu_driver_version() -> str | None:
    """The CUDA driver's version ("12.4") when the cuda rows run on a real GPU."""
    if gpu_name() is None:
        return None
    from numba import cuda
    major, minor = cuda.cudadrv.driver.driver.get_version()
    return f"{major}.{minor}"


def gpu_name() -> str | None:
    """Name of the CUDA device the cuda rows run on, when there is a real one."""
    from .registry import unavailable_reason
    if unavailable_reason("cuda") is not None:
        return None
    from numba import cuda
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


def machine_info() -> dict:
    """Everything needed to tell whether two runs are comparable."""
    cache = l3_cache_bytes()
    torch_threads = None
    try:
        import torch
        torch_threads = torch.get_num_threads()
    except ImportError:
        pass
    return {
        "cpu": cpu_model(),
        "cpu_identity": cpu_identity(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "last_level_cache_bytes": cache,
        "memory_bytes": memory_bytes(),
        "numba_threads": numba.get_num_threads(),
        "numba_threading_layer": threading_layer(),
        "torch_threads": torch_threads,
        "gpu": gpu_name(),
        "gpu_driver": gpu_driver_version(),
        "platform": platform.platform(),
        "thread_pools": thread_pools(),
    }

"""The machine a measurement ran on: CPU, cores, versions, threads and load average.

Shared by ``trak-core compare`` and the benchmark scripts (``bench/_report.py`` imports from here: ``trak_core``
never imports from ``bench/``). Framework-free, as ``import trak_core`` is: versions are read with
``importlib.metadata`` (no ``import torch``), and torch's thread count only where torch is already imported.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import sys
from typing import Any

PACKAGES = ("numpy", "torch", "jax", "jaxlib", "cupy", "array-api-compat", "trak-core")


def load_average() -> str:
    """The 1, 5 and 15 minute load averages ("1.93 4.47 3.88"; "?" where the system has none): a shared machine's
    timings are read against it."""
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "?"


def cpu() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where there is none)."""
    name = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return name or platform.machine() or "?"


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """Python's version and each installed distribution's of ``packages`` (left out when not installed)."""
    found = {"python": platform.python_version()}
    for name in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def threads() -> dict[str, Any]:
    """The threads a run could use: the cores this process may run on, ``OMP_NUM_THREADS`` (``None`` when unset)
    and, where torch is already imported, ``torch.get_num_threads()``."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    found: dict[str, Any] = {"usable_cores": usable, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        found["torch"] = torch.get_num_threads()
    return found


def facts() -> dict[str, Any]:
    """``host``, ``cpu``, ``cores``, ``versions``, ``threads`` and ``load_average``, for a report."""
    return {"host": platform.node(), "system": f"{platform.system()} {platform.release()}", "cpu": cpu(),
            "cores": os.cpu_count(), "versions": versions(), "threads": threads(), "load_average": load_average()}


def describe(found: dict[str, Any]) -> str:
    """``facts()`` in one line: ``machine: <cpu> (<cores> cores, <host>, <system>); python 3.11.7, numpy 2.1.0, ...;
    threads: usable_cores 2, OMP_NUM_THREADS 1, torch 1; load average 1.93 4.47 3.88`` (with ``load_before`` in
    ``found``: ``load average <load_before> before, <load_average> after``)."""
    names = ", ".join(f"{name} {version}" for name, version in found["versions"].items())
    used = ", ".join(f"{name} {value}" for name, value in found["threads"].items() if value is not None)
    load = (f"{found['load_before']} before, {found['load_average']} after" if "load_before" in found
            else found["load_average"])
    return (f"machine: {found['cpu']} ({found['cores']} cores, {found['host']}, {found['system']}); {names}; "
            f"threads: {used}; load average {load}")

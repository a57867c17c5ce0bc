"""Probe GPUs and their free memory through NVML (nvidia-ml-py), when present."""
from __future__ import annotations

import logging

from services.inference.core.placement import DeviceReport

log = logging.getLogger("llmesh.inference.devices")


def probe_gpus() -> list[DeviceReport]:
    """Every NVIDIA device with its free memory; empty without a driver or the package."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []
    try:
        reports = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            reports.append(DeviceReport(index=index, name=name.decode() if isinstance(name, bytes) else name,
                                        total_bytes=int(memory.total), free_bytes=int(memory.free)))
        return reports
    except Exception as exc:
        log.warning("NVML probe failed: %s", exc)
        return []
    finally:
        pynvml.nvmlShutdown()

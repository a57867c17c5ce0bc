"""GPU pool sizing: how many layers of the model fit on each device.

One engine runs per usable device; a device that cannot hold even one layer
next to the KV cache and a safety margin is skipped, and with no usable
device a single CPU engine runs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceReport:
    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ModelFootprint:
    #: Size of the weights (the GGUF file is a close upper bound).
    weights_bytes: int
    #: Repeating layers; the output layer counts as one more.
    num_layers: int
    #: KV cache and compute buffers for the configured context.
    context_bytes: int


@dataclass(frozen=True)
class Placement:
    device: str
    device_index: int
    n_gpu_layers: int

    @property
    def on_gpu(self) -> bool:
        return self.device_index >= 0


CPU = Placement(device="cpu", device_index=-1, n_gpu_layers=0)


def layers_that_fit(device: DeviceReport, model: ModelFootprint, margin_fraction: float = 0.1,
                    margin_bytes: int = 512 << 20) -> int:
    """Layers (out of num_layers + 1) that fit in the device's free memory after the margin."""
    margin = max(margin_bytes, int(device.total_bytes * margin_fraction))
    room = device.free_bytes - margin - model.context_bytes
    if room <= 0:
        return 0
    per_layer = model.weights_bytes / (model.num_layers + 1)
    return min(model.num_layers + 1, int(room // per_layer))


def plan_pool(devices: list[DeviceReport], model: ModelFootprint, *, max_engines: int = 0,
              margin_fraction: float = 0.1, margin_bytes: int = 512 << 20) -> list[Placement]:
    """One placement per device that holds at least one layer, most layers first; CPU if none."""
    placements = []
    for device in devices:
        layers = layers_that_fit(device, model, margin_fraction, margin_bytes)
        if layers > 0:
            placements.append(Placement(device=f"gpu:{device.index} {device.name}".strip(),
                                        device_index=device.index, n_gpu_layers=layers))
    placements.sort(key=lambda p: -p.n_gpu_layers)
    if max_engines > 0:
        placements = placements[:max_engines]
    return placements or [CPU]

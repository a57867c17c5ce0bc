"""GPU pool sizing from fake device reports."""
from services.inference.core.placement import CPU, DeviceReport, ModelFootprint, layers_that_fit, plan_pool

GIB = 1 << 30
MODEL = ModelFootprint(weights_bytes=19 * GIB, num_layers=18, context_bytes=2 * GIB)  # 1 GiB per layer


def test_no_devices_runs_one_cpu_engine():
    assert plan_pool([], MODEL) == [CPU]


def test_big_device_takes_every_layer():
    device = DeviceReport(0, "H100", total_bytes=80 * GIB, free_bytes=79 * GIB)
    (placement,) = plan_pool([device], MODEL)
    assert placement.n_gpu_layers == 19 and placement.device_index == 0


def test_small_device_takes_what_fits_after_kv_and_margin():
    device = DeviceReport(0, "small", total_bytes=12 * GIB, free_bytes=10 * GIB)
    # 10 GiB free - 1.2 GiB margin (10% of total) - 2 GiB context = 6.8 GiB -> 6 layers.
    assert layers_that_fit(device, MODEL) == 6


def test_one_engine_per_usable_device_and_full_ones_are_skipped():
    devices = [
        DeviceReport(0, "a", total_bytes=24 * GIB, free_bytes=1 * GIB),  # busy: nothing fits
        DeviceReport(1, "b", total_bytes=24 * GIB, free_bytes=20 * GIB),
        DeviceReport(2, "c", total_bytes=80 * GIB, free_bytes=70 * GIB),
    ]
    pool = plan_pool(devices, MODEL)
    assert [p.device_index for p in pool] == [2, 1]
    assert pool[0].n_gpu_layers == 19
    assert pool[1].n_gpu_layers == 15  # 20 - 2.4 - 2 = 15.6 GiB
    assert plan_pool(devices, MODEL, max_engines=1)[0].device_index == 2

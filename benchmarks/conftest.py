"""Shared fixtures for the benchmarks (pytest-benchmark), e.g.
``python -m pytest benchmarks/bench_cpu_lora.py --benchmark-json=cpu.json``.
pytest puts this directory on sys.path, so ``cases`` and ``bandwidth`` import as modules."""

from __future__ import annotations

import pytest
from bandwidth import measure_read_bandwidth

_BANDWIDTH: dict | None = None


def read_bandwidth() -> dict:
    """Measured once per run (see bandwidth.py)."""
    global _BANDWIDTH
    if _BANDWIDTH is None:
        _BANDWIDTH = measure_read_bandwidth()
    return _BANDWIDTH


@pytest.fixture(scope="session")
def bandwidth() -> dict:
    return read_bandwidth()


def pytest_benchmark_update_machine_info(config, machine_info):
    """Record what the numbers depend on next to them in ``--benchmark-json``."""
    import torch

    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["read_bandwidth"] = read_bandwidth()
    try:
        from lorart.backend import cpu

        machine_info["lorart_cpu_isa"] = cpu.isa()
        machine_info["lorart_cpu_isas"] = cpu.available_isas()
    except ImportError as exc:
        machine_info["lorart_cpu_isa"] = f"unavailable: {exc}"

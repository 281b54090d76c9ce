"""Shared test fixtures: seeds, the per-dtype tolerance table, reference comparison."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter. Set before any test
# module imports triton, so the same command runs the same tests on a GPU machine.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
# Test files that need triton as a whole (the kernels and their compile check); without
# triton each of their tests is skipped with the reason.
TRITON_TEST_FILES = ("test_triton_backend.py", "test_triton_compile.py")


def _import_installed_lorart() -> str | None:
    """Import lorart as installed, never the bare source tree without its compiled module;
    returns what is wrong, if anything.

    ``python -m pytest`` puts the current directory first on ``sys.path``, so from the
    repository root a non-editable install would be shadowed by ``./lorart`` (no
    ``_C``). An editable install is the source tree *with* ``_C``, and is fine.
    """
    def has_c() -> bool:
        return importlib.util.find_spec("lorart._C") is not None

    missing = ("lorart is not installed: the tests import the installed package (./lorart "
               "has no compiled module). Run `make test`, or `pip install \".[test]\"` first.")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lorart warns once when _C is missing
        try:
            import lorart
        except ImportError:
            return missing
        if has_c():
            return None
        source_tree = Path(lorart.__file__).resolve().parent == REPO / "lorart"
        if not source_tree:
            return None  # installed without the C++ module (build failed): its tests skip
        for name in [m for m in sys.modules if m == "lorart" or m.startswith("lorart.")]:
            del sys.modules[name]
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]
        try:
            importlib.import_module("lorart")
        except ImportError:
            return missing
    return None


_LORART_PROBLEM = _import_installed_lorart()


def pytest_configure(config):
    if _LORART_PROBLEM:
        raise pytest.UsageError(_LORART_PROBLEM)


def pytest_collection_modifyitems(config, items):
    if HAVE_TRITON:
        return
    skip = pytest.mark.skip(reason="triton is not installed (pip install triton, or the "
                                   "test extra): its CPU interpreter runs these kernels")
    for item in items:
        if item.path.name in TRITON_TEST_FILES:
            item.add_marker(skip)

# Per-dtype tolerance, as a fraction of the largest |expected| value: the one table, shared
# with the GPU check and the benchmarks.
if _LORART_PROBLEM is None:
    from lorart.bench.tolerance import TOLERANCE


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 factor: float = 1.0, what: str = "") -> None:
    """Check ``actual`` against a float32/64 reference within ``TOLERANCE[dtype]``.

    The tolerance scales with the largest |expected| value so it means the same at
    K=7 and K=4096; NaN must appear exactly where the reference has it.
    """
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{what} shape {actual.shape} != {expected.shape}"
    a, e = actual.double().cpu(), expected.double().cpu()
    assert torch.equal(a.isnan(), e.isnan()), f"{what} NaN pattern differs"
    finite = e.isfinite() & ~e.isnan()
    if not finite.any():
        return
    scale = e[finite].abs().max().clamp_min(1e-30)
    err = (a[finite] - e[finite]).abs().max()
    tol = TOLERANCE[dtype] * factor * scale
    assert err <= tol, f"{what} max error {err:.3e} > tol {tol:.3e} ({dtype}, scale {scale:.3e})"


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs per test, reproducible from the test's name."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


def _cpu_isas() -> list[str]:
    """Instruction sets of the C++ kernels on this machine (none without lorart._C)."""
    try:
        from lorart.backend import cpu
    except ImportError:
        return []
    return cpu.available_isas()


CPU_ISAS = _cpu_isas() if _LORART_PROBLEM is None else []


@pytest.fixture(params=CPU_ISAS or [pytest.param(None, marks=pytest.mark.skip(
    reason="lorart._C not built: no C++ kernels"))])
def isa(request):
    """Each instruction set the C++ kernels have here, set for the test, restored after."""
    from lorart.backend import cpu

    previous = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(previous)


@pytest.fixture
def triton_interpret():
    """Whether Triton kernels run in the CPU interpreter (CI) or on a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def smollm2_pirate():
    """``(model, tokenizer)``: the real SmolLM2 from its GGUF (``lorart.from_gguf()``) with
    the shipped ``pirate`` adapter loaded; one per test module (tests may add adapters)."""
    pytest.importorskip("gguf")
    import lorart

    try:
        model, tok = lorart.from_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    adapters = Path(lorart.__file__).parent / "data" / "adapters"
    lorart.load_adapter(model, adapters / "pirate", "pirate")
    return model, tok

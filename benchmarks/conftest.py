"""pytest-benchmark suites: ``pytest benchmarks/ --benchmark-only``. The cases and sizes are in
bench_cases.py (small on a CPU, full on a CUDA GPU)."""

from bench_cases import SIZES


def pytest_generate_tests(metafunc):
    if "tokens" in metafunc.fixturenames:
        metafunc.parametrize("tokens", SIZES.tokens)

"""Test-wide setup: 8 fake CPU devices (before JAX starts) so sharding tests run in-process."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The 8 fake devices share 2 cores with a second pytest worker: a collective can wait long for a
# starved device thread, and XLA's default is to abort the process after a fixed timeout.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += (
        " --xla_cpu_collective_call_terminate_timeout_seconds=1200 --xla_cpu_collective_timeout_seconds=1200"
    )
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402

# In CI (``CI`` set) the [test] extra is installed, so a test skipped because an import failed
# (``pytest.importorskip("torch")``, a module-level skip) is a broken environment, not an optional
# dependency: report it as a failure instead of a silent skip.
_IMPORT_SKIP = ("could not import", "is not installed")


def _missing_module_skip(report) -> bool:
    return (
        bool(os.environ.get("CI")) and report.skipped and any(s in str(report.longrepr) for s in _IMPORT_SKIP)
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if _missing_module_skip(report):
        report.outcome = "failed"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    report = outcome.get_result()
    if _missing_module_skip(report):
        report.outcome = "failed"

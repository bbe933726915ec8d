"""The opt-in malloc policy (``effattn.retain_freed_memory``) and the bench flag that
applies it in every case's process."""

import platform
import subprocess
import sys

import pytest

import effattn
from effattn.allocator import MMAP_THRESHOLD_MAX, release_free_heap, retain_freed_memory
from effattn.bench import config as cfgmod
from effattn.bench import measure
from effattn.bench.config import ConfigError, load_config
from effattn.bench.targets import method_target

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _faults_per_round(retain: bool):
    """In a fresh interpreter (the setting is process-wide): ``(applied, released, minor
    faults of each of 3 rounds that allocate 2,048 64 KB tensors (128 MB) and free them)``."""
    code = (
        "import resource, torch, effattn\n"
        "from effattn.allocator import release_free_heap\n"
        f"ok = effattn.retain_freed_memory() if {retain} else None\n"
        "faults = []\n"
        "for _ in range(3):\n"
        "    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    xs = [torch.ones(16384) for _ in range(2048)]; del xs\n"
        "    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n"
        "ok = ok if ok is not None else release_free_heap()\n"
        "print(ok, release_free_heap(), *faults)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    ok, released, *faults = out.stdout.split()
    return ok, released, [int(f) for f in faults]


def test_applied_exactly_where_the_c_library_is_glibc():
    """True on glibc, and then the heap keeps 128 MB of freed blocks: later rounds fault
    (almost) nothing in, where by default glibc trims its heap and every round faults
    thousands of pages in afresh; False elsewhere."""
    ok, released, faults = _faults_per_round(True)
    assert ok == released == str(GLIBC)
    if GLIBC:
        assert max(faults[1:]) < 512
        assert min(_faults_per_round(False)[2][1:]) > 2048


@pytest.mark.parametrize("kw", [dict(trim_threshold=-1), dict(mmap_threshold=-5),
                                dict(mmap_threshold=MMAP_THRESHOLD_MAX + 1),
                                dict(trim_threshold=True), dict(mmap_threshold=1.5)])
def test_bad_thresholds_are_refused_before_anything_changes(kw):
    with pytest.raises(ValueError):
        retain_freed_memory(**kw)


def test_bench_flag_is_validated_and_applied_in_the_case_process(monkeypatch):
    """The config takes a bool only; a case whose task carries the flag applies the policy
    before running (and only then)."""
    assert load_config(None, {"retain_freed_memory": True}).retain_freed_memory is True
    assert load_config(None).retain_freed_memory is False
    with pytest.raises(ConfigError):
        load_config(None, {"retain_freed_memory": "yes"})
    calls = []
    monkeypatch.setattr(measure, "retain_freed_memory", lambda: calls.append(1) or True)
    task = {"mode": "time", "target": method_target("full", cfgmod.MethodSettings()), "N": 64,
            "batch": 1, "heads": 1, "dim": 8, "dim_v": 8, "dtype": "fp32", "device": "cpu",
            "causal": False, "backward": False, "repeats": 1, "warmup": 1, "threads": 1,
            "max_memory_mb": 0}
    assert measure.run_inline(dict(task, retain_freed_memory=False))["status"] == "ok"
    assert calls == []
    assert measure.run_inline(dict(task, retain_freed_memory=True))["status"] == "ok"
    assert calls == [1]


def test_exported_at_top_level():
    assert effattn.retain_freed_memory is retain_freed_memory and callable(release_free_heap)

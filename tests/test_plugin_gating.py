"""Where the CPU LoRA plugin installs (prag_vllm/vllm_plugin/__init__.py): only on vLLM's CPU
platform, only on the tested vLLM release, not when opted out; and all or nothing.

The gate tests run here, with the plugin's registry swapped for an empty one (the plugin may
already be installed in this process by an engine of an earlier test). The install tests need a
stock vLLM to compare with, so they run in a fresh interpreter (:func:`probe`, ~10 s)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_vllm_contract import PATCHED, owners

from prag_vllm import vllm_plugin
from prag_vllm.vllm_plugin import patching

LOGGER = "prag_vllm.vllm_plugin"


def snapshot() -> dict:
    """Every own entry of every object the plugin patches (modules, classes, all LoRA layer
    classes), by identity."""
    out = {}
    for spec, name, _, _ in PATCHED:
        for obj in owners(spec, name):
            out[id(obj)] = (obj, {k: id(v) for k, v in vars(obj).items()})
    return out


def diff(before: dict, after: dict) -> list[str]:
    changed = []
    for key, (obj, names) in before.items():
        now = after[key][1]
        label = getattr(obj, "__qualname__", getattr(obj, "__name__", repr(obj)))
        changed += [f"{label}.{n}" for n in sorted(set(names) | set(now)) if names.get(n) != now.get(n)]
    return changed


@pytest.fixture
def fresh(monkeypatch):
    """The plugin as in a process where ``register`` has not run, with an empty registry."""
    registry = patching.Patcher()
    monkeypatch.setattr(patching, "PATCHES", registry)
    monkeypatch.setattr(vllm_plugin, "_state", None)
    monkeypatch.delenv("PRAG_STOCK_LORA_OPS", raising=False)
    return registry


def fake_gpu(monkeypatch) -> None:
    """vLLM's ``current_platform`` as on a CUDA host."""
    import vllm.platforms
    from vllm.platforms.interface import Platform, PlatformEnum

    class FakeCudaPlatform(Platform):
        _enum = PlatformEnum.CUDA
        device_name = device_type = "cuda"

    monkeypatch.setattr(vllm.platforms, "_current_platform", FakeCudaPlatform())


def plugin_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(LOGGER)]


def test_non_cpu_platform_patches_nothing(fresh, monkeypatch, caplog):
    before = snapshot()  # (imports the patched modules first: importing them on a fake GPU would fail)
    fake_gpu(monkeypatch)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        vllm_plugin.register()
    assert diff(before, snapshot()) == [] and len(fresh) == 0
    records = plugin_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert "FakeCudaPlatform, not CPU" in records[0].getMessage()
    assert not vllm_plugin.enabled()


def test_non_cpu_platform_turns_the_projects_plugin_dependent_paths_off(fresh, monkeypatch):
    """``grouped_ops_active`` (the server's worker merge, the warm-up, the zero-adapter guard)
    follows the gate: on a GPU the plugin is not active, before and after ``register``."""
    from prag_vllm.generate import grouped_ops_active

    fake_gpu(monkeypatch)
    assert vllm_plugin.unsupported_reason() == "vLLM's platform is FakeCudaPlatform, not CPU"
    assert not grouped_ops_active()
    vllm_plugin.register()
    assert not grouped_ops_active()


def test_unsupported_vllm_version_patches_nothing_and_logs_one_line(fresh, monkeypatch, caplog):
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    before = snapshot()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        vllm_plugin.register()
    assert diff(before, snapshot()) == [] and len(fresh) == 0
    records = plugin_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "vLLM 0.33.0 is not the tested 0.32.x" in records[0].getMessage()
    assert not vllm_plugin.enabled()


def test_opted_out_patches_nothing(fresh, monkeypatch, caplog):
    monkeypatch.setenv("PRAG_STOCK_LORA_OPS", "1")
    before = snapshot()
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        vllm_plugin.register()
    assert diff(before, snapshot()) == [] and len(fresh) == 0
    assert [r.getMessage() for r in plugin_records(caplog)] == [
        "prag: CPU LoRA plugin not installed, vLLM left stock: PRAG_STOCK_LORA_OPS=1"]
    assert not vllm_plugin.enabled()


def test_patcher_restores_own_entries_and_removes_added_ones():
    class Base:
        def f(self):
            return "base"

    class Owner(Base):
        @classmethod
        def g(cls):
            return "g"

    raw_g = vars(Owner)["g"]
    p = patching.Patcher()
    p.set(Owner, "f", lambda self: "patched")  # inherited: the owner had no entry
    p.set(Owner, "g", classmethod(lambda cls: "patched"))
    p.set(Owner, "g", classmethod(lambda cls: "twice"))
    p.set(Owner, "marker", True)
    assert Owner().f() == "patched" and Owner.g() == "twice" and p.original(Owner, "g") is raw_g
    p.rollback()
    assert "f" not in vars(Owner) and "marker" not in vars(Owner) and vars(Owner)["g"] is raw_g
    assert Owner().f() == "base" and len(p) == 0


# --- a real install, in a fresh interpreter ---------------------------------------------------

PROBE = textwrap.dedent('''
    import json, logging, sys
    sys.path.insert(0, sys.argv[1])
    from test_plugin_gating import diff, snapshot
    from test_vllm_contract import PATCHED, owners

    import prag_vllm.vllm_plugin as plugin
    from prag_vllm.vllm_plugin import gather, patching

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelname, record.getMessage()))

    logger = logging.getLogger("prag_vllm.vllm_plugin")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)

    def label(obj):
        return f"{obj.__module__}:{obj.__qualname__}" if isinstance(obj, type) else obj.__name__

    out = {}
    stock = snapshot()
    plugin.register()
    out["state"] = plugin._state
    out["patched"] = sorted({(label(o), n) for o, n in patching.PATCHES.patched})
    out["expected"] = sorted({(label(o), n) for spec, n, _, _ in PATCHED for o in owners(spec, n)})
    out["changed"] = len(diff(stock, snapshot()))
    total = len(patching.PATCHES)
    plugin.uninstall()
    out["after_uninstall"] = diff(stock, snapshot())

    real_set, failures = patching.Patcher.set, {}
    for k in sorted({0, 1, total // 2, total - 1}):
        calls = []

        def failing_set(self, owner, name, value, k=k, calls=calls):
            if len(calls) == k:
                raise RuntimeError(f"injected at set {k}")
            calls.append(name)
            real_set(self, owner, name, value)

        patching.Patcher.set = failing_set
        del records[:]
        plugin.register()  # must not raise
        patching.Patcher.set = real_set
        failures[k] = {"state": plugin._state, "left": len(patching.PATCHES), "diff": diff(stock, snapshot()),
                       "records": list(records), "applied_before": len(calls)}
        plugin._state = None
    out["failures"] = failures

    real_gather = gather.install

    def broken(patcher=None):
        real_gather(patcher)
        raise ImportError("injected after gather")

    gather.install = broken
    del records[:]
    plugin.register()
    gather.install = real_gather
    out["module_failure"] = {"state": plugin._state, "diff": diff(stock, snapshot()), "records": list(records)}
    plugin._state = None
    plugin.register()
    out["reinstalled"] = plugin._state
    plugin.uninstall()
    out["final"] = diff(stock, snapshot())
    print("PROBE " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PRAG_STOCK_LORA_OPS"}
    tests = str(Path(__file__).resolve().parent)
    proc = subprocess.run([sys.executable, "-c", PROBE, tests], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    assert line is not None, f"probe failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(line[len("PROBE "):])


def test_install_patches_exactly_the_documented_names(probe):
    assert probe["state"] == "installed"
    assert probe["patched"] == probe["expected"]  # the contract tests' PATCHED table is complete
    assert probe["changed"] >= len(probe["expected"])


def test_uninstall_restores_every_vllm_name(probe):
    assert probe["after_uninstall"] == [] and probe["final"] == []


def test_failure_halfway_through_install_rolls_everything_back(probe):
    failures = probe["failures"]
    assert len(failures) >= 3 and max(f["applied_before"] for f in failures.values()) > 20
    for k, f in failures.items():
        assert f["state"] == "failed" and f["left"] == 0, k
        assert f["diff"] == [], (k, f["diff"])  # every vLLM name identical to the stock one
        assert len(f["records"]) == 1 and f["records"][0][0] == "WARNING", (k, f["records"])
        assert f"injected at set {k}" in f["records"][0][1] and "every change undone" in f["records"][0][1]


def test_failure_inside_a_module_install_rolls_back_and_a_later_register_installs(probe):
    failure = probe["module_failure"]
    assert failure["state"] == "failed" and failure["diff"] == []
    assert [level for level, _ in failure["records"]] == ["WARNING"]
    assert "ImportError: injected after gather" in failure["records"][0][1]
    assert probe["reinstalled"] == "installed"

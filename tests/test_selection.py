"""Selection across distributions: discovery, priority, overrides, loud fallback."""
import json
import subprocess
import sys
import warnings

import pytest

from kernelplane import (AttentionRequest, Capability, Provider, Requirements, SelectionError, hookimpl,
                         override_hardware, select)
from kernelplane.explain import explain, plugin_report
from kernelplane.reference.attention import ReferenceAttention
from kernelplane.registry import Registry, reset_registry
from kernelplane.selection import BackendFallbackWarning

REQ = AttentionRequest(num_heads=8, num_kv_heads=2, head_dim=64, dtype="float32")


@pytest.fixture
def registry():
    reg = Registry()
    reset_registry(reg)
    yield reg
    reset_registry(None)


def _plugin(*providers):
    class Plugin:
        @hookimpl
        def kernelplane_attention_backends(self):
            return list(providers)
    return Plugin()


def test_separate_distribution_is_discovered_ranked_and_chosen(registry):
    info = next(p for p in registry.plugins if p.distribution == "kernelplane-sdpa-example")
    assert info.version == "0.1.0" and info.error is None
    sel = select("attention", REQ)
    assert sel.chosen.name == "sdpa" and sel.chosen.plugin == "kernelplane-sdpa-example"
    names = [c.provider.name for c in sel.candidates]
    assert names.index("sdpa") < names.index("reference")
    assert type(sel.implementation).__name__ == "SdpaAttention"


def test_priority_decides_and_ties_break_by_name(registry):
    build = lambda r, h: ReferenceAttention(r)
    registry.register(_plugin(Provider("zeta", Capability.ATTENTION, 70, build),
                              Provider("alpha", Capability.ATTENTION, 70, build),
                              Provider("low", Capability.ATTENTION, 5, build)), name="p")
    sel = select("attention", REQ)
    assert [c.provider.name for c in sel.candidates][:2] == ["alpha", "zeta"]
    assert sel.chosen.name == "alpha"


def test_triton_provider_refused_on_cpu_with_reason(registry):
    registry.register(_plugin(Provider("gpu_kernel", Capability.ATTENTION, 90, lambda r, h: None,
                                       requirements=Requirements(needs_triton=True))), name="p")
    with override_hardware(device_type="cpu", triton_mode="unavailable", triton_version="3.0"):
        sel = select("attention", REQ)
    row = next(c for c in sel.candidates if c.provider.name == "gpu_kernel")
    assert not row.verdict.ok and "no GPU: Triton can only interpret here" in row.verdict.reason
    assert sel.chosen.name != "gpu_kernel"


def test_env_override_that_cannot_run_lists_every_candidate(registry, monkeypatch):
    registry.register(_plugin(Provider("hopper_only", Capability.ATTENTION, 100, lambda r, h: None,
                                       requirements=Requirements(device_types=["cuda"], min_compute_capability=(9, 0)))),
                      name="p")
    monkeypatch.setenv("KERNELPLANE_ATTENTION_BACKEND", "hopper_only")
    with override_hardware(device_type="cpu", compute_capability=None):
        with pytest.raises(SelectionError) as err:
            select("attention", REQ)
    msg = str(err.value)
    assert "hopper_only" in msg and "explicitly requested" in msg and "no GPU" in msg
    for name in ("sdpa", "reference"):
        assert name in msg  # every candidate is listed with its verdict


def test_env_override_picks_lower_priority_provider(registry, monkeypatch):
    monkeypatch.setenv("KERNELPLANE_ATTENTION_BACKEND", "reference")
    sel = select("attention", REQ)
    assert sel.chosen.name == "reference" and sel.override == "reference"


def test_unknown_override_is_an_error(registry):
    with pytest.raises(SelectionError, match="'nope' .* is not installed"):
        select("attention", REQ, override="nope")


def test_factory_that_raises_is_skipped_loudly(registry):
    def broken(request, hardware):
        raise RuntimeError("kernel image not found")

    registry.register(_plugin(Provider("broken", Capability.ATTENTION, 99, broken)), name="p")
    with pytest.warns(BackendFallbackWarning, match="broken.*kernel image not found"):
        sel = select("attention", REQ)
    assert sel.chosen.name == "sdpa"
    row = next(c for c in sel.candidates if c.provider.name == "broken")
    assert "build failed" in row.row()["reason"]


def test_warmup_failure_also_falls_back_and_strict_raises(registry):
    class FailsWarmup:
        def warmup(self):
            raise ValueError("bad config")

    registry.register(_plugin(Provider("flaky", Capability.ATTENTION, 99, lambda r, h: FailsWarmup())), name="p")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert select("attention", REQ).chosen.name == "sdpa"
    with pytest.raises(SelectionError, match="strict mode"):
        select("attention", REQ, strict=True)


def test_supports_callback_reason_and_exceptions(registry):
    from kernelplane import Verdict

    registry.register(_plugin(
        Provider("picky", Capability.ATTENTION, 99, lambda r, h: None,
                 supports=lambda r, h: Verdict.no("needs head_dim 128") if r.head_dim != 128 else Verdict.yes()),
        Provider("buggy", Capability.ATTENTION, 98, lambda r, h: None, supports=lambda r, h: 1 / 0)), name="p")
    sel = select("attention", REQ)
    reasons = {c.provider.name: c.verdict.reason for c in sel.candidates}
    assert reasons["picky"] == "needs head_dim 128"
    assert reasons["buggy"].startswith("supports() raised ZeroDivisionError")


def test_plugin_that_fails_to_import_is_reported_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "broken_kp_plugin.py").write_text("raise ImportError('needs libfoo.so')\n")
    dist = tmp_path / "broken_kp_plugin-1.2.3.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-kp-plugin\nVersion: 1.2.3\n")
    (dist / "entry_points.txt").write_text("[kernelplane.plugins]\nbroken = broken_kp_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reset_registry(reg)
    try:
        info = next(p for p in reg.plugins if p.name == "broken")
        assert info.distribution == "broken-kp-plugin" and "needs libfoo.so" in info.error
        assert select("attention", REQ).chosen is not None  # the others still work
        report = plugin_report()
        assert any(p["name"] == "broken" and p["error"] for p in report["plugins"])
    finally:
        reset_registry(None)


def test_hook_that_raises_is_reported(registry):
    class Raises:
        @hookimpl
        def kernelplane_attention_backends(self):
            raise RuntimeError("boom")

    registry.register(Raises(), name="raiser")
    assert select("attention", REQ).chosen is not None
    assert "boom" in next(p for p in registry.plugins if p.name == "raiser").error


def test_hot_path_is_the_implementation_itself(registry):
    sel = select("attention", REQ)
    # The engine keeps sel.implementation and calls .forward directly: no proxy in between.
    assert type(sel.implementation).forward is sel.implementation.__class__.forward


def test_explain_covers_every_capability(registry):
    tables = explain({Capability.ATTENTION: REQ})
    assert set(tables) == set(Capability)
    for sel in tables.values():
        assert sel.chosen is not None and any(r["chosen"] for r in sel.rows())


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "kernelplane.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def test_cli_plugins_and_explain_json():
    out = _cli("plugins", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert any(p["distribution"] == "kernelplane-core" for p in data["plugins"])
    out = _cli("explain", "--json")
    assert out.returncode == 0, out.stderr
    sel = json.loads(out.stdout)["selections"]
    assert set(sel) == {"attention", "kv_quantizer", "moe", "spec_proposer"}
    assert all(s["chosen"] for s in sel.values())


def test_cli_explain_text_shows_reasons():
    import os

    env = dict(os.environ, KERNELPLANE_ATTENTION_BACKEND="reference")
    out = _cli("explain", env=env)
    assert out.returncode == 0, out.stderr
    assert "== attention: reference  (override reference)" in out.stdout


def test_cli_explain_takes_the_cache_format_without_a_model():
    """``--kv-cache-dtype`` alone asks for the default model's shapes with that cache: the
    attention table reads that format and the quantizer table is that format's."""
    out = _cli("explain", "--json", "--kv-cache-dtype", "turboquant3")
    assert out.returncode == 0, out.stderr
    sel = json.loads(out.stdout)["selections"]
    assert sel["attention"]["request"]["kv_cache_format"] == "turboquant3"
    assert sel["kv_quantizer"]["request"]["format"] == "turboquant3"

"""Model FLOPs per token (one formula for every family), peaks by device kind, the cached CPU
probe, and MFU arithmetic."""

import json

import pytest

from jaxtok.models.llama import PRESETS as LLAMA
from jaxtok.train import flops


def test_llama_flops_by_hand():
    cfg = LLAMA["llama-tiny"]  # d 64, 2 layers, 4 heads / 2 kv heads x 16, d_ff 128, vocab 256
    per_layer = 64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128
    assert cfg.matmul_params() == 2 * per_layer + 256 * 64
    forward = 2 * cfg.matmul_params() + 4 * 2 * (4 * 16) * 512
    assert flops.model_flops_per_token(cfg, 512, training=False) == forward
    assert flops.model_flops_per_token(cfg, 512) == 3 * forward


@pytest.mark.parametrize("kind,dtype,expected", [
    ("TPU v4", "bfloat16", 275e12), ("TPU v5 lite", "bfloat16", 197e12), ("TPU v5p", "bfloat16", 459e12),
    ("TPU v6 lite", "float32", 918e12), ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
    ("NVIDIA H200", "float32", 494.5e12), ("NVIDIA A100-SXM4-40GB", "bfloat16", 312e12),
])
def test_published_peaks(kind, dtype, expected):
    assert flops.published_peak(kind, dtype).flops_per_s == expected
    assert flops.published_peak("Some new chip", dtype) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTOK_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda dtype: calls.append(dtype) or 1e11)
    first = flops.peak_flops("bfloat16")
    second = flops.peak_flops("bfloat16")
    assert first.flops_per_s == second.flops_per_s == 1e11 and calls == ["bfloat16"]
    assert "measured" in first.source and flops.cpu_model() in first.source
    stored = json.loads((tmp_path / flops.PEAK_CACHE_FILE).read_text())
    assert list(stored.values()) == [1e11]
    # refresh keeps the higher reading (a probe under load reads low)
    monkeypatch.setattr(flops, "measure_matmul_flops", lambda dtype: 5e10)
    assert flops.peak_flops("bfloat16", refresh=True).flops_per_s == 1e11


def test_mfu():
    assert flops.mfu(1000.0, 6e9, flops.Peak(1e13, "x")) == pytest.approx(0.6)
    assert flops.mfu(1000.0, 6e9, 2e13) == pytest.approx(0.3)


def test_probe_measures_something():
    assert flops.measure_matmul_flops("float32", sizes=(64,), repeats=2) > 0

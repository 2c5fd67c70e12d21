"""bench/gpu.sh --smoke: every section of the GPU benchmark runs on CPU at tiny sizes and reports numbers, not errors;
and a section that fails is recorded while the others still run."""
from __future__ import annotations

import json
import re
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


def positive(x) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.mark.slow
def test_smoke_run_fills_every_section_and_prints_the_table(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", "bench/gpu.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.load(open(tmp_path / "gpu.json"))
    sections = results["sections"]
    assert list(sections) == ["train", "loader", "encodec", "kmeans", "extract"]
    for name, record in sections.items():
        assert "error" not in record, (name, record.get("traceback"))
    assert positive(results["matmul_peak_tflops"])
    rows = sections["train"]["rows"]
    assert {(r["precision"], r["compile"]) for r in rows} == {("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)}
    assert {r["preset"] for r in rows} == {"tiny", "tiny+frontend=logmel"}  # a spectrogram front end's rows too
    for row in rows:
        assert "error" not in row, row.get("traceback")
        assert positive(row["audio_seconds_per_second"]) and positive(row["mfu_measured_peak"])
        if row["compile"]:
            breaks = row["graph_breaks"]  # the step breaks where it draws from a CPU generator (docs/cli.md)
            assert breaks["count"] == sum(breaks["reasons"].values()) >= 1 and breaks["graphs"] >= 1
            assert breaks["where"] and all(re.match(r"\S+\.py:\d+ \(", place) for place in breaks["where"]), breaks["where"]
    assert 0 <= sections["loader"]["data_wait_fraction"] <= 1 and positive(sections["loader"]["audio_seconds_per_second"])
    for name in ("encodec", "kmeans"):
        assert positive(sections[name]["real_time_factor"]) and positive(sections[name]["real_time_factor_dump_path"])
    assert positive(sections["encodec"]["real_time_factor_dump_path_batched"])
    assert set(sections["extract"]["clips_per_second"]) == {"1", "2", "4"}
    assert all(positive(v) for v in sections["extract"]["clips_per_second"].values())
    table = done.stdout[done.stdout.index("GPU benchmark on"):]
    for needle in ("tiny fp32 eager", "tiny bf16 compile", "graph breaks", "data wait", "real time", "patchout 4"):
        assert needle in table


def test_a_failing_section_is_recorded_and_the_next_one_runs(tmp_path):
    import gpu

    ctx = {"plan": {"budget_s": {"bad": 5, "good": 5}}, "out": str(tmp_path)}
    results = {"sections": {}}

    def bad(ctx, record):
        record["partial"] = 1.0
        raise RuntimeError("CUDA out of memory (pretend)")

    def good(ctx, record):
        record["value"] = 2.0

    gpu.run_section("bad", bad, ctx, results)
    gpu.run_section("good", good, ctx, results)
    saved = json.load(open(tmp_path / "gpu.json"))["sections"]
    assert saved["bad"]["error"] == "RuntimeError: CUDA out of memory (pretend)" and saved["bad"]["partial"] == 1.0
    assert saved["good"]["value"] == 2.0 and "error" not in saved["good"]


def test_a_section_over_its_budget_is_stopped_and_recorded(tmp_path):
    import time

    import gpu

    ctx = {"plan": {"budget_s": {"slow": 0.5}}, "out": str(tmp_path)}
    results = {"sections": {}}
    gpu.run_section("slow", lambda ctx, record: time.sleep(30), ctx, results)
    assert results["sections"]["slow"]["error"].startswith("OutOfTime") and results["sections"]["slow"]["seconds"] < 5

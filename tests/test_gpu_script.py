"""benchmarks/gpu.sh: its arguments and its answer where torch sees no GPU (here always: CUDA_VISIBLE_DEVICES is
emptied), and the report code of benchmarks/bench_gpu.py, which otherwise runs only on a GPU."""

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_gpu  # noqa: E402


def gpu_sh(*args):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120)


def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    out = tmp_path / "results-gpu.md"
    r = gpu_sh("--out", str(out), "--budget", "60")
    assert r.returncode == 0, r.stderr
    assert "no CUDA GPU here" in r.stdout and not out.exists()


def test_it_checks_its_arguments_first():
    r = gpu_sh("--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bash benchmarks/gpu.sh")
    for args, message in [(["--bogus"], "unknown argument '--bogus'"), (["--budget", "900"], "from 1 to 450"),
                          (["--budget=soon"], "not 'soon'"), (["--out"], "--out needs a value")]:
        r = gpu_sh(*args)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)


def test_the_report_keeps_every_part_a_failure_and_a_skip(tmp_path):
    out = tmp_path / "results-gpu.md"
    report = bench_gpu.Report(out, ["# mmar on a GPU"])
    deadline = time.perf_counter() + 60
    assert bench_gpu.part(report, "Works", deadline, 1, lambda: ["## Works", "", "fine"])
    assert not bench_gpu.part(report, "Breaks", deadline, 1, lambda: 1 / 0)
    assert not bench_gpu.part(report, "Too long", deadline, 3600, lambda: ["never run"])
    text = out.read_text()
    assert report.failed == ["Breaks"] and "**Failed parts: Breaks**" in text
    assert "ZeroDivisionError" in text and "Skipped:" in text and "never run" not in text and "fine" in text


def test_training_rows_are_held_to_the_mfu_target():
    rows = [dict(preset=p, params_m=1.0, batch=8, length=386, step_s=0.5, samples_s=16.0, tokens_s=6176.0,
                 gflop_step=500.0, mfu=mfu, memory_gib=2.0) for p, mfu in [("small", 0.2), ("base", 0.5),
                                                                           ("qwen2-0.5b", 0.3)]]
    text = "\n".join(bench_gpu.training_section(1e6, rows))
    assert "**1,000 TFLOP/s**" in text and "| base | 1.0M | 8 | 386 | 0.500 |" in text
    assert "✓ base: MFU 50.0 %" in text and "✗ qwen2-0.5b: MFU 30.0 %" in text and "small: MFU" not in text

"""docs/RESULTS.md: `make demo` and `make example-mnist` replace their own section with each run's figures."""

import json
from pathlib import Path

import pytest
import typer

from mmar_cli.machine import usable_cores
from mmar_cli.results import markers, record_section
from stages import demo

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"


def fake_result(all_correct: float) -> dict:
    """The parts of an evaluate metrics.json the demo's section reads."""
    return {"machine": {"cpu": "Test CPU", "cores": 2}, "reference": {"num_samples": 8},
            "metrics": {"gen.checker.all": all_correct, "und.caption.exact": 1.0, "und.qa.exact": 0.75}}


def test_a_demo_run_replaces_its_section_and_leaves_the_rest(tmp_path):
    path = tmp_path / "RESULTS.md"
    before = "# Results\n\nWhat was measured.\n\n## Another section\n\nKept as it is.\n"
    path.write_text(before)
    timings = {"pretrain": 60.0, "evaluate": 30.0}
    for all_correct, date in ((0.5, "2026-01-01"), (0.95, "2026-01-02")):
        record_section(path, demo.SECTION, demo.results_section(fake_result(all_correct), timings, date))
    text = path.read_text()
    assert text.startswith(before)
    assert text.count("## make demo") == 1 and all(text.count(m) == 1 for m in markers(demo.SECTION))
    assert "| `gen.checker.all` | 0.950 | >= 0.95 | met |" in text and "0.500" not in text and "2026-01-01" not in text
    assert "| `und.qa.exact` | 0.750 | >= 0.98 | MISSED |" in text
    assert "gen.checker.shape" not in text  # a metric the run did not report has no row
    assert "| whole demo: pretrain 60 s, evaluate 30 s | | 1.5 min | | |" in text
    assert "Last run 2026-01-02 on Test CPU (2 cores)" in text and "8 held-out samples" in text


def test_the_results_file_holds_each_runs_section_once():
    text = RESULTS.read_text()
    for name in (demo.SECTION, "make example-mnist"):
        assert all(text.count(m) == 1 for m in markers(name)), name


def test_the_seeds_section_gives_mean_min_max_and_checks_a_maximum_target():
    runs = [{"machine": {"cpu": "Test CPU", "cores": 2}, "reference": {"num_samples": 8},
             "metrics": {"gen.checker.all": a, "gen.seam_ratio": seam, "und.qa.exact": 1.0}}
            for a, seam in ((0.93, 1.1), (0.96, 1.3), (0.99, 1.0))]
    text = demo.seeds_section(runs, 120.0, "2026-01-03")
    assert "`make demo-seeds`: the demo trained and evaluated with seeds 0..2" in text and "2.0 min in all" in text
    # mean 0.96 meets >= 0.95; the worst seed (0.93) is 3 points below it
    assert "| `gen.checker.all` | 0.960 | 0.930 | 0.990 | 3.0 | 0.930 / 0.960 / 0.990 | >= 0.95 | met |" in text
    # a maximum: mean 1.133 <= 1.2 is met, the worst seed is the largest (1.3)
    assert "| `gen.seam_ratio` | 1.133 | 1.000 | 1.300 | 16.7 | 1.100 / 1.300 / 1.000 | <= 1.2 | met |" in text
    assert "und.caption.exact" not in text  # no seed reported it


def test_the_demo_runs_each_stage_with_its_seed_and_evaluates_once(tmp_path, monkeypatch):
    """The commands `make demo-seeds` runs for one seed (the stages themselves are faked): one evaluation, best
    of 4, whose metrics.json holds the one-draw figures too (stages.evaluate judges the first candidates)."""
    commands = []

    def fake_run(title, cmd, timings, log=None, threads=0):
        commands.append(cmd[3:])
        assert log is None and threads == 0  # one seed at a time: the terminal, torch's own threads
        out = next((a.split("=", 1)[1] for a in cmd if a.startswith("out=")), None)
        if cmd[3] == "evaluate":
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "metrics.json").write_text(json.dumps({"metrics": {"gen.checker.all": 0.96,
                                                                                 demo.ONE_DRAW: 0.9}}))

    monkeypatch.setattr(demo, "_run_stage", fake_run)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    metrics = demo._pipeline("demo", "data/demo", Path("runs/demo-seeds/seed-2"), 2, {}, sample=False)
    assert [c[0] for c in commands] == ["pretrain", "finetune", "evaluate"]
    assert all("trainer.seed=2" in c for c in commands[:2]) and "seed=2" in commands[2]
    assert "out=runs/demo-seeds/seed-2" in commands[2] and "gen.candidates=1" not in commands[2]
    assert metrics["metrics"] == {"gen.checker.all": 0.96, demo.ONE_DRAW: 0.9}


def test_seeds_side_by_side_share_the_cores_and_log_to_files(tmp_path, monkeypatch):
    """`--seeds 3 --jobs 2`: every seed runs, with half the cores' threads and its stages logged into its run
    directory; the section is written from all three (the pipeline itself is faked)."""
    calls = []

    def fake_pipeline(name, data, run, seed, timings, sample, logged=False, threads=0):
        calls.append((seed, str(run), logged, threads))
        return {"machine": {"cpu": "Test CPU", "cores": 2}, "reference": {"num_samples": 8},
                "metrics": {"gen.checker.all": 0.9 + seed / 100, demo.ONE_DRAW: 0.8}}

    (tmp_path / "data" / "demo" / "test").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "test" / "manifest.json").write_text("{}")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n")
    monkeypatch.setattr(demo, "_pipeline", fake_pipeline)
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "RESULTS", results)
    monkeypatch.chdir(tmp_path)
    demo.main(eval_mode=False, keep_data=True, record=True, seeds=3, jobs=2)
    threads = max(1, usable_cores() // 2)
    assert sorted(calls) == [(k, f"runs/demo-seeds/seed-{k}", True, threads) for k in range(3)]
    text = results.read_text()
    assert "| `gen.checker.all` | 0.910 | 0.900 | 0.920 | 1.0 | 0.900 / 0.910 / 0.920 | >= 0.95 | MISSED |" in text


def test_jobs_without_seeds_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "ROOT", tmp_path)
    monkeypatch.setattr(demo, "_run_stage", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(typer.BadParameter, match="--jobs 2 runs seeds side by side: give --seeds N"):
        demo.main(eval_mode=False, keep_data=False, record=False, seeds=1, jobs=2)

"""docs/RESULTS.md: `make demo` and `make example-mnist` replace their own section with each run's figures."""

from pathlib import Path

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
    assert "| `gen.checker.all` | 0.950 | >= 0.9 | met |" in text and "0.500" not in text and "2026-01-01" not in text
    assert "| `und.qa.exact` | 0.750 | >= 0.98 | MISSED |" in text
    assert "gen.checker.shape" not in text  # a metric the run did not report has no row
    assert "| whole demo: pretrain 60 s, evaluate 30 s | | 1.5 min | | |" in text
    assert "Last run 2026-01-02 on Test CPU (2 cores)" in text and "8 held-out samples" in text


def test_the_results_file_holds_each_runs_section_once():
    text = RESULTS.read_text()
    for name in (demo.SECTION, "make example-mnist"):
        assert all(text.count(m) == 1 for m in markers(name)), name

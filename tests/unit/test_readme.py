"""The README states what the code does: its metrics table is the one the code exports."""

from pathlib import Path

from orchestrator.metrics import METRICS, readme_with_table

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_metrics_table_is_current():
    text = README.read_text()
    assert readme_with_table(text) == text, "stale: run `python -m orchestrator.metrics --update-readme README.md`"
    assert all(f"`{m.name}`" in text for m in METRICS)


def test_the_two_setup_commands_are_documented():
    text = README.read_text()
    assert "make run" in text and "make test" in text

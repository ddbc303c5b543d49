"""benchmarks/table_cli.py: the shared OUT [--out FILE] command line of the run-folder tables."""

from __future__ import annotations

from benchmarks.table_cli import table_main


def test_the_table_of_the_folder_is_printed_and_written(tmp_path, capsys):
    seen = []

    def table(out):
        seen.append(out)
        return "| a |\n"

    target = tmp_path / "table.md"
    table_main(table, "Tabulate things.\n\nMore.", "benchmarks/x.sh", [str(tmp_path / "runs"), "--out", str(target)])
    assert seen == [tmp_path / "runs"]
    assert capsys.readouterr().out == "| a |\n"
    assert target.read_text() == "| a |\n"
    table_main(table, "Tabulate things.", "benchmarks/x.sh", [str(tmp_path)])  # without --out: printed only
    assert capsys.readouterr().out == "| a |\n" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]

"""smp_ros.report: the table and JSON of every benchmark and probe command."""

import json

from smp_ros.report import Column, format_table, write_json


def test_table_aligns_titles_and_values_like_format_specs():
    rows = [{"name": "physics", "count": 400, "rate": 1234.56, "unit": "steps/s"},
            {"name": "render cam_high", "count": 7, "rate": 3.0, "unit": "frames/s"}]
    table = format_table([Column("benchmark", "name", 18, left=True), Column("count", "count", 7),
                          Column("rate", "rate", 11, ".1f"), Column("unit", "unit", 0, left=True, sep="  ")], rows)
    assert table.splitlines() == [
        f"{'benchmark':<18}{'count':>7}{'rate':>11}  unit",
        f"{'physics':<18}{400:>7}{1234.56:>11.1f}  steps/s",
        f"{'render cam_high':<18}{7:>7}{3.0:>11.1f}  frames/s",
    ]
    assert table.splitlines()[1] == "physics               400     1234.6  steps/s"


def test_write_json_creates_the_folder_and_says_where(tmp_path, capsys):
    path = write_json(tmp_path / "runs" / "bench.json", {"results": [1, 2]}, indent=1)
    assert json.loads(path.read_text()) == {"results": [1, 2]}
    assert capsys.readouterr().out == f"wrote {path}\n"

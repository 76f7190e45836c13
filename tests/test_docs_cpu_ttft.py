"""The README's CPU "What to expect" table is read from docs/benchmarks/cpu_ttft.csv (written by
`python -m helpers.bench engines --csv`), so a new run cannot leave stale numbers behind."""

import csv
import re
from pathlib import Path

from helpers import bench

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "docs" / "benchmarks" / "cpu_ttft.csv"


def cpu_ttft_table(readme: str) -> list[tuple[str, str, str, str]]:
    """The rows (prompt tokens, full ms, blend ms, speed-up) of the README's CPU table."""
    section = readme[readme.index("## What to expect"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"^\| ([\d.]+K) \| (\d+) ms \| (\d+) ms \| ([\d.]+)x \|$", section, re.M)


def csv_rows(rows: list[dict]) -> set[tuple[str, str, str, str]]:
    """The CSV's rows as the README shows them."""
    return {(f"{int(r['prompt_tokens']) / 1000:.1f}K", f"{float(r['full_ms']):.0f}",
             f"{float(r['blend_ms']):.0f}", f"{float(r['speedup']):.2f}") for r in rows}


def read_csv() -> list[dict]:
    with open(CSV, newline="") as f:
        return list(csv.DictReader(f))


def test_readme_cpu_ttft_table_is_csv_rows():
    readme = (ROOT / "README.md").read_text()
    table = cpu_ttft_table(readme)
    assert len(table) >= 3, table
    rows = read_csv()
    assert set(table) == csv_rows(rows), f"README rows the CSV does not hold: {set(table) - csv_rows(rows)}"
    r = rows[0]  # the sentence above the table cites the run: its command, date and commit
    flat = " ".join(readme.split())
    assert "`python -m helpers.bench engines --csv docs/benchmarks/cpu_ttft.csv`" in flat
    assert f"{r['date']}, commit `{r['commit']}`" in flat
    assert all(r["card"].startswith("CPU, ") and r["repeats"] == "5" for r in rows), rows
    assert f"median of {r['repeats']}" in readme


def test_cpu_ttft_check_sees_a_stale_number():
    readme = (ROOT / "README.md").read_text()
    table = cpu_ttft_table(readme)
    tokens, full, blend, speedup = table[0]
    stale = f"| {tokens} | {full} ms | {int(blend) + 1} ms | {speedup}x |"
    doctored = readme.replace(f"| {tokens} | {full} ms | {blend} ms | {speedup}x |", stale)
    assert doctored != readme
    missing = set(cpu_ttft_table(doctored)) - csv_rows(read_csv())
    assert missing == {(tokens, full, str(int(blend) + 1), speedup)}


def test_engines_csv_has_one_row_per_size(tmp_path):
    summary = [
        {"target_tokens": 1024, "tokens": 1186, "full_ms": 2289.4, "blend_ms": 724.2, "speedup": 3.161},
        {"target_tokens": 2048, "tokens": 2268, "full_ms": 4360.0, "blend_ms": 1346.0, "speedup": 3.239}]
    path = tmp_path / "out" / "cpu_ttft.csv"
    bench.write_engines_csv(path, summary, repeats=5, model="smollm2")
    rows = list(csv.DictReader(path.open(newline="")))
    assert list(rows[0]) == bench.ENGINES_CSV_FIELDS
    assert [(r["prompt_tokens"], r["full_ms"], r["blend_ms"], r["speedup"]) for r in rows] == [
        ("1186", "2289", "724", "3.16"), ("2268", "4360", "1346", "3.24")]
    assert rows[0]["card"].startswith("CPU, ") and rows[0]["model"] == "smollm2" and rows[0]["repeats"] == "5"
    assert csv_rows(rows) == {("1.2K", "2289", "724", "3.16"), ("2.3K", "4360", "1346", "3.24")}

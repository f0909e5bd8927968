"""The stage's report as a rich table: one row per split, and how many expectations passed."""

from __future__ import annotations


def print_summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    passed = sum(e["success"] for e in report["expectations"])
    table = Table(title=f"validate ({report['format']}, eval: {report['eval_source']})",
                  caption=f"{passed}/{len(report['expectations'])} Great Expectations passed")
    for col in ("split", "file", "records", "dup rate", "overlap", "longest field"):
        table.add_column(col, overflow="fold")
    for split, s in report["splits"].items():
        field, chars = max(s["max_chars"].items(), key=lambda kv: kv[1])
        overlap = f"{s['overlap_rate']:.3g}" if "overlap_rate" in s else "-"
        table.add_row(split, s["file"], str(s["records"]), f"{s['duplicate_rate']:.3g}", overlap,
                      f"{field} {chars}")
    Console().print(table)

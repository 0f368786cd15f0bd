"""Markdown tables and SVG figures of a store's analyses, for a results write-up.

    python scripts/results_tables.py --store storage/real_smollm2 --figures results/real_smollm2

Runs (or reuses) the analyses with the local engine, prints each analysis's message and its
tables as Markdown, and writes the report's figures as SVG (text files, diffable) under
--figures. The reading of the numbers is left to the person writing it up.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pyarrow as pa

from raysweep.analysis.registry import figure_for
from raysweep.report import fresh_outcomes
from raysweep.store import Store

# Columns that identify a row or say how it was computed, and carry no measurement.
HIDDEN_COLUMNS = {"sweep", "trial_id", "fingerprint", "engine"}


def cell(v: object) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.3g}"
    return str(v)


def markdown(table: pa.Table, max_rows: int = 60) -> str:
    cols = [c for c in table.column_names if c not in HIDDEN_COLUMNS]
    rows = table.select(cols).to_pylist()[:max_rows]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    if table.num_rows > max_rows:
        lines.append(f"\n({table.num_rows - max_rows} more rows in the store's analysis/ folder)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True, type=Path)
    ap.add_argument("--figures", type=Path, default=None, help="folder for SVG figures")
    ap.add_argument("--only", nargs="*", default=None, help="analyses to print (default: all)")
    args = ap.parse_args()
    store = Store(args.store)
    for o in fresh_outcomes(store):
        if args.only and o.name not in args.only:
            continue
        print(f"\n### {o.name} ({o.status})\n\n{o.message}\n")
        for name, table in o.tables.items():
            print(f"**{name}**\n\n{markdown(table)}\n")
        draw = figure_for(o.name)
        if args.figures is not None and draw is not None and o.status == "ok":
            args.figures.mkdir(parents=True, exist_ok=True)
            for k, (title, fig) in enumerate(draw(o)):
                path = args.figures / f"{o.name}-{k}.svg"
                fig.savefig(path, format="svg", bbox_inches="tight", metadata={"Date": None})
                print(f"![{title}]({path})\n")


if __name__ == "__main__":
    main()

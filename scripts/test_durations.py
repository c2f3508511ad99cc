"""Write tests/durations.json (seconds per test file) from a pytest JUnit XML report.

    PYTEST_ADDOPTS=--junitxml=/tmp/junit.xml bash scripts/test.sh
    .venv/bin/python scripts/test_durations.py /tmp/junit.xml

tests/conftest.py collects the longest files first: pytest-xdist's `--dist loadfile` hands files to
workers in collection order, so a long file collected last leaves the other workers idle.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path


def per_file(junit_xml: str) -> dict[str, float]:
    seconds: dict[str, float] = defaultdict(float)
    for case in ElementTree.parse(junit_xml).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")  # tests.test_x or tests.test_x.TestClass
        if len(parts) >= 2 and parts[0] == "tests":
            seconds[f"tests/{parts[1]}.py"] += float(case.get("time") or 0.0)
    return dict(sorted(((f, round(s, 1)) for f, s in seconds.items()), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    table = per_file(sys.argv[1])
    out = Path(__file__).resolve().parents[1] / "tests" / "durations.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"{out}: {len(table)} files, {sum(table.values()):.0f} s in all; longest: "
          + ", ".join(f"{f} {s:.0f} s" for f, s in list(table.items())[:5]))

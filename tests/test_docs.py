"""The documentation that is generated stays in sync with the code."""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_cli_reference_is_current():
    sys.path.insert(0, os.path.join(HERE, "..", "docs"))
    try:
        import gen_cli
    finally:
        sys.path.pop(0)
    with open(os.path.join(HERE, "..", "docs", "cli.md")) as f:
        assert f.read() == gen_cli.render(), "docs/cli.md is stale: run `python docs/gen_cli.py`"

"""`effattn methods` prints every registered method (table and JSON)."""

import json
import subprocess
import sys

import effattn


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "effattn", *args], capture_output=True, text=True, timeout=120)


def test_methods_table_lists_every_method():
    r = run_cli("methods")
    assert r.returncode == 0, r.stderr
    for m in effattn.methods():
        assert m["name"] in r.stdout


def test_methods_json_roundtrips():
    r = run_cli("methods", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [m["name"] for m in rows] == [m["name"] for m in effattn.methods()]

"""kimik2_sizes.py, the size table of kimik2.py's configs: its JSON report of Kimi-K2, and the
companion copied with kimik2.py alone into an empty folder, where `python kimik2.py` prints the
table through it.

    python -m pytest tests/test_kimik2_sizes.py
"""
import json

import kimik2_sizes
from conftest import run_alone


def test_cli_json_reports_kimi_k2(capsys):
    kimik2_sizes.main(["--preset", "kimi-k2", "--json"])
    report = json.loads(capsys.readouterr().out)["kimi-k2"]
    assert report["total"] == 1_026_408_232_448 and report["sparsity"] == 48
    assert report["kv_cache_bytes_per_token_bf16"] == {"absorbed": 61 * 576 * 2, "full": 61 * 64 * 320 * 2}
    assert 0.75 <= report["heads_128_cost"]["end_of_context"] <= 0.90


def test_sizes_with_kimik2_alone_print_the_table(tmp_path):
    """kimik2_sizes.py with kimik2.py alone: `python kimik2.py` prints Kimi-K2 against DeepSeek-V3
    (1.03T and 671.03B total) and the cost of 128 heads."""
    script = """
import contextlib, io, runpy, sys
out = io.StringIO()
sys.argv = ["kimik2.py"]
with contextlib.redirect_stdout(out):
    runpy.run_path("kimik2.py", run_name="__main__")
table = out.getvalue()
assert table.split("\\n")[0].split() == ["kimi-k2", "deepseek-v3"], table
assert "1.03T" in table and "671.03B" in table and "128 instead of 64 heads" in table, table
import kimik2, kimik2_sizes
"""
    assert run_alone(tmp_path, ["kimik2.py", "kimik2_sizes.py"], script).endswith("ok\n")

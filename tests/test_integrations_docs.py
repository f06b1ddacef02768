"""The examples of docs/integrations.md run as they stand (the torchrun one under torchrun)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "integrations.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
TORCHRUN = shutil.which("torchrun", path=os.path.dirname(sys.executable))


def _needs(code: str) -> list[str]:
    return [m for m in ("transformers", "lightning") if f"from {m}" in code or f"import {m}" in code]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_example_runs(index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    code = BLOCKS[index]
    for module in _needs(code):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    monkeypatch.chdir(tmp_path)
    if code.startswith("# find.py"):
        if TORCHRUN is None:
            pytest.skip("torchrun is not installed next to this Python")
        (tmp_path / "find.py").write_text(code)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run([TORCHRUN, "--standalone", "--nproc_per_node", "2", "find.py"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stderr[:3000]
        rows = sorted(re.findall(r"rank (\d): batch (\d+) agreed by (\d) ranks", proc.stdout))
        assert [r[0] for r in rows] == ["0", "1"] and rows[0][1:] == rows[1][1:], proc.stdout
        print(proc.stdout)
        return
    exec(compile(code, f"{DOC.name}[{index}]", "exec"), {"__name__": f"doc_example_{index}"})
    out = capsys.readouterr().out
    with capsys.disabled():
        print(out)
    assert out.strip(), "the example printed nothing"

"""The README's code is part of the contract: its Python examples must run."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.janus
def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    printed = capsys.readouterr().out
    assert "3 0.796 medium" in printed
    assert "(32, 32) torch.Size([2, 16])" in printed


def test_quickstart_block_has_install_and_test_commands():
    text = README.read_text()
    block = text.split("<!-- quickstart:start -->")[1].split("<!-- quickstart:end -->")[0]
    lines = [line for line in block.splitlines() if line and not line.startswith(("```", "<!--"))]
    assert len(lines) == 2
    assert "pip install" in lines[0] and "pytest" in lines[1]

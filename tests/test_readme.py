"""The README's example is part of the contract: it must run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md has no python example"
    namespace = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert int(namespace["mask"].sum()) == 8 * 10
    assert namespace["sample"].sum(-1).eq(10).all()
    assert namespace["x"].grad.abs().sum() > 0  # the example's loss reaches the scores

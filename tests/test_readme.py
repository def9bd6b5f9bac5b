"""The README's Python blocks run as written (the walkthrough a researcher pastes)."""
import pathlib
import re

README = pathlib.Path(__file__).parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = capsys.readouterr().out
    assert "density 1.000" in out and "output/kernel" in out
    assert namespace["result"].density.shape == (3, 3)
    assert namespace["lottery"].density.shape == (3, 2)  # the experiments block: 3 levels, 2 seeds
    assert namespace["level"] == 2 and "magnitude" in out and "snip" in out
    assert "layers/0/weight" in out  # the Equinox block's report

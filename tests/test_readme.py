"""The README's Python example, verbatim but for the folder, on a tiny pipeline of every family."""
import re
from pathlib import Path

import pytest

from treeq.models.families import family_names, init_pipeline_folder

README = Path(__file__).resolve().parents[1] / "README.md"


def python_example():
    """The README's first Python block after "From Python" (the quick API example)."""
    return re.search(r"From Python.*?```python\n(.*?)```", README.read_text(), re.S).group(1)


@pytest.mark.parametrize("family", family_names())
def test_the_readme_python_example_runs_on_every_text_family(family, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    init_pipeline_folder(family, tmp_path / "flux-tiny")
    namespace = {}
    exec(compile(python_example(), str(README), "exec"), namespace)
    from treeq.quant.linear import QuantLinear

    assert namespace["bits"] and any(isinstance(m, QuantLinear) for m in namespace["pipe"].transformer.modules())
    image = namespace["image"]
    if family == "wan":  # a video: (frames, height, width, 3)
        assert image.ndim == 4 and image.shape[1:] == (32, 32, 3) and len(image) > 1
    else:
        assert image.size == (32, 32)

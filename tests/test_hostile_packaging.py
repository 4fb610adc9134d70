"""Class 8, packaging: the declared requirements are the ones the code needs."""

import os
import re
import tomllib

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def _project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _minimum(spec: str) -> tuple:
    m = re.search(r">=\s*([0-9][0-9.]*)", spec)
    assert m, spec
    return tuple(int(x) for x in m.group(1).split("."))


def test_python_floor_is_what_zarr_3_needs():
    assert _minimum(_project()["requires-python"]) >= (3, 11)


def test_torch_floor_has_the_unsigned_dtypes():
    deps = {re.split(r"[<>=!~ \[]", d, maxsplit=1)[0]: d for d in _project()["dependencies"]}
    assert _minimum(deps["torch"]) >= (2, 3)  # torch.uint16/32/64 (U16/U32/U64) appeared in 2.3
    assert _minimum(deps["zarr"]) >= (3,)
    assert torch.uint16 and torch.uint32 and torch.uint64


def test_readme_states_the_same_python_floor():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    floors = re.findall(r"Python ≥ (3\.\d+)", text)
    assert floors and all(tuple(map(int, v.split("."))) >= (3, 11) for v in floors)

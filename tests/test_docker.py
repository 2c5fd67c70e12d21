"""The cluster image installs what pyproject.toml pins (the Docker engine does not run on CI machines)."""
from __future__ import annotations

import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        project = tomllib.load(file)["project"]
    found = {}
    for requirement in project["dependencies"]:
        name, _, version = requirement.partition("==")
        if version:
            found[name.lower()] = version
    return found


def dockerfile() -> str:
    with open(os.path.join(ROOT, "docker", "Dockerfile")) as file:
        return file.read()


def test_base_image_holds_the_pinned_torch():
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile(), re.M).group(1)
    image, tag = base.split(":")
    assert image == "pytorch/pytorch" and "cuda" in tag
    assert tag.split("-")[0] == pins()["torch"]


def test_the_project_is_installed_from_pyproject_with_every_package_it_names():
    text = dockerfile()
    assert "COPY pyproject.toml" in text and re.search(r"pip install (\S+ )*\.(\s|$)", text)
    assert "==" not in text  # versions come from pyproject.toml's pins alone
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        packages = tomllib.load(file)["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in packages:
        assert f"COPY {package.rstrip('*')} " in text, f"docker/Dockerfile: pip install . needs COPY {package.rstrip('*')}"


def test_image_runs_as_a_user_with_an_entrypoint_that_exists():
    text = dockerfile()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"', text, re.M).group(1)
    local = os.path.join(ROOT, os.path.relpath(entry, "/opt/musicpt"))
    assert os.access(local, os.X_OK)
    for folder in ("data", "teachers", "pretrain", "configs", "launch"):
        assert f"COPY {folder} " in text

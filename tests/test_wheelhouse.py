"""launch/wheelhouse.py: which packages go into an offline wheelhouse, for which platform (the download needs a
package index, so it is not run here; README "Clusters and containers" says how it is used)."""
from __future__ import annotations

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("wheelhouse", os.path.join(ROOT, "launch", "wheelhouse.py"))
wheelhouse = importlib.util.module_from_spec(spec)
spec.loader.exec_module(wheelhouse)


def item(name: str, *requires: str) -> dict:
    return {"metadata": {"name": name, "version": "1.0", "requires_dist": list(requires)}}


REPORT = {"install": [
    item("musicpt", "torch==2.11", "Deep_Speed", "pytest; extra == 'test'", "colorama; sys_platform == 'win32'",
         "tomli; python_version < '3.11'"),
    item("torch", "sympy", "nvidia-nccl; platform_system == 'Linux'"), item("sympy", "mpmath"), item("mpmath"),
    item("nvidia-nccl"), item("deep-speed", "pydantic[email]", "sympy"), item("pydantic", "email-validator; extra == 'email'"),
    item("email-validator"), item("pytest"), item("colorama"), item("tomli")]}


def names(items: list[dict]) -> list[str]:
    return [entry["metadata"]["name"] for entry in items]


def test_it_takes_what_the_target_needs_and_leaves_out_what_it_has():
    everything = names(wheelhouse.needed(REPORT, ["musicpt"], ["test"], set(), "3.12"))
    assert everything == ["deep-speed", "email-validator", "mpmath", "musicpt", "nvidia-nccl", "pydantic", "pytest",
                          "sympy", "torch"]  # not colorama (Windows) nor tomli (Python < 3.11)
    assert "tomli" in names(wheelhouse.needed(REPORT, ["musicpt"], [], set(), "3.10"))
    beside_torch = names(wheelhouse.needed(REPORT, ["musicpt"], [], {"torch"}, "3.12"))
    assert beside_torch == ["deep-speed", "email-validator", "mpmath", "musicpt", "pydantic", "sympy"]  # sympy: deep-speed's too
    with_a_builder = names(wheelhouse.needed(REPORT, ["musicpt", "colorama"], [], {"torch"}, "3.12"))
    assert with_a_builder == sorted(beside_torch + ["colorama"])  # a second root (the build requirements)


def test_the_platform_tags_cover_every_older_glibc():
    args = wheelhouse.parse_args(["out", "--python", "3.12", "--platform", "manylinux_2_28_x86_64"])
    options = wheelhouse.target_options(args)
    platforms = [options[i + 1] for i, option in enumerate(options) if option == "--platform"]
    assert platforms[0] == "manylinux_2_28_x86_64" and "manylinux_2_18_x86_64" in platforms  # e.g. NCCL's wheels
    assert {"manylinux_2_5_x86_64", "manylinux1_x86_64", "manylinux2014_x86_64", "any"} <= set(platforms)
    assert "manylinux_2_29_x86_64" not in platforms
    assert options[options.index("--python-version") + 1] == "3.12"


def test_the_build_requirements_come_from_pyproject():
    assert wheelhouse.build_requirements() and any(r.startswith("setuptools") for r in wheelhouse.build_requirements())

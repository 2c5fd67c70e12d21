"""Every wheel the project needs, in one folder, for installing where there is no network (compute nodes, GPU
machines behind a firewall). Run it where a package index is reachable; it needs only Python 3.10+ and pip.

    python3 launch/wheelhouse.py DIR [--python 3.12] [--platform manylinux_2_28_x86_64] [--extras test]
                                     [--without torch,torchaudio]

then, on the machine without network, from the project's root:

    python3 -m pip install --no-index --find-links DIR -e '.[test]'     # a fresh environment
    python3 -m pip install --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=$PWD:/tmp/site
                                                                         # beside a torch already installed there

DIR gets the project's own wheel, a wheel of every package it needs on that Python and platform (resolved as pip
resolves them, the pins of pyproject.toml included) and of what building it from the source tree needs (-e .), wheels built here for the few packages published only as
source (pure Python: deepspeed with DS_BUILD_OPS=0, encodec, mir_eval, ...) and `wheelhouse.json` naming them.
`--without` leaves out packages the target machine already has, with whatever only they need: `--without
torch,torchaudio` for a GPU machine whose CUDA build of torch must stay. Re-running it downloads only what is
missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNMATCHED = re.compile(r"No matching distribution found for (\S+)")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


def target_options(args) -> list[str]:
    """pip's options for the target interpreter and platform: manylinux_2_N for every glibc from the target's
    down to 2.5 (a newer glibc runs wheels made for an older one), their legacy aliases, and pure-Python wheels."""
    glibc, arch = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", args.platform).groups()
    aliases = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
    platforms = [f"manylinux_2_{minor}_{arch}" for minor in range(int(glibc), 4, -1)]
    platforms += [f"{aliases[minor]}_{arch}" for minor in aliases if minor <= int(glibc)] + ["any"]
    return ["--python-version", args.python, "--implementation", "cp", "--only-binary=:all:",
            *[option for platform in platforms for option in ("--platform", platform)]]


def own_wheel(out: str) -> str:
    """The project's wheel, built from the working tree (pure Python)."""
    done = pip("wheel", "--no-deps", "-q", "-w", out, ROOT)
    if done.returncode:
        sys.exit(f"building the project's wheel failed:\n{done.stderr[-3000:]}")
    wheels = [os.path.join(out, name) for name in os.listdir(out) if name.startswith("musicpt-") and name.endswith(".whl")]
    return max(wheels, key=os.path.getmtime)  # the one just built


def resolve(root: str, args, report: str) -> dict:
    """pip's resolution of ROOT[extras] and the build requirements for the target (metadata only, nothing
    installed). Packages published only as source are built into DIR as wheels (pure Python) and it is retried."""
    built: list[str] = []
    for _ in range(40):
        with tempfile.TemporaryDirectory() as target:
            done = pip("install", "--dry-run", "--ignore-installed", "-q", "--report", report, "--target", target,
                       "--find-links", args.dir, *target_options(args), f"{root}[{args.extras}]" if args.extras else root,
                       *build_requirements())  # one resolution: one version of each package
        if done.returncode == 0:
            return {"report": json.load(open(report)), "built": built}
        missing = UNMATCHED.search(done.stderr)
        if missing is None or missing.group(1) in built:
            sys.exit(f"resolving the project's dependencies for Python {args.python} on {args.platform} failed:\n"
                     f"{done.stderr[-3000:]}")
        requirement = missing.group(1)
        print(f"building a wheel of {requirement} (published as source only)", flush=True)
        made = pip("wheel", "--no-deps", "-q", "-w", args.dir, requirement, env={"DS_BUILD_OPS": "0"})
        if made.returncode:
            sys.exit(f"{requirement} has no wheel for Python {args.python} on {args.platform} and building one "
                     f"failed:\n{made.stderr[-3000:]}")
        built.append(requirement)
    sys.exit("more than 40 packages without wheels: giving up")


def needed(report: dict, roots: list[str], extras: list[str], without: set[str], python: str,
           machine: str = "x86_64") -> list[dict]:
    """The report's packages reachable from the roots (the first with `extras`) through requirements that apply on
    the target (Linux, that Python, the extras asked for), never entering a package of `without`."""
    from pip._vendor.packaging.requirements import Requirement

    items = {normalise(item["metadata"]["name"]): item for item in report["install"]}
    environment = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
                   "platform_system": "Linux", "os_name": "posix", "platform_machine": machine,
                   "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    reached, queue = set(), [(normalise(roots[0]), tuple(extras))] + [(normalise(root), ()) for root in roots[1:]]
    while queue:
        name, wanted_extras = queue.pop()
        if name in without or name not in items or (name, wanted_extras) in reached:
            continue
        reached.add((name, wanted_extras))
        for text in items[name]["metadata"].get("requires_dist", []):
            requirement = Requirement(text)
            if requirement.marker is None or any(requirement.marker.evaluate({**environment, "extra": extra})
                                                 for extra in ("",) + wanted_extras):
                queue.append((normalise(requirement.name), tuple(sorted(requirement.extras))))
    names = {name for name, _ in reached}
    return [item for name, item in sorted(items.items()) if name in names]


def download(items: list[dict], args) -> None:
    """Each package's wheel for the target into DIR, unless DIR has it (built here, or from an earlier run)."""
    have = {tuple(name.lower().split("-")[:2]) for name in os.listdir(args.dir) if name.endswith(".whl")}
    for item in items:
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if (normalise(name).replace("-", "_"), version) in have:
            continue
        done = pip("download", "--no-deps", "-q", "-d", args.dir, *target_options(args), f"{name}=={version}")
        if done.returncode:
            sys.exit(f"downloading {name}=={version} failed:\n{done.stderr[-2000:]}")
        print(f"  {name}=={version}", flush=True)


def build_requirements() -> list[str]:
    """pyproject.toml's [build-system] requires: what installing the project from its source tree needs (-e .)."""
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    listed = re.search(r"\[build-system\][^\[]*?requires\s*=\s*\[([^\]]*)\]", text, re.S)
    return re.findall(r'"([^"]+)"', listed.group(1)) if listed else []


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", help="the folder to fill (made if missing)")
    parser.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                        help="the target's Python, MAJOR.MINOR (default: this one's)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64",
                        help="the target's glibc as a manylinux tag (older ones are added); default manylinux_2_28_x86_64")
    parser.add_argument("--extras", default="", help="the project's extras to include, e.g. test or test,bench")
    parser.add_argument("--without", default="", help="packages the target has already, e.g. torch,torchaudio")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"3\.\d+", args.python):
        parser.error(f"--python {args.python}: write MAJOR.MINOR, e.g. 3.12")
    if not re.fullmatch(r"manylinux_2_\d+_\w+", args.platform):
        parser.error(f"--platform {args.platform}: write manylinux_2_GLIBCMINOR_ARCH, e.g. manylinux_2_28_x86_64 "
                     "(ldd --version on the target names its glibc)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    root = own_wheel(args.dir)
    resolved = resolve(root, args, os.path.join(args.dir, "resolution.json"))
    without = {normalise(name) for name in args.without.split(",") if name}
    extras = [extra for extra in args.extras.split(",") if extra]
    from pip._vendor.packaging.requirements import Requirement

    builders = [Requirement(text).name for text in build_requirements()]
    machine = re.fullmatch(r"manylinux_2_\d+_(\w+)", args.platform).group(1)
    items = needed(resolved["report"], ["musicpt", *builders], extras, without, args.python, machine)
    print(f"{len(items)} packages for Python {args.python} on {args.platform}"
          f"{f', without {sorted(without)}' if without else ''}; downloading what {args.dir} lacks", flush=True)
    download(items, args)
    listing = {"python": args.python, "platform": args.platform, "extras": extras, "without": sorted(without),
               "built_from_source": resolved["built"],
               "packages": {item["metadata"]["name"]: item["metadata"]["version"] for item in items}}
    with open(os.path.join(args.dir, "wheelhouse.json"), "w") as file:
        json.dump(listing, file, indent=1)
    os.remove(os.path.join(args.dir, "resolution.json"))
    print(f"{args.dir}: {len(items)} wheels; install with\n  python3 -m pip install --no-index --find-links {args.dir} "
          f"-e '.{f'[{args.extras}]' if extras else ''}'"
          + (f"\nor beside the target's own {', '.join(sorted(without))}:\n  python3 -m pip install --no-index "
             f"--no-deps --target /tmp/site {args.dir}/*.whl && export PYTHONPATH=$PWD:/tmp/site" if without else ""))


if __name__ == "__main__":
    main()

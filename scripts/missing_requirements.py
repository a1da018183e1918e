#!/usr/bin/env python
"""Print the requirements (from pip requirement files) that are not installed, one per line.

Used by ``scripts/bootstrap.sh`` with ``SMCA_D2_SYSTEM_SITE=1``: in an environment the user
already has, only what is missing gets installed, and nothing present is replaced.

* A requirement whose distribution is installed, at any version, is left out; if that version is
  outside the requirement's range, a note goes to stderr (the package is still left alone).
* ``--constraints FILE`` writes ``name==version`` for every installed distribution, for pip's
  ``-c``: whatever pip installs for the missing requirements must then fit the versions present,
  or pip refuses and says which package conflicts.

    python scripts/missing_requirements.py [--constraints FILE] requirements/base.txt ...
"""

import argparse
import importlib.metadata as metadata
import re
import sys

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ImportError:  # pip vendors packaging
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions():
    """{canonical distribution name: version} of everything importable by this interpreter, the
    first one on ``sys.path`` winning (as the import system does)."""
    versions = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            versions.setdefault(_canonical(name), dist.version)
    return versions


def read_requirements(paths):
    """Requirement strings of pip requirement files (comments, blank lines and options dropped)."""
    requirements = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("-"):
                    requirements.append(line)
    return requirements


def missing_requirements(requirements, versions):
    """The requirements whose distribution is not in ``versions``; and notes on the present ones
    whose version is outside the requested range."""
    missing, notes = [], []
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise SystemExit(f"invalid requirement {text!r}: {e}") from None
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = versions.get(_canonical(req.name))
        if version is None:
            missing.append(text)
        elif req.specifier and not req.specifier.contains(version, prereleases=True):
            notes.append(f"{req.name} {version} is installed; smca-d2 asks for {req.specifier} (left as it is)")
    return missing, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="pip requirement files")
    parser.add_argument("--constraints", help="write name==version of every installed distribution here")
    args = parser.parse_args(argv)
    versions = installed_versions()
    missing, notes = missing_requirements(read_requirements(args.files), versions)
    for note in notes:
        print(f"[missing_requirements] note: {note}", file=sys.stderr)
    if args.constraints:
        with open(args.constraints, "w") as f:
            f.writelines(f"{name}=={version}\n" for name, version in sorted(versions.items()))
    print("\n".join(missing))


if __name__ == "__main__":
    main()

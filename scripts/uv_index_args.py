#!/usr/bin/env python
"""Print the uv options (one per line) that make ``uv pip install`` use the package indexes pip
is configured with.

Used by ``scripts/bootstrap.sh``, which installs the base environment with uv when it can: uv
reads no pip configuration, so ``no-index``, the indexes, extra indexes, find-links folders and constraint
files of pip's configuration files and ``PIP_*`` variables (what ``pip config list`` shows) are passed to it,
with pip's precedence: a ``PIP_*`` variable over an ``[install]`` section over ``[global]``.
pip's ``cert`` is printed as ``SSL_CERT_FILE=PATH`` (uv's variable for it), for bootstrap.sh to
export. pip considers every index for every package, so ``--index-strategy unsafe-best-match``
comes too.

    python scripts/uv_index_args.py [--pip-config-list FILE]
"""

import argparse
import re
import subprocess
import sys

# Later sections win, as in pip.
_PRIORITY = {"global": 0, "install": 1, ":env:": 2}
_LINE = re.compile(r"^(?P<section>[^.]+|:env:)\.(?P<key>[a-z-]+)=(?P<value>.*)$")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def pip_settings(config_list: str) -> dict:
    """The value of each key in ``pip config list`` output, taken from its highest-priority section."""
    chosen = {}
    for line in config_list.splitlines():
        match = _LINE.match(line.strip())
        if not match or match["section"] not in _PRIORITY:
            continue
        rank = _PRIORITY[match["section"]]
        key = match["key"]
        if key not in chosen or rank >= chosen[key][0]:
            chosen[key] = (rank, _unquote(match["value"]))
    return {key: value for key, (_, value) in chosen.items()}


def uv_args(settings: dict) -> list:
    args = ["--index-strategy", "unsafe-best-match"]
    if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
        args.append("--no-index")
    if "index-url" in settings:
        args += ["--index-url", settings["index-url"]]
    for key, flag in (
        ("extra-index-url", "--extra-index-url"),
        ("find-links", "--find-links"),
        ("constraint", "--constraint"),
    ):
        for value in settings.get(key, "").split():
            args += [flag, value]
    if "cert" in settings:
        args.append(f"SSL_CERT_FILE={settings['cert']}")
    return args


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pip-config-list", help="read this file instead of running `pip config list`")
    args = parser.parse_args(argv)
    if args.pip_config_list:
        with open(args.pip_config_list) as f:
            config_list = f.read()
    else:
        config_list = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
        ).stdout
    print("\n".join(uv_args(pip_settings(config_list))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

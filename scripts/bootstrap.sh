#!/usr/bin/env bash
# Create or reuse the project's virtual environment at .venv/ (used by `make demo` / `make test`).
#
# Layout:
#   * A *base* environment with the heavy, rarely-changing dependencies (torch, torchvision,
#     detectron2, the requirements/*.txt packages) lives in a per-user cache, keyed by a hash of
#     the pins. Built once per machine, reused by every clone (CI clones included).
#   * .venv/ in the repository is a small venv that sees the base through a .pth file and holds
#     only smca_d2 itself (editable install). Creating it takes seconds.
#
# Environment variables:
#   PYTHON                 interpreter to build with (default: python3)
#   SMCA_D2_CACHE          cache folder (default: ${XDG_CACHE_HOME:-~/.cache}/smca-d2)
#   SMCA_D2_SYSTEM_SITE=1  use the interpreter's own packages instead of the cached base: for users
#                          who already have torch, torchvision and a full detectron2 build (GPU).
#                          Whatever is importable there is used as is; only what is missing is
#                          installed into .venv/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CACHE="${SMCA_D2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smca-d2}"
VENV="$ROOT/.venv"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PIP_QUIET=(--quiet --disable-pip-version-check)

log() { echo "[bootstrap] $*" >&2; }

pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
key="$(cat requirements/base.txt requirements/test.txt requirements/constraints.txt \
        scripts/bootstrap.sh <(echo "$pyver $TORCH_PINS $D2_SHA256") | sha256sum | cut -c1-16)"
if [[ "${SMCA_D2_SYSTEM_SITE:-0}" == "1" ]]; then key="system-$key"; fi
stamp="$VENV/.smca-d2-stamp"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]] \
    && "$VENV/bin/python" -c "import smca_d2, detectron2" 2>/dev/null; then
  log ".venv is up to date ($key)"
  exit 0
fi

# Install pure-Python detectron2 v0.6 from the registry sdist (it lacks the C++ sources, so its
# own setup.py cannot build). Verified by sha256; the extension is not built.
install_detectron2_sdist() {
  local py="$1" tmp
  tmp="$(mktemp -d)"
  log "installing detectron2 (pure Python) from $D2_SDIST"
  "$py" -m pip download "${PIP_QUIET[@]}" --no-deps --no-build-isolation -d "$tmp" "$D2_SDIST" \
    2> >(grep -v "is ignored" >&2)
  local archive
  archive="$(ls "$tmp"/*.tar.gz)"
  echo "$D2_SHA256  $archive" | sha256sum --check --status \
    || { log "sha256 mismatch for $archive"; exit 1; }
  tar -xzf "$archive" -C "$tmp"
  local src
  src="$(find "$tmp" -maxdepth 1 -mindepth 1 -type d | head -n 1)"
  cat > "$src/setup_pure.py" <<'PYEOF'
from setuptools import find_packages, setup

# detectron2's Python package only; model_zoo configs are shipped as package data.
setup(
    name="detectron2",
    version="0.6",
    packages=find_packages(include=["detectron2", "detectron2.*"]),
    package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},
    include_package_data=False,
)
PYEOF
  (cd "$src" && rm -f setup.py setup.cfg pyproject.toml && mv setup_pure.py setup.py)
  "$py" -m pip install "${PIP_QUIET[@]}" --no-deps --no-build-isolation "$src" \
    2> >(grep -v "is ignored" >&2)
  rm -rf "$tmp"
}

install_requirements() {
  local py="$1"
  "$py" -m pip install "${PIP_QUIET[@]}" -c requirements/constraints.txt \
    -r requirements/base.txt -r requirements/test.txt 2> >(grep -v "is ignored" >&2)
}

build_base() {
  local base="$1"
  log "building the base environment in $base (torch, torchvision, detectron2; once per machine)"
  rm -rf "$base"
  "$PYTHON" -m venv "$base"
  "$base/bin/python" -m pip install "${PIP_QUIET[@]}" -c requirements/constraints.txt \
    $TORCH_PINS 2> >(grep -v "is ignored" >&2)
  install_requirements "$base/bin/python"
  install_detectron2_sdist "$base/bin/python"
  "$base/bin/python" -c "import torch, torchvision, detectron2, pycocotools, scipy"
  touch "$base/.complete"
}

rm -rf "$VENV"
if [[ "${SMCA_D2_SYSTEM_SITE:-0}" == "1" ]]; then
  log "creating .venv on top of $PYTHON's own packages"
  "$PYTHON" -m venv --system-site-packages "$VENV"
  py="$VENV/bin/python"
  "$py" -c "import torch, torchvision" 2>/dev/null \
    || "$py" -m pip install "${PIP_QUIET[@]}" $TORCH_PINS 2> >(grep -v "is ignored" >&2)
  install_requirements "$py"
  if "$py" -c "import detectron2" 2>/dev/null; then
    log "using the detectron2 already installed: $("$py" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
  else
    install_detectron2_sdist "$py"
  fi
else
  mkdir -p "$CACHE"
  base="$CACHE/base-$key"
  (
    flock 9
    if [[ ! -f "$base/.complete" ]]; then build_base "$base"; else log "reusing $base"; fi
  ) 9>"$CACHE/.lock"
  "$PYTHON" -m venv --without-pip "$VENV"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  base_site="$("$base/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$base_site')" > "$site/00-smca-d2-base.pth"
  py="$VENV/bin/python"
fi

"$py" -m pip install "${PIP_QUIET[@]}" --no-deps --no-build-isolation -e "$ROOT" \
  2> >(grep -v "is ignored" >&2)
"$py" -c "import smca_d2, detectron2; print('[bootstrap] smca_d2 + detectron2', detectron2.__version__, 'ready')"
echo "$key" > "$stamp"

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
#   DETECTRON2_SRC=PATH    a detectron2 source checkout (e.g. `main`): built with its C++ extension
#                          (a CPU build where torch sees no GPU) instead of the pure-Python v0.6
#                          sdist. The checkout is copied first and left untouched; its contents are
#                          part of the cache key, so an updated checkout gets a new base.
#   SMCA_D2_INSTALLER=pip  build the base with pip only. By default torch, torchvision and the
#                          requirements go in with uv (https://docs.astral.sh/uv/; the one on PATH,
#                          or a pinned one installed with pip into the cache), from the indexes,
#                          find-links and constraints pip is configured with
#                          (scripts/uv_index_args.py): the same pinned packages, unpacked several
#                          times faster. pip takes over if uv cannot be had or fails.
#   SMCA_D2_SYSTEM_SITE=1  use the interpreter's own packages instead of the cached base: for users
#                          who already have torch, torchvision and a full detectron2 build (GPU).
#                          Whatever is installed there is used as is, at its version; only what is
#                          missing is installed into .venv/, constrained to the versions present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
CACHE="${SMCA_D2_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/smca-d2}"
VENV="$ROOT/.venv"
TORCH_PINS="torch==2.14.1 torchvision==0.29.1"
D2_SDIST="pb1-detectron2==0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# uv at the version requirements/constraints.txt pins (it is in requirements/test.txt too).
UV_PIN="$(grep -i -m1 '^uv==' requirements/constraints.txt || echo uv)"
PIP_QUIET=(--quiet --disable-pip-version-check)

log() { echo "[bootstrap] $*" >&2; }

pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
D2_SRC="${DETECTRON2_SRC:-}"
d2_key="$D2_SHA256"
if [[ -n "$D2_SRC" ]]; then
  [[ -f "$D2_SRC/setup.py" && -d "$D2_SRC/detectron2" ]] \
    || { log "DETECTRON2_SRC=$D2_SRC is not a detectron2 source checkout (no setup.py + detectron2/)"; exit 1; }
  D2_SRC="$(cd "$D2_SRC" && pwd)"
  # The sources that go into the build (not build outputs): a changed checkout gets a new base.
  d2_key="$(cd "$D2_SRC" && find detectron2 setup.py -type f \( -name '*.py' -o -name '*.cpp' \
      -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.yaml' \) | LC_ALL=C sort \
      | xargs sha256sum | sha256sum | cut -c1-16)"
fi
# requirements/constraints.txt pins versions for Python >= 3.11 (several have no 3.10 wheels):
# older interpreters get the ranges of requirements/*.txt, resolved by pip.
PINS=(-c requirements/constraints.txt)
if "$PYTHON" -c 'import sys; sys.exit(sys.version_info >= (3, 11))'; then
  log "Python $pyver: requirements/constraints.txt is for Python >= 3.11; installing with the ranges of requirements/*.txt"
  PINS=()
fi
# The base is keyed by what goes into it; BASE_LAYOUT is raised when build_base changes.
BASE_LAYOUT=3
key="$(cat requirements/base.txt requirements/test.txt requirements/export.txt requirements/constraints.txt \
        <(echo "$BASE_LAYOUT $pyver $TORCH_PINS $d2_key") | sha256sum | cut -c1-16)"
if [[ -n "$D2_SRC" ]]; then key="d2src-$key"; fi
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

# Build detectron2 from a source checkout, with its C++ extension. A copy is built, so that the
# checkout gets no build/ folder or compiled files.
install_detectron2_source() {
  local py="$1" src="$2" tmp
  tmp="$(mktemp -d)"
  log "building detectron2 from $src (with its C++ extension; a few minutes)"
  (cd "$src" && tar --exclude=./.git --exclude=./build --exclude='*.so' -cf - .) | tar -xf - -C "$tmp"
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$py" -m pip install "${PIP_QUIET[@]}" --no-deps \
    --no-build-isolation "$tmp" 2> >(grep -v "is ignored" >&2)
  rm -rf "$tmp"
  "$py" -c "from detectron2 import _C" \
    || { log "detectron2 from $src was installed without a working C++ extension"; exit 1; }
}

install_detectron2() {
  if [[ -n "$D2_SRC" ]]; then install_detectron2_source "$1" "$D2_SRC"; else install_detectron2_sdist "$1"; fi
}

install_requirements() {
  local py="$1"
  "$py" -m pip install "${PIP_QUIET[@]}" "${PINS[@]}" \
    -r requirements/base.txt -r requirements/test.txt -r requirements/export.txt 2> >(grep -v "is ignored" >&2)
}

# Into a .venv that sees the user's packages: install only the requirements that are not there,
# with every package already present pinned at its version (nothing present is replaced).
install_missing_requirements() {
  local py="$1" missing pins
  pins="$(mktemp)"
  missing="$("$py" scripts/missing_requirements.py --constraints "$pins" \
      requirements/base.txt requirements/test.txt requirements/export.txt)"
  if [[ -n "$missing" ]]; then
    log "installing what is missing: $(echo $missing)"
    # shellcheck disable=SC2086
    "$py" -m pip install "${PIP_QUIET[@]}" -c "$pins" $missing 2> >(grep -v "is ignored" >&2)
  else
    log "every requirement is already installed"
  fi
  rm -f "$pins"
}

# The uv to build the base with: the one on PATH, else UV_PIN installed with pip into the cache;
# nothing (status 1) when neither works.
find_uv() {
  if command -v uv >/dev/null 2>&1; then command -v uv; return 0; fi
  local tool="$CACHE/tools/${UV_PIN/==/-}"
  if [[ ! -x "$tool/bin/uv" ]]; then
    rm -rf "$tool"
    "$PYTHON" -m pip install "${PIP_QUIET[@]}" --target "$tool" "$UV_PIN" >/dev/null 2>&1 || return 1
  fi
  "$tool/bin/uv" --version >/dev/null 2>&1 || return 1
  echo "$tool/bin/uv"
}

# uv pip install into the environment of python $2, with pip's indexes: uv_install UV PY ARGS...
uv_install() {
  local uv="$1" py="$2" arg
  shift 2
  local opts=()
  while IFS= read -r arg; do
    if [[ "$arg" == SSL_CERT_FILE=* ]]; then
      [[ -n "${SSL_CERT_FILE:-}" ]] || export SSL_CERT_FILE="${arg#SSL_CERT_FILE=}"
    elif [[ -n "$arg" ]]; then
      opts+=("$arg")
    fi
  done < <("$PYTHON" scripts/uv_index_args.py)
  # --compile-bytecode: the .pyc files pip writes at install time, so that no process compiles
  # torch's modules again at import (with PYTHONDONTWRITEBYTECODE set, every process would).
  "$uv" pip install --quiet --compile-bytecode --python "$py" "${opts[@]}" "$@"
}

# torch, torchvision and the requirements into the base environment at $1 with uv; status 1 (and
# nothing installed) with SMCA_D2_INSTALLER=pip, status 1 after saying why if uv cannot be had or
# fails.
install_base_packages_with_uv() {
  local base="$1" uv
  [[ "${SMCA_D2_INSTALLER:-uv}" != "pip" ]] || return 1
  if ! uv="$(find_uv)"; then
    log "no working uv: installing with pip (2 to 4 minutes on a fresh machine)"
    return 1
  fi
  log "1/2 installing $TORCH_PINS and requirements/{base,test,export}.txt with $("$uv" --version)"
  log "  (the registry's builds, which run on the CPU too: 4 GB to unpack, about a minute)"
  uv_install "$uv" "$base/bin/python" "${PINS[@]}" $TORCH_PINS \
    -r requirements/base.txt -r requirements/test.txt -r requirements/export.txt && return 0
  log "uv failed: installing with pip (2 to 4 minutes on a fresh machine)"
  return 1
}

build_base() {
  local base="$1" start=$SECONDS
  log "building the base environment in $base (torch, torchvision, detectron2; once per machine,"
  log "  later runs reuse it)"
  rm -rf "$base"
  "$PYTHON" -m venv "$base"
  if install_base_packages_with_uv "$base"; then
    log "2/2 installing detectron2 ($((SECONDS - start)) s so far)"
  else
    log "1/3 installing $TORCH_PINS with pip (the registry's builds, which run on the CPU too)"
    "$base/bin/python" -m pip install "${PIP_QUIET[@]}" "${PINS[@]}" \
      $TORCH_PINS 2> >(grep -v "is ignored" >&2)
    log "2/3 installing requirements/{base,test,export}.txt ($((SECONDS - start)) s so far)"
    install_requirements "$base/bin/python"
    log "3/3 installing detectron2 ($((SECONDS - start)) s so far)"
  fi
  install_detectron2 "$base/bin/python"
  "$base/bin/python" -c "import torch, torchvision, detectron2, pycocotools, scipy"
  touch "$base/.complete"
  log "base environment ready in $((SECONDS - start)) s"
}

rm -rf "$VENV"
if [[ "${SMCA_D2_SYSTEM_SITE:-0}" == "1" ]]; then
  log "creating .venv on top of $PYTHON's own packages"
  # `venv --system-site-packages` would see the base interpreter's packages, not those of the
  # environment $PYTHON runs in (a venv or conda env): add that environment's site folders.
  "$PYTHON" -m venv --without-pip "$VENV"
  site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$PYTHON" -c 'import site, sys
dirs = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
print("import site; " + "; ".join("site.addsitedir(%r)" % d for d in dirs))' > "$site/00-smca-d2-system.pth"
  py="$VENV/bin/python"
  "$py" -m pip --version >/dev/null 2>&1 || { log "$PYTHON has no pip"; exit 1; }
  "$py" -c "import torch, torchvision" 2>/dev/null \
    || "$py" -m pip install "${PIP_QUIET[@]}" $TORCH_PINS 2> >(grep -v "is ignored" >&2)
  install_missing_requirements "$py"
  if [[ -n "$D2_SRC" ]]; then
    install_detectron2_source "$py" "$D2_SRC"
  elif "$py" -c "import detectron2" 2>/dev/null; then
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

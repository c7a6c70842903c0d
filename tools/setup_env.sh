#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (default: ./.venv).
#
#   tools/setup_env.sh            create/refresh .venv, install torch, detectron2, the project
#   BUILD_MSDA=1 tools/setup_env.sh   also compile third_party/MSDeformAttn (needs nvcc + CUDA torch)
#
# Environment knobs: VENV (path), PYTHON (interpreter used to create the venv),
# TORCH_SPEC / TORCHVISION_SPEC (pip requirement strings for the torch pair).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
TORCHVISION_SPEC="${TORCHVISION_SPEC:-torchvision==0.29.1}"
D2_SDIST_NAME="pb1-detectron2"
D2_SDIST_VERSION="0.6"
D2_SDIST_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
STAMP="$VENV/.mask2former_sim_setup"

say() { printf '[setup] %s\n' "$*"; }

# Fast path: nothing changed since the last successful set-up.
fingerprint() {
  cat pyproject.toml tools/setup_env.sh 2>/dev/null | sha256sum | cut -d' ' -f1
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(fingerprint)" ] && [ "${BUILD_MSDA:-0}" != "1" ]; then
  say "environment $VENV is up to date"
  exit 0
fi

t0=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating virtual environment $VENV with $($PYTHON --version 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
# pip, minus the machine-local index's "Location ... is ignored" noise (exit status kept)
pip_install() {
  "$PY" -m pip --disable-pip-version-check install "$@" 2>&1 \
    | { grep -v -E "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}
pip_install -q --upgrade "pip>=23" "setuptools>=64,<81" wheel

# 1. torch + torchvision: keep a working pair, otherwise install the pinned one.
if "$PY" -c "import torch, torchvision; torchvision.ops.nms" >/dev/null 2>&1; then
  say "torch/torchvision already importable: $("$PY" -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__)')"
else
  say "installing $TORCH_SPEC $TORCHVISION_SPEC"
  pip_install -q "$TORCH_SPEC" "$TORCHVISION_SPEC"
fi

# 2. detectron2: keep the user's, otherwise build the PyPI sdist of v0.6 without C++ ops.
if "$PY" -c "import detectron2" >/dev/null 2>&1; then
  say "detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
else
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
  say "detectron2 not importable: building $D2_SDIST_NAME==$D2_SDIST_VERSION from its sdist"
  url="$("$PY" - "$D2_SDIST_NAME" "$D2_SDIST_VERSION" <<'PYEOF'
import re, sys, urllib.request
name, version = sys.argv[1], sys.argv[2]
page = urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=60).read().decode()
for href in re.findall(r'href="([^"]+)"', page):
    if href.split("#")[0].endswith(f"{name}-{version}.tar.gz"):
        print(href.split("#")[0])
        break
else:
    sys.exit(f"no sdist {name}-{version}.tar.gz on the PyPI simple index")
PYEOF
)"
  "$PY" - "$url" "$work/d2.tar.gz" <<'PYEOF'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PYEOF
  got="$(sha256sum "$work/d2.tar.gz" | cut -d' ' -f1)"
  if [ "$got" != "$D2_SDIST_SHA256" ]; then
    say "sha256 mismatch for $url: expected $D2_SDIST_SHA256, got $got" >&2
    exit 1
  fi
  say "sha256 verified ($got)"
  tar -xzf "$work/d2.tar.gz" -C "$work"
  src="$(find "$work" -maxdepth 1 -type d -name "${D2_SDIST_NAME}-*" | head -n1)"
  mkdir -p "$src/detectron2/layers/csrc"
  # The sdist ships setup.py's C++ extension list but not its sources: give it one empty
  # translation unit so the build succeeds; the ops that need C++ are not used here.
  cat > "$src/detectron2/layers/csrc/vision.cpp" <<'CPPEOF'
#include <torch/extension.h>
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
CPPEOF
  say "pip install --no-build-isolation $src (about a minute)"
  FORCE_CUDA=0 pip_install -q --no-build-isolation "$src"
fi

# 3. The project, editable, with its Python dependencies.
say "installing mask2former_sim (editable) and its dependencies"
pip_install -q --no-build-isolation -e ".[test]"

# 4. Optional: the CUDA op.
if [ "${BUILD_MSDA:-0}" = "1" ]; then
  PYTHON="$PY" "$ROOT/tools/build_msda.sh"
fi

"$PY" -c "import mask2former_sim, detectron2, torch; print('[setup] ok: torch', torch.__version__, '| detectron2', detectron2.__version__, '| mask2former_sim', mask2former_sim.__version__)"
fingerprint > "$STAMP"
say "done in $(( $(date +%s) - t0 )) s"

#!/usr/bin/env bash
# Idempotent set-up of the project's virtual environment (default: ./.venv).
#
#   tools/setup_env.sh            create/refresh .venv, install torch, detectron2, the project
#   BUILD_MSDA=1 tools/setup_env.sh   also compile third_party/MSDeformAttn (needs nvcc + CUDA torch)
#
# A user's detectron2 is kept. Without one, detectron2 v0.6 is built from its PyPI sdist with a
# stub C++ extension (environment-report functions only, no ops); a .venv made by an older
# set-up, whose stub is empty (train_net.py then fails in collect_env_info), is rebuilt.
#
# Environment knobs: VENV (path), PYTHON (interpreter used to create the venv),
# TORCH_SPEC / TORCHVISION_SPEC (pip requirement strings for the torch pair).
set -euo pipefail

case "${1:-}" in
  -h|--help)
    # the header comment above is the usage
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
    exit 0 ;;
  "") ;;
  *)
    printf 'tools/setup_env.sh: unknown argument %s (no arguments; --help for the environment knobs)\n' "$1" >&2
    exit 2 ;;
esac

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
#    The sdist's C++ sources are replaced by a stub (vision.cpp below) that exports only what
#    detectron2's environment report calls (collect_env_info: get_compiler_version,
#    get_cuda_version, has_cuda). A .venv built by an older set-up has an EMPTY stub, on which
#    train_net.py's default_setup crashes: that one is rebuilt; a full source build is kept.
d2_state="$("$PY" - <<'PYEOF'
import importlib.metadata
try:
    import detectron2  # noqa: F401
except Exception:
    print("missing")
    raise SystemExit
try:
    import detectron2._C as c
except ImportError:
    print("keep")  # no extension at all: collect_env_info reports that itself
    raise SystemExit
if all(hasattr(c, f) for f in ("get_compiler_version", "get_cuda_version")):
    print("keep")
else:
    try:
        importlib.metadata.version("pb1-detectron2")
        print("old-stub")  # ours, from an older set-up: rebuild it
    except importlib.metadata.PackageNotFoundError:
        print("foreign-incomplete")
PYEOF
)"
d2_pip_extra=()
case "$d2_state" in
  keep)
    say "detectron2 already importable: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')" ;;
  foreign-incomplete)
    say "WARNING: detectron2 at $("$PY" -c 'import detectron2; print(detectron2.__file__)') has a C++ extension" \
        "without get_compiler_version/get_cuda_version: detectron2's environment report (train_net.py's" \
        "default_setup) will fail; rebuild that detectron2 from source, or uninstall it and rerun this script" >&2 ;;
  old-stub)
    say "detectron2._C is the empty stub of an older set-up (no get_compiler_version): rebuilding detectron2"
    d2_pip_extra=(--force-reinstall --no-deps) ;;
  missing)
    say "detectron2 not importable: building $D2_SDIST_NAME==$D2_SDIST_VERSION from its sdist" ;;
  *)
    say "could not inspect detectron2 with $PY (got '$d2_state')" >&2
    exit 1 ;;
esac
if [ "$d2_state" = "missing" ] || [ "$d2_state" = "old-stub" ]; then
  work="$(mktemp -d)"
  trap 'rm -rf "$work"' EXIT
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
  # The sdist ships setup.py's C++ extension list but not its sources. This one translation
  # unit makes the build succeed and answers the environment report honestly; the C++/CUDA
  # ops themselves are not used by this project, and asking for one names what is missing.
  cat > "$src/detectron2/layers/csrc/vision.cpp" <<'CPPEOF'
#include <torch/extension.h>
#include <string>

namespace {

// The compiler that built this stub, from its predefined macros.
std::string stub_compiler_version() {
#if defined(__clang__)
  return "clang " + std::to_string(__clang_major__) + "." + std::to_string(__clang_minor__) + "." +
         std::to_string(__clang_patchlevel__);
#elif defined(__GNUC__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_FULL_VER);
#else
  return "unknown C++ compiler";
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "detectron2 C++ extension stub built by mask2former-sim's tools/setup_env.sh: environment "
      "report functions only, no C++/CUDA ops.";
  m.def("get_compiler_version", &stub_compiler_version,
        "compiler that built this extension (a stub without C++/CUDA ops)");
  m.def("get_cuda_version", []() { return std::string("not built with CUDA ops"); },
        "CUDA version the ops were built with: none, this stub has no ops");
  m.def("has_cuda", []() { return false; }, "whether CUDA ops were built: never in this stub");
  // PEP 562 module __getattr__: any other name (an op) fails with a message saying why.
  m.attr("__getattr__") = py::cpp_function([](const std::string& name) -> py::object {
    throw py::attribute_error(
        "detectron2._C has no '" + name +
        "': this detectron2 was built by tools/setup_env.sh without its C++/CUDA ops; the code "
        "path that needs it is not supported here (install a source-built detectron2 to use it)");
  });
}
CPPEOF
  say "pip install --no-build-isolation $src (about a minute)"
  FORCE_CUDA=0 pip_install -q --no-build-isolation "${d2_pip_extra[@]}" "$src"
fi

# 3. The project, editable, with its Python dependencies.
say "installing mask2former_sim (editable) and its dependencies"
pip_install -q --no-build-isolation -e ".[test]"

# 4. Optional: the CUDA op.
if [ "${BUILD_MSDA:-0}" = "1" ]; then
  PYTHON="$PY" "$ROOT/tools/build_msda.sh"
fi

"$PY" -c "import mask2former_sim, detectron2, torch; print('[setup] ok: torch', torch.__version__, '| detectron2', detectron2.__version__, '| mask2former_sim', mask2former_sim.__version__)"
# detectron2's environment report is what train_net.py's default_setup prints first
"$PY" -c "from detectron2.utils.collect_env import collect_env_info; collect_env_info()" \
  || { say "detectron2's collect_env_info() fails in $VENV (see above)" >&2; exit 1; }
fingerprint > "$STAMP"
say "done in $(( $(date +%s) - t0 )) s"

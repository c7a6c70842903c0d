#!/usr/bin/env bash
# Fetch and build the wheels that tools/gpu_check.sh installs on a GPU machine without network.
#
#   tools/prepare_gpu_wheels.sh                            wheels for CPython 3.12 into .whl/
#   tools/prepare_gpu_wheels.sh --python-version 3.11 --dest /tmp/whl311   another interpreter
#
# The GPU machine (see tools/gpu_check.sh) has torch, torchvision, numpy, scipy, timm, einops,
# Pillow, PyYAML, opencv, matplotlib, tabulate, tqdm, cloudpickle, portalocker and pytest, but
# not detectron2 and the part of its requirements below. This script puts exactly this set in
# the destination (other *.whl there are removed), each wheel pinned to the version tested here:
#   pycocotools (compiled: for --python-version), termcolor, yacs, iopath, omegaconf
#   (downloaded wheels); fvcore, antlr4-python3-runtime (sdist only on PyPI: built here, pure
#   Python); pb1-detectron2 0.6 (detectron2 v0.6's Python code from PyPI's sha256-checked sdist,
#   as tools/setup_env.sh uses, packed as a py3-none-any wheel whose detectron2/_C is a
#   pure-Python module exporting the environment-report functions only: no C++/CUDA ops, which
#   this project does not use).
# Idempotent: wheels already there are kept. Needs PyPI (pip download / pip wheel) only for
# missing wheels. Prints the total size and fails when it exceeds --budget-mib (default 48), or
# when the wheels plus the files of the git working tree exceed 64 MiB (what the device tool
# carries). Knobs: PYTHON (the interpreter whose pip is used; default ./.venv/bin/python, else
# python3).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.whl"
PYVER="3.12"
BUDGET_MIB=48
CARRY_LIMIT_MIB=64

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dest) DEST="${2:?--dest needs a directory}"; shift 2 ;;
    --python-version) PYVER="${2:?--python-version needs X.Y}"; shift 2 ;;
    --budget-mib) BUDGET_MIB="${2:?--budget-mib needs a number}"; shift 2 ;;
    *) printf 'tools/prepare_gpu_wheels.sh: unknown argument %s (--help for usage)\n' "$1" >&2; exit 2 ;;
  esac
done
case "$PYVER" in
  3.[0-9]|3.[0-9][0-9]) ;;
  *) printf 'tools/prepare_gpu_wheels.sh: --python-version must be like 3.12, got %s\n' "$PYVER" >&2; exit 2 ;;
esac
CPTAG="cp${PYVER/./}"

say() { printf '[wheels] %s\n' "$*"; }
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="python3"; fi
# pip, minus the machine-local index's "Location ... is ignored" noise (exit status kept)
pip_() {
  "$PY" -m pip --disable-pip-version-check "$@" 2>&1 \
    | { grep -v -E "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

# name==version and the file-name prefix of its wheel ("" = any tag; compiled ones need ours)
DOWNLOADED=("pycocotools==2.0.11" "termcolor==3.3.0" "yacs==0.1.8" "iopath==0.1.9" "omegaconf==2.3.1")
BUILT=("fvcore==0.1.5.post20221221" "antlr4-python3-runtime==4.9.3")
D2_VERSION="0.6"
D2_SHA256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
D2_WHEEL="pb1_detectron2-${D2_VERSION}-py3-none-any.whl"

mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# the wheel file of name==version in DEST, if any (names normalised as wheel files spell them)
wheel_of() {
  local name="${1%%==*}" version="${1##*==}" f
  name="${name//-/_}"
  for f in "$DEST/${name}-${version}-"*.whl; do
    [ -e "$f" ] || continue
    case "$(basename "$f")" in
      *-py3-none-any.whl|*-py2.py3-none-any.whl|*-"$CPTAG"-*.whl) echo "$f"; return 0 ;;
    esac
  done
  return 1
}

keep=()
for spec in "${DOWNLOADED[@]}"; do
  if ! f="$(wheel_of "$spec")"; then
    say "downloading $spec for CPython $PYVER"
    pip_ download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "$spec"
    f="$(wheel_of "$spec")" || { say "pip download of $spec left no matching wheel in $DEST" >&2; exit 1; }
  fi
  keep+=("$(basename "$f")")
done
for spec in "${BUILT[@]}"; do
  if ! f="$(wheel_of "$spec")"; then
    say "building $spec (sdist only on PyPI; pure Python)"
    pip_ wheel -q --no-deps --no-binary=:all: -w "$work/built" "$spec"
    for g in "$work/built/"*.whl; do
      case "$g" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) mv "$g" "$DEST/" ;;
        *) say "$spec built a platform wheel ($(basename "$g")), expected py3-none-any" >&2; exit 1 ;;
      esac
    done
    f="$(wheel_of "$spec")" || { say "pip wheel of $spec left no wheel" >&2; exit 1; }
  fi
  keep+=("$(basename "$f")")
done

if [ ! -f "$DEST/$D2_WHEEL" ]; then
  say "building $D2_WHEEL from PyPI's pb1-detectron2 $D2_VERSION sdist (pure Python, detectron2._C stub)"
  "$PY" - "$D2_VERSION" "$D2_SHA256" "$work" "$DEST/$D2_WHEEL" <<'PYEOF'
import base64, hashlib, io, os, re, sys, tarfile, urllib.request, zipfile

version, want_sha, work, out = sys.argv[1:5]
name = "pb1-detectron2"
index = urllib.request.urlopen(f"https://pypi.org/simple/{name}/", timeout=120).read().decode()
urls = [h.split("#")[0] for h in re.findall(r'href="([^"]+)"', index)
        if h.split("#")[0].endswith(f"/{name}-{version}.tar.gz")]
if not urls:
    sys.exit(f"[wheels] no {name}-{version}.tar.gz on PyPI's simple index")
sdist = os.path.join(work, f"{name}-{version}.tar.gz")
urllib.request.urlretrieve(urls[0], sdist)
got = hashlib.sha256(open(sdist, "rb").read()).hexdigest()
if got != want_sha:
    sys.exit(f"[wheels] sha256 mismatch for {urls[0]}: expected {want_sha}, got {got}")
print(f"[wheels] sha256 verified ({got})")

# the wheel's files: the sdist's detectron2/ package, its three projects where setup.py puts
# them (package_dir), and a pure-Python detectron2/_C
top = f"{name}-{version}/"
mapping = {"detectron2/": "detectron2/",
           "projects/PointRend/point_rend/": "detectron2/projects/point_rend/",
           "projects/DeepLab/deeplab/": "detectron2/projects/deeplab/",
           "projects/Panoptic-DeepLab/panoptic_deeplab/": "detectron2/projects/panoptic_deeplab/"}
files = {}
with tarfile.open(sdist) as tar:
    for member in tar.getmembers():
        if not member.isfile() or not member.name.startswith(top):
            continue
        rel = member.name[len(top):]
        if "__pycache__" in rel or rel.endswith((".pyc", ".so", ".cpp", ".cu", ".h")):
            continue
        for src, dst in mapping.items():
            if rel.startswith(src):
                files[dst + rel[len(src):]] = tar.extractfile(member).read()
                break
if "detectron2/__init__.py" not in files or "detectron2/layers/deform_conv.py" not in files:
    sys.exit("[wheels] the sdist does not hold detectron2's Python package as expected")
files["detectron2/_C.py"] = b'''"""Pure-Python stand-in for detectron2's C++ extension (no C++/CUDA ops).

Written by mask2former-sim's tools/prepare_gpu_wheels.sh into a py3-none-any wheel of
detectron2 v0.6, so that ``from detectron2 import _C`` (layers, evaluation) imports on any
Python; it exports what detectron2's environment report (collect_env_info) calls. Asking for
an op fails naming why.
"""


def get_compiler_version():
    return "none (pure-Python _C stub of tools/prepare_gpu_wheels.sh)"


def get_cuda_version():
    return "not built with CUDA ops"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(
        f"detectron2._C has no '{name}': this detectron2 wheel (tools/prepare_gpu_wheels.sh) has no "
        "C++/CUDA ops; the code path that needs it is not supported (install a source-built detectron2)"
    )
'''
distinfo = f"pb1_detectron2-{version}.dist-info/"
files[distinfo + "METADATA"] = (
    "Metadata-Version: 2.1\n"
    f"Name: {name}\n"
    f"Version: {version}\n"
    "Summary: detectron2 v0.6 (Python code of PyPI's pb1-detectron2 sdist, no C++/CUDA ops)\n"
    "Home-page: https://github.com/facebookresearch/detectron2\n"
    "License: Apache-2.0\n"
    "Requires-Python: >=3.6\n"
).encode()
files[distinfo + "WHEEL"] = (
    "Wheel-Version: 1.0\nGenerator: mask2former-sim tools/prepare_gpu_wheels.sh\n"
    "Root-Is-Purelib: true\nTag: py3-none-any\n"
).encode()
files[distinfo + "top_level.txt"] = b"detectron2\n"
record = []
for path, data in sorted(files.items()):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    record.append(f"{path},sha256={digest},{len(data)}")
record.append(distinfo + "RECORD,,")
files[distinfo + "RECORD"] = ("\n".join(record) + "\n").encode()
tmp = out + ".part"
with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
    # fixed dates and order: the same sdist gives the same wheel, byte for byte
    for path in sorted(p for p in files if not p.startswith(distinfo)) + sorted(p for p in files if p.startswith(distinfo)):
        info = zipfile.ZipInfo(path, date_time=(1980, 1, 1, 0, 0, 0))
        info.external_attr = 0o644 << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, files[path])
os.replace(tmp, out)
print(f"[wheels] wrote {out} ({len(files)} files)")
PYEOF
fi
keep+=("$D2_WHEEL")

# exactly this set: other wheels in DEST would be installed by tools/gpu_check.sh too
for f in "$DEST"/*.whl; do
  [ -e "$f" ] || continue
  b="$(basename "$f")"
  found=0
  for k in "${keep[@]}"; do [ "$k" = "$b" ] && found=1; done
  if [ "$found" = 0 ]; then say "removing $b (not in the set)"; rm -f "$f"; fi
done

total=0
for k in "${keep[@]}"; do
  size=$(stat -c %s "$DEST/$k")
  total=$((total + size))
  printf '[wheels]   %8d  %s\n' "$size" "$k"
done
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
say "${#keep[@]} wheels in $DEST: $(mib "$total") MiB (budget $BUDGET_MIB MiB)"
if [ "$total" -gt $((BUDGET_MIB * 1048576)) ]; then
  say "the wheels exceed the budget of $BUDGET_MIB MiB" >&2
  exit 1
fi
# what the device tool carries: the working tree's files git does not ignore, plus .whl/
repo=$( (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard 2>/dev/null \
    | xargs -0 -r stat -c %s -- 2>/dev/null || true) | awk '{ s += $1 } END { print s + 0 }')
if [ "$repo" -gt 0 ]; then
  say "working tree (git files, not ignored): $(mib "$repo") MiB; with the wheels: $(mib $((repo + total))) MiB (limit $CARRY_LIMIT_MIB MiB)"
  if [ $((repo + total)) -gt $((CARRY_LIMIT_MIB * 1048576)) ]; then
    say "working tree + wheels exceed the $CARRY_LIMIT_MIB MiB the device tool carries" >&2
    exit 1
  fi
fi

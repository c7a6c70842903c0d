"""Build the ``m2fsim_msda`` extension: multi-scale deformable attention CUDA kernels.

    pip install --no-build-isolation third_party/MSDeformAttn          # into the current env
    python third_party/MSDeformAttn/setup.py build_ext --inplace        # .so next to this file

Needs torch with CUDA (``torch.version.cuda``) and nvcc (``CUDA_HOME`` or PATH). Without a
visible GPU set ``FORCE_CUDA=1``; ``TORCH_CUDA_ARCH_LIST`` picks the architectures
(default here without a GPU: "8.0;9.0"), ``MAX_JOBS`` the parallel compile jobs.
``--no-build-isolation`` matters: the extension must be built against the installed torch.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).resolve().parent
DEFAULT_ARCH_LIST = "8.0;9.0"


def _stop(message: str) -> None:
    sys.exit(f"[m2fsim_msda] cannot build: {message}")


try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
except ImportError as exc:
    _stop(
        f"torch is not importable ({exc}). Install torch first and build with "
        "`pip install --no-build-isolation third_party/MSDeformAttn`."
    )

if torch.version.cuda is None:
    _stop(f"torch {torch.__version__} is a CPU-only build; the op needs a CUDA build of torch.")
if CUDA_HOME is None:
    _stop("nvcc not found: set CUDA_HOME (e.g. CUDA_HOME=/usr/local/cuda) or put nvcc on PATH.")
if not (Path(CUDA_HOME) / "include" / "cuda_runtime.h").is_file():
    _stop(
        f"CUDA_HOME={CUDA_HOME} has no include/cuda_runtime.h (nvcc on PATH may be a wrapper "
        "script); set CUDA_HOME to the toolkit root, e.g. CUDA_HOME=/usr/local/cuda."
    )
if not torch.cuda.is_available():
    if os.environ.get("FORCE_CUDA", "0") != "1":
        _stop("no CUDA device is visible; set FORCE_CUDA=1 to compile anyway (e.g. on a CPU build machine).")
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
        print(f"[m2fsim_msda] no GPU visible: TORCH_CUDA_ARCH_LIST={DEFAULT_ARCH_LIST}")

csrc = HERE / "csrc"
ext = CUDAExtension(
    name="m2fsim_msda",
    sources=[str(csrc / name) for name in ("msda_bind.cpp", "msda_cpu.cpp", "msda_cuda.cu")],
    include_dirs=[str(csrc)],
    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]},
)

setup(
    name="m2fsim-msda",
    version="0.1.0",
    description="Multi-scale deformable attention CUDA op for mask2former-sim",
    license="Apache-2.0",
    python_requires=">=3.10",
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)

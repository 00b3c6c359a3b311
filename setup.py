"""Builds torchnorm._C: the C++ operator registrations and CPU kernels always,
the CUDA kernels whenever nvcc and a CUDA build of torch are present.

Environment:
  TORCHNORM_CUDA=1|0      force the CUDA sources in or out (default: auto)
  TORCHNORM_CPU_AVX2=1|0  compile the CPU kernels for AVX2+FMA (default: when
                          the building machine has them)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default here: "8.0;9.0")
  MAX_JOBS                parallel compile jobs for ninja
"""
import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    value = os.environ.get(name, "auto").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def _build_cuda():
    forced = _flag("TORCHNORM_CUDA")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if forced and not available:
        raise RuntimeError(
            "TORCHNORM_CUDA=1 but no CUDA toolkit (CUDA_HOME) or no CUDA build of torch was found "
            f"(torch {torch.__version__}, CUDA_HOME={CUDA_HOME})"
        )
    return available if forced is None else forced


def _host_has_avx2():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx2 " in flags and " fma " in flags and " f16c " in flags


def _cuda_wheel_includes():
    # The pip CUDA build of torch ships CUDA headers (e.g. cusparse.h) that
    # its own headers include, under site-packages/nvidia/cu*/include.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def extension():
    sources = sorted(
        glob.glob("csrc/*.cpp")
        + glob.glob("csrc/autograd/*.cpp")
        + glob.glob("csrc/common/*.cpp")
        + glob.glob("csrc/cpu/*.cpp")
    )
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need
    # (C++17 up to torch 2.13, C++20 from 2.14).
    # -fopenmp: at::parallel_for is an OpenMP template in torch's headers;
    # without it the loops silently run on one thread. The libgomp.so.1 this
    # links against is the one torch has already loaded.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    avx2 = _flag("TORCHNORM_CPU_AVX2")
    if avx2 or (avx2 is None and _host_has_avx2()):
        # Selects ATen's 256-bit at::vec::Vectorized specializations.
        cxx += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _build_cuda():
        print("torchnorm: building the CPU kernels only")
        return CppExtension(
            "torchnorm._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to ask: build for Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    print(f"torchnorm: building CPU and CUDA kernels for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'this GPU')}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "torchnorm._C",
        sources,
        include_dirs=include_dirs + _cuda_wheel_includes(),
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    name="torchnorm",
    version="0.1.0",
    description="Fast normalization kernels (BatchNorm and friends) for PyTorch, CPU and CUDA",
    packages=find_packages(include=["torchnorm", "torchnorm.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    python_requires=">=3.9",
)

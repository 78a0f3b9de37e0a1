"""The project's source patches for the MinkowskiEngine 0.5.4 sdist.

Each patch is ``(relative path, old text, new text, why)``. ``apply_patches`` fails loudly when an ``old`` text is
missing, so a changed sdist can never be built half-patched.

CPU patches make the sdist build and import with torch 2.x, Python >= 3.10, numpy 2 and current setuptools, and run
its few BLAS calls on ATen (``--blas=aten``) so no system BLAS is needed.
CUDA patches (added to the CPU ones for a CUDA build) make it compile with CUDA 12/13 and CCCL's thrust.
"""

from __future__ import annotations

from pathlib import Path

Patch = tuple[str, str, str, str]

_SEQUENCE_FILES = (
    "MinkowskiEngine/MinkowskiCoordinateManager.py",
    "MinkowskiEngine/MinkowskiTensorField.py",
    "MinkowskiEngine/MinkowskiCommon.py",
    "MinkowskiEngine/utils/quantization.py",
)

# MinkowskiEngine's CPU kernels need four BLAS routines (s/d gemm and axpy). Routing them through ATen, i.e. the
# BLAS that torch already ships, removes the system OpenBLAS dependency: no headers to install, no library to find at
# run time, and the same build works offline (the GPU machine) and on conda, Debian or anything else torch runs on.
_CBLAS_ENUMS = """// sparkme: the CBLAS enums MinkowskiEngine's signatures use; the routines themselves run on ATen
// (math_functions_cpu.cpp), so no system BLAS header or library is needed.
typedef enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 } CBLAS_ORDER;
typedef enum CBLAS_TRANSPOSE {
  CblasNoTrans = 111,
  CblasTrans = 112,
  CblasConjTrans = 113
} CBLAS_TRANSPOSE;
"""

_ATEN_BLAS = """#include "math_functions.hpp"

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>

#include <cstdint>

namespace {

// A BLAS matrix of rows x cols with leading dimension ld, as a strided tensor over the same memory (no copy).
template <typename Dtype>
at::Tensor blas_matrix(const Dtype *data, int rows, int cols, int ld, CBLAS_ORDER layout) {
  const int64_t row_stride = layout == CblasRowMajor ? ld : 1;
  const int64_t col_stride = layout == CblasRowMajor ? 1 : ld;
  return at::from_blob(const_cast<Dtype *>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<Dtype>::value));
}

// C := alpha * op(A) * op(B) + beta * C with C of M x N, on torch's own BLAS.
template <typename Dtype>
void aten_gemm(CBLAS_ORDER layout, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int M, int N, int K,
               Dtype alpha, const Dtype *A, int lda, const Dtype *B, int ldb, Dtype beta, Dtype *C, int ldc) {
  if (M == 0 || N == 0)
    return;
  c10::NoGradGuard no_grad;
  at::Tensor a = trans_a == CblasNoTrans ? blas_matrix(A, M, K, lda, layout) : blas_matrix(A, K, M, lda, layout).t();
  at::Tensor b = trans_b == CblasNoTrans ? blas_matrix(B, K, N, ldb, layout) : blas_matrix(B, N, K, ldb, layout).t();
  at::Tensor c = blas_matrix(C, M, N, ldc, layout);
  c.addmm_(a, b, beta, alpha); // beta == 0 ignores C's old values, NaNs included, as BLAS does
}

// Y := alpha * X + Y over N contiguous values.
template <typename Dtype>
void aten_axpy(int N, Dtype alpha, const Dtype *X, Dtype *Y) {
  if (N == 0)
    return;
  c10::NoGradGuard no_grad;
  blas_matrix(Y, N, 1, 1, CblasColMajor).add_(blas_matrix(X, N, 1, 1, CblasColMajor), alpha);
}

} // namespace
"""

_ATEN_BLAS_PATCHES: list[Patch] = [
    (
        "setup.py",
        'BLAS_LIST = ["openblas", "mkl", "atlas", "blas"]\n',
        'BLAS_LIST = ["aten", "openblas", "mkl", "atlas", "blas"]\n',
        "--blas=aten: the CPU BLAS routines run on torch's ATen, no system BLAS library",
    ),
    (
        "setup.py",
        '    if BLAS == "mkl":\n        libraries.append("mkl_rt")\n',
        '    if BLAS == "aten":\n        pass  # torch brings its own BLAS\n'
        '    elif BLAS == "mkl":\n        libraries.append("mkl_rt")\n',
        "--blas=aten links no BLAS library",
    ),
    (
        "src/mkl_alternate.hpp",
        'extern "C" {\n#include <cblas.h>\n}\n',
        _CBLAS_ENUMS,
        "the CBLAS enums without the system cblas.h",
    ),
    (
        "src/math_functions_cpu.cpp",
        '#include "math_functions.hpp"\n',
        _ATEN_BLAS,
        "gemm/axpy on ATen",
    ),
    *[
        ("src/math_functions_cpu.cpp",
         f"  cblas_{p}gemm(Layout, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C,\n",
         "  aten_gemm(Layout, TransA, TransB, M, N, K, alpha, A, lda, B, ldb, beta, C,\n", "gemm on ATen")
        for p in "sd"
    ],
    *[
        ("src/math_functions_cpu.cpp", f"  cblas_{p}axpy(N, alpha, X, 1, Y, 1);\n",
         "  aten_axpy(N, alpha, X, Y);\n", "axpy on ATen")
        for p in "sd"
    ],
]

CPU_PATCHES: list[Patch] = [
    (
        "setup.py",
        'run_command("rm", "-rf", "build")\nrun_command("pip", "uninstall", "MinkowskiEngine", "-y")\n',
        "",
        "setup.py must not delete build/ nor uninstall the installed package every time it runs",
    ),
    *[
        (path, "from collections import Sequence\n", "from collections.abc import Sequence\n",
         "collections.Sequence was removed in Python 3.10")
        for path in _SEQUENCE_FILES
    ],
    (
        "MinkowskiEngine/MinkowskiKernelGenerator.py",
        "from collections import Sequence, namedtuple\n",
        "from collections import namedtuple\nfrom collections.abc import Sequence\n",
        "collections.Sequence was removed in Python 3.10",
    ),
    (
        "MinkowskiEngine/utils/gradcheck.py",
        "from torch._six import container_abcs, istuple\n",
        "import collections.abc as container_abcs\n\n\ndef istuple(value):\n    return isinstance(value, tuple)\n",
        "torch._six was removed in torch 2.0",
    ),
    *_ATEN_BLAS_PATCHES,
]

_NVTX_OFF = "#ifndef NVTX_DISABLE\n#define NVTX_DISABLE\n#endif\n"

CUDA_PATCHES: list[Patch] = [
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <thrust/pair.h>\n",
        "#include <thrust/pair.h>\n#include <thrust/execution_policy.h>\n",
        "CCCL no longer includes execution_policy.h transitively (upstream issues #543, #596)",
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <cudf/detail/nvtx/ranges.hpp>\n",
        _NVTX_OFF + "#include <cudf/detail/nvtx/ranges.hpp>\n",
        "NVTX v2 headers are gone from CUDA 12+; the ranges are only profiling annotations",
    ),
    (
        "src/convolution_kernel.cuh",
        '#include "gpu.cuh"\n',
        '#include "gpu.cuh"\n#include <thrust/execution_policy.h>\n',
        "CCCL no longer includes execution_policy.h transitively",
    ),
    (
        "src/coordinate_map_gpu.cu",
        "#include <thrust/sort.h>\n",
        "#include <thrust/sort.h>\n#include <thrust/remove.h>\n#include <thrust/unique.h>\n",
        "thrust::remove_if / thrust::unique need their own headers with CCCL",
    ),
    (
        "src/spmm.cu",
        "#include <cusparse.h>\n",
        "#include <cusparse.h>\n#include <thrust/execution_policy.h>\n#include <thrust/reduce.h>\n"
        "#include <thrust/sort.h>\n",
        "CCCL no longer includes these transitively (upstream PR #626)",
    ),
    (
        "src/coordinate_map_functors.cuh",
        "    : public thrust::unary_function<uint32_t,\n"
        "                                    thrust::pair<uint32_t, uint32_t>> {\n",
        " {\n  using argument_type = uint32_t;\n  using result_type = thrust::pair<uint32_t, uint32_t>;\n",
        "thrust::unary_function was removed in CCCL 3 (CUDA 13)",
    ),
    (
        "setup.py",
        'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda"]\n',
        'NVCC_FLAGS += ["--expt-relaxed-constexpr", "--expt-extended-lambda", "-DNVTX_DISABLE"]\n'
        "if CUDA_HOME or os.environ.get('CUDA_HOME'):\n"
        "    _cccl = os.path.join(CUDA_HOME or os.environ['CUDA_HOME'], 'targets', 'x86_64-linux', 'include', 'cccl')\n"
        "    if os.path.isdir(_cccl):\n"
        "        NVCC_FLAGS += ['-I' + _cccl]\n"
        "        CC_FLAGS += ['-I' + _cccl]\n",
        "CUDA 13 moved thrust/cub/libcu++ under include/cccl (the .cpp files of the CUDA build include thrust too)",
    ),
    (
        "setup.py",
        'FAST_MATH, argv = _argparse("--fast_math", argv)\n',
        '_WHEEL_LINK_ARGS = []\n'
        'if not CPU_ONLY:\n'
        '    # A toolkit installed without its math libraries (e.g. only nvcc) still builds against the\n'
        '    # cuBLAS/cuSPARSE headers and libraries of the nvidia-* wheels torch depends on; they go last.\n'
        '    import glob as _glob\n'
        '\n'
        '    _cuda_root = CUDA_HOME or os.environ.get("CUDA_HOME") or ""\n'
        '    try:\n'
        '        import nvidia as _nvidia\n'
        '\n'
        '        _nvidia_bases = list(_nvidia.__path__)\n'
        '    except ImportError:\n'
        '        _nvidia_bases = []\n'
        '    for _header, _lib in (("cusparse.h", "cusparse"), ("cublas_v2.h", "cublas")):\n'
        '        if _cuda_root and os.path.exists(os.path.join(_cuda_root, "include", _header)):\n'
        '            continue\n'
        '        _hits = [(b, h) for b in _nvidia_bases\n'
        '                 for h in sorted(_glob.glob(os.path.join(b, "*", "include", _header)))]\n'
        '        if not _hits:\n'
        '            continue\n'
        '        _base, _inc = _hits[0][0], os.path.dirname(_hits[0][1])\n'
        '        if _inc not in NVCC_FLAGS:\n'
        '            CC_FLAGS += ["-isystem", _inc]\n'
        '            NVCC_FLAGS += ["-isystem", _inc]\n'
        '        _libdir = os.path.join(os.path.dirname(_inc), "lib")\n'
        '        _sos = sorted(_glob.glob(os.path.join(_libdir, f"lib{_lib}.so.*")))\n'
        '        if _lib in libraries and _sos and not os.path.exists(os.path.join(_libdir, f"lib{_lib}.so")):\n'
        '            libraries[libraries.index(_lib)] = ":" + os.path.basename(_sos[0])\n'
        '        # the extension lands in site-packages/MinkowskiEngineBackend/, next to site-packages/nvidia/\n'
        '        _rpath = "-Wl,-rpath,$ORIGIN/../" + os.path.relpath(_libdir, os.path.dirname(_base))\n'
        '        for _arg in (f"-L{_libdir}", _rpath):\n'
        '            if _arg not in _WHEEL_LINK_ARGS:\n'
        '                _WHEEL_LINK_ARGS.append(_arg)\n'
        'FAST_MATH, argv = _argparse("--fast_math", argv)\n',
        "a toolkit without cuBLAS/cuSPARSE (nvcc only) builds against the nvidia-* wheels torch depends on",
    ),
    (
        "setup.py",
        "        libraries=libraries,\n",
        "        libraries=libraries,\n        extra_link_args=_WHEEL_LINK_ARGS,\n",
        "link against (and find at run time) the nvidia-* wheel libraries found above",
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "#include <functional>\n",
        "#include <functional>\n\n"
        "// CUDA 13 replaced cudaMemPrefetchAsync(ptr, count, device, stream) by a cudaMemLocation + flags form.\n"
        "inline cudaError_t minkowski_prefetch_async(const void *ptr, size_t count, int dev_id,\n"
        "                                            cudaStream_t stream) {\n"
        "#if defined(CUDART_VERSION) && (CUDART_VERSION >= 13000)\n"
        "  cudaMemLocation location{};\n"
        "  location.type = cudaMemLocationTypeDevice;\n"
        "  location.id = dev_id;\n"
        "  return cudaMemPrefetchAsync(ptr, count, location, 0, stream);\n"
        "#else\n"
        "  return cudaMemPrefetchAsync(ptr, count, dev_id, stream);\n"
        "#endif\n"
        "}\n",
        "cudaMemPrefetchAsync takes a cudaMemLocation in CUDA 13",
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "    CUDA_TRY(\n        cudaMemPrefetchAsync(m_hashtbl_values,",
        "    CUDA_TRY(\n        minkowski_prefetch_async(m_hashtbl_values,",
        "cudaMemPrefetchAsync takes a cudaMemLocation in CUDA 13",
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "    CUDA_TRY(cudaMemPrefetchAsync(this, sizeof(*this), dev_id, stream));\n",
        "    CUDA_TRY(minkowski_prefetch_async(this, sizeof(*this), dev_id, stream));\n",
        "cudaMemPrefetchAsync takes a cudaMemLocation in CUDA 13",
    ),
    (
        "src/3rdparty/concurrent_unordered_map.cuh",
        "        CUDA_TRY(\n          cudaMemPrefetchAsync(m_hashtbl_values,",
        "        CUDA_TRY(\n          minkowski_prefetch_async(m_hashtbl_values,",
        "cudaMemPrefetchAsync takes a cudaMemLocation in CUDA 13",
    ),
    (
        "src/coordinate_map_gpu.cuh",
        "      m_map = map_type::create(\n"
        "          compute_hash_table_size(size, m_hashtable_occupancy),\n"
        "          m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n",
        "      {\n"
        "        auto map_ptr = map_type::create(\n"
        "            compute_hash_table_size(size, m_hashtable_occupancy),\n"
        "            m_unused_element, m_unused_key, m_hasher, m_equal, m_map_allocator);\n"
        "        auto map_deleter = map_ptr.get_deleter();\n"
        "        m_map = std::shared_ptr<map_type>(map_ptr.release(), std::move(map_deleter));\n"
        "      }\n",
        "libstdc++'s shared_ptr(unique_ptr&&) calls __to_address unqualified, which ADL makes ambiguous with "
        "libcu++'s cuda::std::__to_address (the map's value type is a cuda::std::pair)",
    ),
    *[
        (path, "#include <ATen/cuda/CUDAUtils.h>\n",
         "#include <ATen/core/Tensor.h>\n#include <ATen/cuda/CUDAUtils.h>\n",
         "torch 2.14's ATen/cuda/CUDAUtils.h uses at::Tensor without including its definition")
        for path in ("src/spmm.cu", "src/spmm.cuh")
    ],
]


def apply_patches(source: Path, patches: list[Patch]) -> list[str]:
    """Apply ``patches`` to the unpacked sdist at ``source``; return one log line per patch.

    Raises:
        RuntimeError: an ``old`` text is not found exactly once (the sdist is not the one these patches target).
    """
    done = []
    for relative, old, new, why in patches:
        path = source / relative
        text = path.read_text()
        count = text.count(old)
        if count != 1:
            raise RuntimeError(f"patch for {relative} ({why}) expected its target once, found it {count} times")
        path.write_text(text.replace(old, new))
        done.append(f"patched {relative}: {why}")
    return done

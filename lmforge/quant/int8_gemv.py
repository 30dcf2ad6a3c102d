"""A hand-written int8 weight-only GEMV for CPUs with AVX-512: the decode step's int8 matmul.

    from lmforge.quant.int8_gemv import int8_gemv_available
    if int8_gemv_available():
        y = torch.ops.lmforge.int8_gemv(x, codes, scale)       # x fp32 [M, in], codes int8 [out, in]

Why. Decoding one token reads every weight once, so an int8 matmul at batch 1 should run at
memory speed. On the Intel Xeons we measured (docs/LOG.md, session 22) torch's
`aten._weight_int8pack_mm` streams its weights from memory at ~8.4 GB/s, against 21.5 GB/s for
MKL's fp32 GEMV, so int8 decoded only ~2x faster than transformers fp32. This kernel reads each
weight row from start to end (one sequential stream per thread, so the hardware prefetcher
follows it) and asks for the data 4 KB ahead with a software prefetch: ~19 GB/s on that Xeon,
1.8-2.2x torch's kernel. y[m, n] = scale[n] * sum_k x[m, k] * W[n, k], accumulated in fp32 with
fp32 activations (torch's kernel rounds them to bf16).

It is built once per machine by torch's C++ extension loader (~30-60 s, cached under
~/.cache/torch_extensions) the first time an int8 layer is made on a CPU with AVX-512 and a C++
compiler. Anywhere else (AVX2-only CPUs, no compiler, a failed build, or LMFORGE_INT8_KERNEL=torch)
the layer keeps torch's kernel, and says why once. Registered as the custom op
`lmforge::int8_gemv` from C++ (with a shape rule for torch.compile), so the compiled decode step
calls it inside its graph with no Python in between.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

_FAKE_REGISTERED: list[bool] = []
MAX_ROWS = 4      # batch rows it serves (it streams W once for all rows); more rows go to torch's GEMM kernel

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

// y [M, N] = scale[n] * (x [M, K] . W[n, :]), W int8 [N, K] row-major; fp32 x, scale, y.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kInt8 && scale.dtype() == torch::kFloat32,
              "int8_gemv takes fp32 x, int8 w, fp32 scale");
  x = x.contiguous(); w = w.contiguous(); scale = scale.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(w.size(1) == K && scale.numel() == N, "int8_gemv: shapes do not match");
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* row = wp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k + 64 <= K; k += 64) {
          if (m == 0) _mm_prefetch((const char*)(row + k + 4096), _MM_HINT_T0);   // 4 KB ahead in the stream
          __m512i b = _mm512_loadu_si512((const void*)(row + k));
          a0 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k),
                               _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b))), a0);
          a1 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 16),
                               _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 1))), a1);
          a2 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 32),
                               _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 2))), a2);
          a3 = _mm512_fmadd_ps(_mm512_loadu_ps(xr + k + 48),
                               _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(b, 3))), a3);
        }
        float sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        for (; k < K; ++k) sum += xr[k] * (float)row[k];                             // a tail of < 64
        yp[m * N + n] = sp[n] * sum;
      }
    }
  });
  return y;
}

// A dispatcher op in C++ (no Python between the compiled graph and the kernel).
TORCH_LIBRARY(lmforge, m) { m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor"); }
TORCH_LIBRARY_IMPL(lmforge, CPU, m) { m.impl("int8_gemv", &int8_gemv); }
"""


@functools.lru_cache(maxsize=1)
def _extension():
    """The op `torch.ops.lmforge.int8_gemv` once built and loaded, or None (with one line on stderr
    saying why when a build was tried and failed)."""
    if os.environ.get("LMFORGE_INT8_KERNEL", "").lower() == "torch":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512",):
        return None                  # AVX2-only CPUs keep torch's kernel (3.26x transformers on a Zen 3)
    from torch.utils.cpp_extension import load_inline

    if not _built("lmforge_int8_gemv"):
        print("building lmforge's int8 CPU kernel (once per machine, ~30-60 s) ...", file=sys.stderr, flush=True)
    try:
        load_inline("lmforge_int8_gemv", cpp_sources=_SOURCE, is_python_module=False,
                    # -fopenmp: at::parallel_for is inlined OpenMP, serial without it
                    extra_cflags=["-O3", "-mavx512f", "-mavx512bw", "-mavx512dq", "-fopenmp"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:       # noqa: BLE001 - no compiler, headers, ...: torch's kernel still works
        print(f"note: lmforge's int8 CPU kernel did not build ({type(error).__name__}: {str(error)[:200]}); "
              "int8 layers use torch's kernel", file=sys.stderr, flush=True)
        return None
    if not _FAKE_REGISTERED:
        # the shape rule torch.compile traces with
        torch.library.register_fake("lmforge::int8_gemv")(
            lambda x, weight, scale: x.new_empty(x.shape[0], weight.shape[0]))
        _FAKE_REGISTERED.append(True)
    return torch.ops.lmforge.int8_gemv


def _built(name: str) -> bool:
    """Whether torch's extension cache already holds `name` (then loading it takes a moment)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(f.endswith(".so") for f in os.listdir(_get_build_directory(name, verbose=False)))
    except (ImportError, OSError):
        return False


def int8_gemv_available() -> bool:
    """Whether `torch.ops.lmforge.int8_gemv` runs here (built and registered on first call)."""
    return _extension() is not None

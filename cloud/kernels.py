"""A CPU matrix product for verify passes whose cost barely grows with the number of rows.

On one CPU thread torch's default fp32 `F.linear` streams the weights at memory speed for one input
row, but not for two to sixteen: a verify pass of 8 tokens cost ~3x a one-token pass. Here each block
of weight rows is read from memory once and multiplied, from L1, with every input row, so a pass of
k tokens costs about one read of the weights plus k rows of arithmetic.

Exactness: every output element is computed by the same sequence of operations whatever the number
of rows, the tiling or the thread count (8 lanes accumulate k in steps of 8 with FMA, one fixed
horizontal sum, the k tail in order, then the bias). Row i of a k-token pass is therefore bit for bit
the row a one-token pass gives for the same input, and against torch's stock kernel an output
differs by float32 rounding only (~1e-6 relative).

The kernel is a small C++ torch operator (AVX2 + FMA), compiled once with torch's own extension
builder and cached (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); the first build takes
about a minute. Where it cannot be used (no compiler, a CPU without AVX2/FMA, a non-float32 model,
CUDA) the model keeps torch's stock kernels and `accelerate_linears` says why.

Opt out with PICOSPEC_FAST_LINEAR=0 or EngineConfig(fast_linear=False).
"""
from __future__ import annotations

import hashlib
import os
import platform
import threading

import torch
import torch.nn.functional as F
from torch import nn

ENV_SWITCH = "PICOSPEC_FAST_LINEAR"
# Above this many rows (a long prefill chunk) torch's stock kernel is faster: the arithmetic, not
# the weight stream, is then the cost, and MKL's large GEMM is ~1.5x ours at 200 rows. Verify
# passes, one-token passes and short prefill chunks stay on the row-streaming kernel.
MAX_ROWS = 64

_CPP_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// The end of every output element: a fixed horizontal sum of the 8 lanes, the k tail in order,
// then the bias. Shared by every tile shape, so the tiling never changes a result.
inline float finish(__m256 acc, const float* x, const float* w, int64_t k8, int64_t K, float bias) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  float r = _mm_cvtss_f32(s);
  for (int64_t k = k8; k < K; ++k) r = std::fma(x[k], w[k], r);
  return r + bias;
}

// Software prefetch of the weight stream, spread evenly over the arithmetic, from a cursor that
// runs up to one block of weight rows ahead (`end`). The 4x3 tile issues `qa` then `qb` 64-byte
// lines per two k steps, alternately: about the rate at which the block's weights are consumed
// (prefetching faster or slower than that measured slower); the other tiles one per two steps.
struct Prefetch {
  const float* cur;
  const float* end;
  int qa, qb;
  inline void one() {
    _mm_prefetch(reinterpret_cast<const char*>(cur), _MM_HINT_T0);
    cur += 16;
    cur = cur < end ? cur : end;
  }
};

// Accumulates `steps` 8-float k steps for an MR x NR tile of outputs (MR input rows, NR weight
// rows). x: the MR input rows packed step by step ([step][MR][8], so one pointer and constant
// offsets); w: the first weight row at this k block, the others K apart. The 8-lane accumulators
// are kept in `acc_buf` between k blocks, stored and reloaded exactly.
template <int MR, int NR, bool PF>
inline void tile(const float* __restrict x, const float* __restrict w, int64_t K, int64_t steps,
                 float* acc_buf, bool first, Prefetch& pf) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_buf + (i * NR + j) * 8);
  for (int64_t s = 0; s < steps; ++s) {
    if (PF && (s & 1) == 0) pf.one();
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * K + s * 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * 8);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
    x += MR * 8;
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(acc_buf + (i * NR + j) * 8, acc[i][j]);
}

// The verify-pass workhorse: 4 input rows x 3 weight rows, written out so that the compiler keeps
// the 12 accumulators, 3 weight vectors and 1 input vector in the 16 ymm registers with no spills
// and constant offsets; two k steps per iteration. Same arithmetic, in the same order, as tile<4, 3>.
inline void tile43(const float* __restrict x, const float* __restrict w, int64_t K, int64_t steps,
                   float* acc_buf, bool first, Prefetch& pf) {
  const float* __restrict w0 = w;
  const float* __restrict w1 = w + K;
  const float* __restrict w2 = w + 2 * K;
  __m256 a00, a01, a02, a10, a11, a12, a20, a21, a22, a30, a31, a32;
  if (first) {
    a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = a30 = a31 = a32 = _mm256_setzero_ps();
  } else {
    a00 = _mm256_loadu_ps(acc_buf + 0); a01 = _mm256_loadu_ps(acc_buf + 8); a02 = _mm256_loadu_ps(acc_buf + 16);
    a10 = _mm256_loadu_ps(acc_buf + 24); a11 = _mm256_loadu_ps(acc_buf + 32); a12 = _mm256_loadu_ps(acc_buf + 40);
    a20 = _mm256_loadu_ps(acc_buf + 48); a21 = _mm256_loadu_ps(acc_buf + 56); a22 = _mm256_loadu_ps(acc_buf + 64);
    a30 = _mm256_loadu_ps(acc_buf + 72); a31 = _mm256_loadu_ps(acc_buf + 80); a32 = _mm256_loadu_ps(acc_buf + 88);
  }
#define PICOSPEC_STEP(WOFF, XOFF)                                                                  \
  {                                                                                                \
    const __m256 v0 = _mm256_loadu_ps(w0 + (WOFF)), v1 = _mm256_loadu_ps(w1 + (WOFF)),             \
                 v2 = _mm256_loadu_ps(w2 + (WOFF));                                                \
    __m256 xv = _mm256_loadu_ps(x + (XOFF));                                                       \
    a00 = _mm256_fmadd_ps(xv, v0, a00); a01 = _mm256_fmadd_ps(xv, v1, a01); a02 = _mm256_fmadd_ps(xv, v2, a02); \
    xv = _mm256_loadu_ps(x + (XOFF) + 8);                                                          \
    a10 = _mm256_fmadd_ps(xv, v0, a10); a11 = _mm256_fmadd_ps(xv, v1, a11); a12 = _mm256_fmadd_ps(xv, v2, a12); \
    xv = _mm256_loadu_ps(x + (XOFF) + 16);                                                         \
    a20 = _mm256_fmadd_ps(xv, v0, a20); a21 = _mm256_fmadd_ps(xv, v1, a21); a22 = _mm256_fmadd_ps(xv, v2, a22); \
    xv = _mm256_loadu_ps(x + (XOFF) + 24);                                                         \
    a30 = _mm256_fmadd_ps(xv, v0, a30); a31 = _mm256_fmadd_ps(xv, v1, a31); a32 = _mm256_fmadd_ps(xv, v2, a32); \
  }
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    for (int q = (s & 2) ? pf.qb : pf.qa; q > 0; --q) pf.one();
    PICOSPEC_STEP(0, 0)
    PICOSPEC_STEP(8, 32)
    w0 += 16; w1 += 16; w2 += 16; x += 64;
  }
  if (s < steps) PICOSPEC_STEP(0, 0)
#undef PICOSPEC_STEP
  _mm256_storeu_ps(acc_buf + 0, a00); _mm256_storeu_ps(acc_buf + 8, a01); _mm256_storeu_ps(acc_buf + 16, a02);
  _mm256_storeu_ps(acc_buf + 24, a10); _mm256_storeu_ps(acc_buf + 32, a11); _mm256_storeu_ps(acc_buf + 40, a12);
  _mm256_storeu_ps(acc_buf + 48, a20); _mm256_storeu_ps(acc_buf + 56, a21); _mm256_storeu_ps(acc_buf + 64, a22);
  _mm256_storeu_ps(acc_buf + 72, a30); _mm256_storeu_ps(acc_buf + 80, a31); _mm256_storeu_ps(acc_buf + 88, a32);
}

// One output at a time (the last few weight rows): x rows `xs` floats apart per step.
inline void tile1(const float* x, int64_t xs, const float* w, int64_t steps, float* acc_buf, bool first) {
  __m256 a = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_buf);
  for (int64_t s = 0; s < steps; ++s)
    a = _mm256_fmadd_ps(_mm256_loadu_ps(x + s * xs), _mm256_loadu_ps(w + s * 8), a);
  _mm256_storeu_ps(acc_buf, a);
}

// Output columns [n0, n1): each block of NR weight rows is streamed from memory once, one k block
// at a time, and reused from L1 by every group of MR input rows. xk: the input packed in groups of
// MR rows, each [k8 / 8][rows in group][8] (`xk + m * k8` is group m / MR); x: as given (k tail).
// PF: software prefetch (for MR > 1: with one row the hardware prefetcher keeps up on its own).
template <int MR, int NR, bool PF>
void columns(const float* xk, const float* x, int64_t M, const float* w, float* y, int64_t N,
             int64_t K, const float* bias, int64_t n0, int64_t n1, int64_t kc) {
  const int64_t k8 = K & ~int64_t(7);
  std::vector<float> acc_buf(((M + MR - 1) / MR) * MR * NR * 8);
  // Lines of a block of NR weight rows per 4 k steps of all the row groups: 2 NR / groups (M = 8:
  // two groups of 4 rows, 3 lines per 4 steps).
  const int64_t groups = (M + MR - 1) / MR;
  const int per4 = static_cast<int>(std::min<int64_t>(6, (2 * NR + groups - 1) / groups));
  Prefetch pf{w + std::min(n0 + NR, n1) * K, nullptr, per4 / 2, per4 - per4 / 2};
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    const float* wb = w + n * K;
    pf.end = w + std::min(n + 2 * NR, n1) * K;
    pf.cur = std::min(std::max(pf.cur, wb + nr * K), pf.end);
    for (int64_t k0 = 0; k0 < k8 || k0 == 0; k0 += kc) {
      const int64_t steps = std::min(k8 - k0, kc) / 8;
      const bool first = k0 == 0;
      for (int64_t m = 0; m < M; m += MR) {
        const int64_t mr = std::min<int64_t>(MR, M - m);
        float* ab = acc_buf.data() + m * NR * 8;
        const float* xb = xk + m * k8 + k0 * mr;
        if (nr == NR) {
          if (MR == 4 && NR == 3 && mr == 4) tile43(xb, wb + k0, K, steps, ab, first, pf);
          else if (mr == MR) tile<MR, NR, PF>(xb, wb + k0, K, steps, ab, first, pf);
          else if (mr == 3) tile<3, NR, PF>(xb, wb + k0, K, steps, ab, first, pf);
          else if (mr == 2) tile<2, NR, PF>(xb, wb + k0, K, steps, ab, first, pf);
          else tile<1, NR, PF>(xb, wb + k0, K, steps, ab, first, pf);
        } else {
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nr; ++j)
              tile1(xb + i * 8, mr * 8, wb + j * K + k0, steps, ab + (i * NR + j) * 8, first);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nr; ++j)
        y[m * N + n + j] = finish(_mm256_loadu_ps(acc_buf.data() + (m * NR + j) * 8), x + m * K,
                                  wb + j * K, k8, K, bias ? bias[n + j] : 0.f);
  }
}

// Two to four input rows (one row group): the k-blocked kernel below, which measured faster
// there than the packed-group one (its prefetch: the next block's rows at this k, from the first
// tile). Same arithmetic in the same order as every other tile.
// Accumulates k in [k0, k0 + len) for an MR x NR tile of outputs (MR input rows, NR weight rows).
// x: the input rows' slice of this k block, `ldx` apart. The 8-lane accumulators are kept in `acc`
// between k blocks, stored and reloaded exactly. `pf`, when set, is the next block of weight rows:
// fetched into cache now, so that memory streams while the arithmetic runs.
template <int MR, int NR>
inline void tile_small(const float* x, int64_t ldx, const float* w, int64_t K, int64_t k0, int64_t len,
                 float* acc_buf, bool first, const float* pf) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_buf + (i * NR + j) * 8);
  const float* wk = w + k0;
  for (int64_t k = 0; k < len; k += 8) {
    if (pf && (k & 15) == 0)
      for (int j = 0; j < NR; ++j)
        _mm_prefetch(reinterpret_cast<const char*>(pf + j * K + k0 + k), _MM_HINT_T0);
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(wk + j * K + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) _mm256_storeu_ps(acc_buf + (i * NR + j) * 8, acc[i][j]);
}

// Output columns [n0, n1): each block of NR weight rows is streamed from memory once, one k block
// at a time, and reused from L1 by every block of MR input rows. xk: the input packed by k block
// ([k8 / kc][M][kc], contiguous, so that the rows do not fight over L1 sets); x: as given (k tail).
template <int MR, int NR>
void columns_small(const float* xk, const float* x, int64_t M, const float* w, float* y, int64_t N,
             int64_t K, const float* bias, int64_t n0, int64_t n1, int64_t kc) {
  const int64_t k8 = K & ~int64_t(7);
  std::vector<float> acc_buf(((M + MR - 1) / MR) * MR * NR * 8);
  for (int64_t n = n0; n < n1; n += NR) {
    const int64_t nr = std::min<int64_t>(NR, n1 - n);
    const float* wb = w + n * K;
    for (int64_t k0 = 0, kb = 0; k0 < k8 || k0 == 0; k0 += kc, ++kb) {
      const int64_t len = std::min(k8 - k0, kc);
      for (int64_t m = 0; m < M; m += MR) {
        const int64_t mr = std::min<int64_t>(MR, M - m);
        float* ab = acc_buf.data() + m * NR * 8;
        const float* xb = xk + (kb * M + m) * kc;
        const bool first = k0 == 0;
        const float* pf = MR > 1 && m == 0 && n + 2 * NR <= n1 ? wb + NR * K : nullptr;
        if (nr == NR) {
          if (mr == MR) tile_small<MR, NR>(xb, kc, wb, K, k0, len, ab, first, pf);
          else if (mr == 3) tile_small<3, NR>(xb, kc, wb, K, k0, len, ab, first, pf);
          else if (mr == 2) tile_small<2, NR>(xb, kc, wb, K, k0, len, ab, first, pf);
          else tile_small<1, NR>(xb, kc, wb, K, k0, len, ab, first, pf);
        } else {  // the last few weight rows, one output at a time
          for (int64_t i = 0; i < mr; ++i)
            for (int64_t j = 0; j < nr; ++j)
              tile_small<1, 1>(xb + i * kc, kc, wb + j * K, K, k0, len, ab + (i * NR + j) * 8, first, nullptr);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < nr; ++j)
        y[m * N + n + j] = finish(_mm256_loadu_ps(acc_buf.data() + (m * NR + j) * 8), x + m * K,
                                  wb + j * K, k8, K, bias ? bias[n + j] : 0.f);
  }
}

at::Tensor rowstream_linear(const at::Tensor& input, const at::Tensor& weight,
                            const c10::optional<at::Tensor>& bias_opt) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
              "rowstream_linear: float32 only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "rowstream_linear: contiguous 2-D weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(input.size(-1) == K, "rowstream_linear: input has ", input.size(-1),
              " features, the weight ", K);
  const at::Tensor x = input.reshape({-1, K}).contiguous();
  const int64_t M = x.size(0);
  auto out_sizes = input.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor bias;
  const float* bp = nullptr;
  if (bias_opt.has_value() && bias_opt->defined()) {
    bias = bias_opt->contiguous();
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N, "rowstream_linear: bias");
    bp = bias.data_ptr<float>();
  }
  if (M == 0 || N == 0) return y.view(out_sizes);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Register tiles of MR x NR <= 12 accumulators; one row keeps 8 weight streams in flight.
  // The k block keeps the input rows' slice in L1 (~16 KB); it never changes the arithmetic.
  // One row and five or more (verify passes of 8 and 16): the input packed per group of 4 rows,
  // the hand-written 4x3 tile and the rate-matched prefetch; 2-4 rows: the k-blocked kernel.
  const int64_t MR = M == 1 ? 1 : M == 2 ? 2 : M == 3 ? 3 : 4;
  const int64_t NR = M == 1 ? 8 : M == 2 ? 6 : M == 3 ? 4 : 3;
  const int64_t kc = std::max<int64_t>(128, std::min<int64_t>(K, (4096 / M) & ~int64_t(7)));
  const int64_t k8 = K & ~int64_t(7);
  // The input packed in groups of MR rows, each group step by step: [k8 / 8][rows in group][8].
  std::vector<float> xk;
  if (M == 1 || M > 4) xk.resize(std::max<int64_t>(k8, 8) * M);
  for (int64_t m = 0; m < M && (M == 1 || M > 4); ++m) {
    const int64_t g = m / MR, rows = std::min<int64_t>(MR, M - g * MR), i = m - g * MR;
    float* dst = xk.data() + g * MR * k8 + i * 8;
    for (int64_t s = 0; s < k8 / 8; ++s)
      std::copy(xp + m * K + s * 8, xp + m * K + s * 8 + 8, dst + s * rows * 8);
  }
  const int64_t blocks = (N + NR - 1) / NR;
  if (M >= 2 && M <= 4) {  // one row group: the k-blocked kernel, input packed [k block][M][kc]
    const int64_t kblocks = std::max<int64_t>(1, (k8 + kc - 1) / kc);
    std::vector<float> xs(kblocks * M * kc);
    for (int64_t kb = 0; kb < kblocks; ++kb)
      for (int64_t m = 0; m < M; ++m) {
        const int64_t k0 = kb * kc, len = std::min(k8 - k0, kc);
        std::copy(xp + m * K + k0, xp + m * K + k0 + len, xs.data() + (kb * M + m) * kc);
      }
    at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
      const int64_t n0 = b0 * NR, n1 = std::min(N, b1 * NR);
      if (M == 2) columns_small<2, 6>(xs.data(), xp, M, wp, yp, N, K, bp, n0, n1, kc);
      else if (M == 3) columns_small<3, 4>(xs.data(), xp, M, wp, yp, N, K, bp, n0, n1, kc);
      else columns_small<4, 3>(xs.data(), xp, M, wp, yp, N, K, bp, n0, n1, kc);
    });
    return y.view(out_sizes);
  }
  at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
    const int64_t n0 = b0 * NR, n1 = std::min(N, b1 * NR);
    if (M == 1) columns<1, 8, false>(xk.data(), xp, M, wp, yp, N, K, bp, n0, n1, kc);
    else columns<4, 3, true>(xk.data(), xp, M, wp, yp, N, K, bp, n0, n1, kc);
  });
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY(picospec_kernels, m) {
  m.def("rowstream_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(picospec_kernels, CPU, m) {
  m.impl("rowstream_linear", &rowstream_linear);
}
"""

_build_lock = threading.Lock()
_build_result: tuple[bool, str] | None = None


def enabled_by_env() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_supports_kernel() -> tuple[bool, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"not x86-64 ({platform.machine()})"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return False, f"CPU capability {capability} (needs AVX2 and FMA)"
    return True, capability


def load_kernel() -> tuple[bool, str]:
    """Build (once, cached on disk) and load the operator. Returns (available, why not / what)."""
    global _build_result
    with _build_lock:
        if _build_result is not None:
            return _build_result
        ok, why = _cpu_supports_kernel()
        if not ok:
            _build_result = (False, why)
            return _build_result
        try:
            from torch.utils.cpp_extension import load_inline

            digest = hashlib.sha256(_CPP_SOURCE.encode()).hexdigest()[:10]
            load_inline(f"picospec_rowstream_{digest}", _CPP_SOURCE, is_python_module=False,
                        extra_cflags=["-O3", "-mavx2", "-mfma", "-ffp-contract=off"])
            torch.ops.picospec_kernels.rowstream_linear  # noqa: B018 (raises if not registered)
            _build_result = (True, "rowstream AVX2 kernel")
        except Exception as e:  # no compiler, no headers, ...: stay on stock kernels
            _build_result = (False, f"kernel build failed: {type(e).__name__}: {str(e)[:200]}")
        return _build_result


def rowstream_linear(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the row-streaming kernel: x [..., K], weight [N, K] -> [..., N] (float32, CPU)."""
    return torch.ops.picospec_kernels.rowstream_linear(x, weight, bias)


class RowStreamLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) whose CPU float32 inference uses the
    row-streaming kernel for up to MAX_ROWS rows. Beyond that, where autograd is needed, or where
    the tensors are not float32 on the CPU, it is torch's stock F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
                and w.dtype == torch.float32 and w.is_contiguous()
                and x.numel() <= MAX_ROWS * x.shape[-1]
                and not (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):
            return torch.ops.picospec_kernels.rowstream_linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


def accelerate_linears(model: nn.Module, enabled: bool | None = None) -> str:
    """Switch the model's nn.Linear layers (lm_head included) in place to the row-streaming kernel.

    Only for a float32 model on the CPU; a no-op elsewhere (CUDA, bf16, ...). Parameters, tied
    weights and the state dict are untouched: only the layers' class changes.
    `enabled`: None follows PICOSPEC_FAST_LINEAR (default on). Returns what the model now runs.
    """
    if enabled is None:
        enabled = enabled_by_env()
    if not enabled:
        return f"stock torch linears (fast path off: {ENV_SWITCH}=0 or fast_linear=False)"
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    if not linears:
        return "stock (no nn.Linear layers)"
    w = linears[0].weight
    if w.device.type != "cpu":
        return f"stock torch linears ({w.device.type}: the fast path is for the CPU)"
    if any(m.weight.dtype != torch.float32 for m in linears):
        return f"stock torch linears ({w.dtype}: the fast path is for float32)"
    ok, why = load_kernel()
    if not ok:
        return f"stock torch linears (fast path unavailable: {why})"
    converted = 0
    for m in linears:
        if m.weight.is_contiguous():
            m.__class__ = RowStreamLinear
            converted += 1
    return f"{why}: {converted} of {len(linears)} linear layers"


def restore_linears(model: nn.Module) -> int:
    """Undo accelerate_linears (back to torch's stock kernels). Returns how many layers changed."""
    changed = 0
    for m in model.modules():
        if type(m) is RowStreamLinear:
            m.__class__ = nn.Linear
            changed += 1
    return changed

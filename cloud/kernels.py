"""A CPU matrix product for verify passes whose cost barely grows with the number of rows.

On one CPU thread torch's default fp32 `F.linear` streams the weights at memory speed for one input
row, but not for two to sixteen: a verify pass of 8 tokens cost ~3x a one-token pass. Here each
slice of weights is read from memory once and multiplied, from L1, with every input row, so a pass
of k tokens costs about one read of the weights plus k rows of arithmetic.

The weights are kept in the kernel's own packed layout (`accelerate_linears` rewrites them in place,
so there is never a second copy; `restore_linears` gives torch's layout back): blocks of 96 weight
rows, and in each block its 256-wide k slices one after another. A slice of a block is then one run
of memory that every input row uses while the input rows' own slice stays in L1 (in torch's layout,
8 input rows re-read their 1536-8960 floats from L2 for every 3 weight rows, and that refill, not the
arithmetic, set the pace). A model whose input embedding shares the output layer's weight reads its
rows from the packed layout (`PackedEmbedding`).

Exactness: every output element is computed by the same sequence of operations whatever the number
of rows, the tiling or the thread count (8 lanes accumulate k in steps of 8 with FMA, one fixed
horizontal sum, the k tail in order, then the bias). Row i of a k-token pass is therefore bit for bit
the row a one-token pass gives for the same input (and a prompt's logits do not depend on its
prefill chunks); against torch's stock kernel an output differs by float32 rounding only (~1e-6
relative).

The kernel is a small C++ torch operator (AVX2 + FMA), compiled once with torch's own extension
builder and cached (`TORCH_EXTENSIONS_DIR`, default ~/.cache/torch_extensions); the first build takes
about a minute. Where it cannot be used (no compiler, a CPU without AVX2/FMA, a non-float32 model,
CUDA) the model keeps torch's stock kernels and layout, and `accelerate_linears` says why.

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

// Software prefetch of a tile's lines: NR weight rows `stride` floats apart, k in [off, end), a line
// of each row in turn. The tiles issue `qa` then `qb` lines per two k steps, alternately: about the
// rate at which the arithmetic consumes them.
struct PrefetchRows {
  const float* base;
  int64_t stride, off, end;
  int rows, row;
  int qa, qb;
  inline void one() {
    if (off >= end) return;
    _mm_prefetch(reinterpret_cast<const char*>(base + row * stride + off), _MM_HINT_T0);
    if (++row == rows) { row = 0; off += 16; }
  }
};

// Accumulates `steps` 8-float k steps for an MR x NR tile of outputs (MR input rows, NR weight
// rows). x: the MR input rows packed step by step ([step][MR][8], so one pointer and constant
// offsets); w: the first weight row at this k block, the others K apart. The 8-lane accumulators
// are kept in `acc_buf` between k blocks, stored and reloaded exactly.
template <int MR, int NR, bool PF>
inline void tile(const float* __restrict x, const float* __restrict w, int64_t K, int64_t steps,
                 float* acc_buf, bool first, PrefetchRows& pf) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      acc[i][j] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(acc_buf + (i * NR + j) * 8);
  for (int64_t s = 0; s < steps; ++s) {
    if (PF && (s & 1) == 0)
      for (int q = (s & 2) ? pf.qb : pf.qa; q > 0; --q) pf.one();
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
                   float* acc_buf, bool first, PrefetchRows& pf) {
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

// The packed weight layout, the kernel's own (pack_ writes it in place, unpack_ gives torch's back).
// Blocks of kNB weight rows; in each block its k blocks of kKC in order; in each k block the block's
// rows' slices one after another. Element (n, k), in the block of rows [nb, nb + nbr) and the k block
// [k0, k0 + len) (len = min(kKC, K - k0)), lies at
//     nb K + k0 nbr + (n - nb) len + (k - k0).
// Each k slice of a block (kNB x kKC floats, one run of memory) is used by every input row from L1,
// while the input rows' slice of the same k block stays in L1 across all the block's rows.
constexpr int64_t kNB = 96;  // a multiple of every tile's weight rows (8, 6, 4, 3)
constexpr int64_t kKC = 256;
constexpr int64_t kLead = 1;  // software prefetch: the tile this many on
constexpr int64_t kMaxRows = 64;  // input rows per run of the kernel

inline int64_t block_rows(int64_t nb, int64_t N) { return std::min(kNB, N - nb); }
inline int64_t slice_len(int64_t k0, int64_t K) { return std::min(kKC, K - k0); }
// Row r of a block of nbr rows (`block` its first float), its slice at k0 (a multiple of kKC): the
// layout's address formula (`blocks` walks the same addresses with the offsets hoisted out of its
// loops: computing them per tile and per output measured a few % slower at 8 rows).
template <class T>
inline T* slice_row(T* block, int64_t nbr, int64_t K, int64_t r, int64_t k0) {
  return block + k0 * nbr + r * slice_len(k0, K);
}

// Weight blocks [b0, b1): for each k block, every NR-row tile of the block's slice meets every group
// of MR input rows. A tile's rows lie `gap` = nbr / NR rows apart ({i, i + gap, ...}), so that as i
// advances each of its NR weight streams reads a stretch of the slice front to back: long runs in
// memory order, which the hardware prefetcher follows (NR adjacent rows would be NR runs of one
// slice row each, and measured ~30% slower with one input row). xk: the input packed in groups of
// MR rows, each [k8 / 8][rows in group][8] (`xk + m * k8` is the group of row m); x: as given (k
// tail). PF: software prefetch of the next tiles' lines, into L1.
template <int MR, int NR, bool PF>
void blocks(const float* xk, const float* x, int64_t M, const float* w, float* y, int64_t N,
            int64_t K, const float* bias, int64_t b0, int64_t b1) {
  const int64_t k8 = K & ~int64_t(7), groups = (M + MR - 1) / MR;
  const int64_t tile_floats = MR * NR * 8;
  std::vector<float> acc_buf((kNB / NR + 1) * groups * tile_floats);
  // Lines of an NR-row tile per 4 k steps of all the groups: 2 NR / groups (M = 8: 3 per 4 steps).
  const int per4 = static_cast<int>(std::min<int64_t>(16, (2 * NR + groups - 1) / groups));
  PrefetchRows pf{w, 0, 0, 0, NR, 0, per4 / 2, per4 - per4 / 2};
  const float* wend = w + std::min(N, b1 * kNB) * K;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t nb = b * kNB, nbr = block_rows(nb, N);
    const float* block = w + nb * K;
    // a short last block whose rows do not split into NR runs: tiles of adjacent rows and 1-row tails
    const int64_t gap = nbr % NR == 0 ? nbr / NR : 0, tiles = gap ? gap : (nbr + NR - 1) / NR;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t len = slice_len(k0, K), steps = std::max<int64_t>(0, std::min(k8 - k0, kKC)) / 8;
      const bool first = k0 == 0;
      const float* slice = block + k0 * nbr;
      const int64_t stride = (gap ? gap : 1) * len;  // between a tile's weight rows
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r = gap ? t : t * NR, nr = gap ? NR : std::min<int64_t>(NR, nbr - r);
        const float* wb = slice + r * len;
        if (PF && gap) {  // the tile kLead on in this slice: this tile's rows + kLead
          pf.base = wb + kLead * len;
          pf.stride = stride;
          pf.rows = NR;
          pf.off = 0;
          pf.end = t + kLead < tiles ? steps * 8 : 0;
          pf.row = 0;
        } else if (PF) {  // adjacent tiles (a short last block, e.g. 64 of a 256-row k/v projection's
          // rows): the lines kLead tiles on, in memory order (without, that projection ran ~30% slower)
          pf.base = std::min(wb + kLead * NR * len, wend);
          pf.stride = 0;
          pf.rows = 1;
          pf.off = 0;
          pf.end = std::min<int64_t>(NR * len, wend - pf.base);
          pf.row = 0;
        }
        float* tile_acc = acc_buf.data() + t * groups * tile_floats;
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t m = g * MR, mr = std::min<int64_t>(MR, M - m);
          float* ab = tile_acc + g * tile_floats;
          const float* xb = xk + m * k8 + k0 * mr;
          if (nr == NR) {
            if (MR == 4 && NR == 3 && mr == 4) tile43(xb, wb, stride, steps, ab, first, pf);
            else if (mr == MR) tile<MR, NR, PF>(xb, wb, stride, steps, ab, first, pf);
            else if (mr == 3) tile<3, NR, PF>(xb, wb, stride, steps, ab, first, pf);
            else if (mr == 2) tile<2, NR, PF>(xb, wb, stride, steps, ab, first, pf);
            else tile<1, NR, PF>(xb, wb, stride, steps, ab, first, pf);
          } else {  // the block's last few rows, one output at a time
            for (int64_t i = 0; i < mr; ++i)
              for (int64_t j = 0; j < nr; ++j)
                tile1(xb + i * 8, mr * 8, wb + j * stride, steps, ab + (i * NR + j) * 8, first);
          }
        }
      }
    }
    // The k tail (k8 <= k < K) lies in every row's last slice: `tail` shifted so that index k lands there.
    const int64_t last = (K - 1) / kKC * kKC, last_len = slice_len(last, K);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < nbr; ++r) {
        const int64_t g = m / MR, i = m % MR, t = gap ? r % gap : r / NR, j = gap ? r / gap : r % NR;
        const float* acc = acc_buf.data() + (t * groups + g) * tile_floats + (i * NR + j) * 8;
        const float* tail = block + last * nbr + r * last_len - last;
        y[m * N + nb + r] = finish(_mm256_loadu_ps(acc), x + m * K, tail, k8, K, bias ? bias[nb + r] : 0.f);
      }
  }
}

void check_weight(const at::Tensor& w, const char* what) {
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 2 && w.is_contiguous() && w.device().is_cpu(),
              what, ": a contiguous 2-D float32 CPU weight");
}

// Copies between torch's layout (`plain`, [N][K]) and the packed one, slice by slice.
void repack(float* packed, float* plain, int64_t N, int64_t K, bool to_packed) {
  for (int64_t nb = 0; nb < N; nb += kNB)
    for (int64_t r = 0; r < block_rows(nb, N); ++r)
      for (int64_t k0 = 0; k0 < K; k0 += kKC) {
        float* p = slice_row(packed + nb * K, block_rows(nb, N), K, r, k0);
        float* q = plain + (nb + r) * K + k0;
        if (to_packed) std::copy(q, q + slice_len(k0, K), p);
        else std::copy(p, p + slice_len(k0, K), q);
      }
}

// In place: a block's rows are a contiguous run in both layouts, so one block of scratch suffices.
void relayout_(at::Tensor& w, bool to_packed) {
  check_weight(w, to_packed ? "pack_" : "unpack_");
  const int64_t N = w.size(0), K = w.size(1);
  std::vector<float> scratch(std::min(kNB, N) * K);
  float* p = w.data_ptr<float>();
  for (int64_t nb = 0; nb < N; nb += kNB) {
    const int64_t n = block_rows(nb, N) * K;
    std::copy(p + nb * K, p + nb * K + n, scratch.data());
    if (to_packed) repack(p + nb * K, scratch.data(), n / K, K, true);
    else repack(scratch.data(), p + nb * K, n / K, K, false);
  }
}

at::Tensor pack_(at::Tensor w) { relayout_(w, true); return w; }
at::Tensor unpack_(at::Tensor w) { relayout_(w, false); return w; }

// A copy of packed weights in torch's layout (a state dict; torch's kernel for a non-float32 input).
at::Tensor unpacked(const at::Tensor& w) {
  check_weight(w, "unpacked");
  at::Tensor out = at::empty_like(w);
  repack(w.data_ptr<float>(), out.data_ptr<float>(), w.size(0), w.size(1), false);
  return out;
}

// Rows `ids` of packed weights, in torch's layout: an embedding lookup in a tied output layer.
at::Tensor packed_rows(const at::Tensor& w, const at::Tensor& ids) {
  check_weight(w, "packed_rows");
  const int64_t N = w.size(0), K = w.size(1);
  const at::Tensor flat = ids.reshape({-1}).to(at::kLong).contiguous();
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor out = at::empty({flat.numel(), K}, w.options());
  const float* p = w.data_ptr<float>();
  const int64_t* id = flat.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  for (int64_t i = 0; i < flat.numel(); ++i) {
    const int64_t n = id[i];
    TORCH_CHECK(n >= 0 && n < N, "packed_rows: id ", n, " out of range for ", N, " rows");
    const int64_t nb = n - n % kNB;
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const float* src = slice_row(p + nb * K, block_rows(nb, N), K, n - nb, k0);
      std::copy(src, src + slice_len(k0, K), o + i * K + k0);
    }
  }
  return out.view(sizes);
}

// Rows [0, M) of x through the kernel: y [M][N] = x [M][K] . packed w^T (+ bias).
void run_rows(const float* xp, int64_t M, const float* wp, float* yp, int64_t N, int64_t K, const float* bp) {
  // Register tiles of MR x NR <= 12 accumulators (one row: 8 weight rows in flight); five rows
  // and more (verify passes of 8 and 16) run the hand-written 4x3 tile in groups of 4 rows.
  const int64_t MR = M == 1 ? 1 : M == 2 ? 2 : M == 3 ? 3 : 4;
  const int64_t k8 = K & ~int64_t(7);
  // The input packed in groups of MR rows, each group step by step: [k8 / 8][rows in group][8].
  std::vector<float> xk(std::max<int64_t>(k8, 8) * M);
  for (int64_t m = 0; m < M; ++m) {
    const int64_t g = m / MR, rows = std::min<int64_t>(MR, M - g * MR), i = m - g * MR;
    float* dst = xk.data() + g * MR * k8 + i * 8;
    for (int64_t s = 0; s < k8 / 8; ++s)
      std::copy(xp + m * K + s * 8, xp + m * K + s * 8 + 8, dst + s * rows * 8);
  }
  const int64_t nblocks = (N + kNB - 1) / kNB;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    if (M == 1) blocks<1, 8, false>(xk.data(), xp, M, wp, yp, N, K, bp, b0, b1);
    else if (M == 2) blocks<2, 6, false>(xk.data(), xp, M, wp, yp, N, K, bp, b0, b1);
    else if (M == 3) blocks<3, 4, false>(xk.data(), xp, M, wp, yp, N, K, bp, b0, b1);
    else blocks<4, 3, true>(xk.data(), xp, M, wp, yp, N, K, bp, b0, b1);
  });
}

at::Tensor packed_linear(const at::Tensor& input, const at::Tensor& weight,
                         const c10::optional<at::Tensor>& bias_opt) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "packed_linear: float32 CPU input only");
  check_weight(weight, "packed_linear");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(input.size(-1) == K, "packed_linear: input has ", input.size(-1),
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
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N, "packed_linear: bias");
    bp = bias.data_ptr<float>();
  }
  if (M == 0 || N == 0) return y.view(out_sizes);
  // Long inputs (prefill chunks) in pieces of kMaxRows rows: the input's slices and the
  // accumulators stay in L2, and every row is still computed as it would be alone.
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows)
    run_rows(x.data_ptr<float>() + m0 * K, std::min(kMaxRows, M - m0), weight.data_ptr<float>(),
             y.data_ptr<float>() + m0 * N, N, K, bp);
  return y.view(out_sizes);
}

}  // namespace

TORCH_LIBRARY(picospec_kernels, m) {
  m.def("packed_linear(Tensor input, Tensor weight, Tensor? bias=None) -> Tensor");
  m.def("pack_(Tensor(a!) weight) -> Tensor(a!)");
  m.def("unpack_(Tensor(a!) weight) -> Tensor(a!)");
  m.def("unpacked(Tensor weight) -> Tensor");
  m.def("packed_rows(Tensor weight, Tensor ids) -> Tensor");
}
TORCH_LIBRARY_IMPL(picospec_kernels, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("pack_", &pack_);
  m.impl("unpack_", &unpack_);
  m.impl("unpacked", &unpacked);
  m.impl("packed_rows", &packed_rows);
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
            torch.ops.picospec_kernels.packed_linear  # noqa: B018 (raises if not registered)
            _build_result = (True, "rowstream AVX2 kernel")
        except Exception as e:  # no compiler, no headers, ...: stay on stock kernels
            _build_result = (False, f"kernel build failed: {type(e).__name__}: {str(e)[:200]}")
        return _build_result


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear over packed weights: x [..., K], weight [N, K] in the kernel's layout -> [..., N]."""
    return torch.ops.picospec_kernels.packed_linear(x, weight, bias)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A copy of weight [N, K] (float32, CPU, contiguous) in the kernel's packed layout."""
    return torch.ops.picospec_kernels.pack_(weight.detach().clone())


def unpacked(weight: torch.Tensor) -> torch.Tensor:
    """A copy of packed weights in torch's layout."""
    return torch.ops.picospec_kernels.unpacked(weight)


def rowstream_linear(x: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the kernel, for a weight in torch's layout (packs a copy: tests, single-layer
    benches; models pack once, in accelerate_linears): x [..., K], weight [N, K] -> [..., N]."""
    return packed_linear(x, pack(weight), bias)


class _PackedState:
    """A module whose weight holds the packed layout: its state dict is in torch's layout, and
    loading one is refused (restore_linears first)."""

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weight" in destination:
            destination[prefix + "weight"] = unpacked(self.weight.detach())

    def _load_from_state_dict(self, *_args, **_kwargs):
        raise RuntimeError("this model's weights are packed for the row-streaming kernel: "
                           "cloud.kernels.restore_linears(model) before loading a state dict")


class RowStreamLinear(_PackedState, nn.Linear):
    """An nn.Linear whose weight holds the kernel's packed layout (accelerate_linears packs it in
    place, restore_linears gives torch's back; state_dict() is in torch's layout). Every float32
    input runs the row-streaming kernel, however many rows (a non-float32 input: torch's kernel
    over an unpacked copy). Inference only: it refuses to build a graph for the weight's gradient."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            raise RuntimeError("RowStreamLinear is for inference (packed weights have no gradient "
                               "layout): run under torch.inference_mode() or restore_linears first")
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return packed_linear(x, w, self.bias)
        return F.linear(x.float(), unpacked(w), self.bias)


class PackedEmbedding(_PackedState, nn.Embedding):
    """The input embedding of a model whose output layer shares (ties) its weight: rows are read
    from the packed layout. Inference only, like RowStreamLinear."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.ops.picospec_kernels.packed_rows(self.weight, ids)


def accelerate_linears(model: nn.Module, enabled: bool | None = None) -> str:
    """Switch the model's nn.Linear layers (lm_head included) in place to the row-streaming kernel,
    packing their weights in place (no second copy); an embedding that shares a weight with one of
    them (tied embeddings) reads the packed rows.

    Only for a float32 model on the CPU; a no-op elsewhere (CUDA, bf16, ...). Returns what the model
    now runs. `enabled`: None follows PICOSPEC_FAST_LINEAR (default on).
    """
    if enabled is None:
        enabled = enabled_by_env()
    if not enabled:
        return f"stock torch linears (fast path off: {ENV_SWITCH}=0 or fast_linear=False)"
    # layers converted by an earlier call count as converted and are not packed twice
    linears = [m for m in model.modules() if type(m) in (nn.Linear, RowStreamLinear)]
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
    embeddings = {m.weight.data_ptr(): m for m in model.modules() if type(m) is nn.Embedding}
    packed: set[int] = set()
    with torch.no_grad():
        for m in linears:
            if type(m) is not nn.Linear or not m.weight.is_contiguous():
                continue
            ptr = m.weight.data_ptr()
            if ptr not in packed:  # a weight shared by two layers is packed once
                torch.ops.picospec_kernels.pack_(m.weight.data)
                packed.add(ptr)
            m.__class__ = RowStreamLinear
            if ptr in embeddings:
                embeddings[ptr].__class__ = PackedEmbedding
    converted = sum(type(m) is RowStreamLinear for m in linears)
    return f"{why}: {converted} of {len(linears)} linear layers"


def restore_linears(model: nn.Module) -> int:
    """Undo accelerate_linears (torch's layout and stock kernels). Returns how many layers changed."""
    changed, restored = 0, set()
    with torch.no_grad():
        for m in model.modules():
            if type(m) in (RowStreamLinear, PackedEmbedding):
                if m.weight.data_ptr() not in restored:
                    torch.ops.picospec_kernels.unpack_(m.weight.data)
                    restored.add(m.weight.data_ptr())
                changed += type(m) is RowStreamLinear
                m.__class__ = nn.Linear if type(m) is RowStreamLinear else nn.Embedding
    return changed

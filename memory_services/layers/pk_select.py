"""Product-key slot selection on CPU: one fused pass per (token, head) in a small C++ kernel.

``torch.topk`` on CPU spends ~2 µs per row (8,192 rows of 512 sub-key scores at 1,024 tokens and
4 heads: ~17 ms, a third of the layer's forward). The selection here keeps a sorted buffer of
the k best per half (blocks of 16 scores whose maximum cannot enter are skipped), then scores
only the candidate pairs that can reach the top-k (see ``product_key._candidate_pairs``) and
returns the winners' sub-key ranks and scores. Exact: the same slots as the torch path for
scores without ties. Compiled once per machine with torch's own extension builder (g++ and
ninja, as DeepSpeed's CPU ops are); without a compiler the torch path is used and says so.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading

import torch

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <functional>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

template <typename T>
using acc_t = typename std::conditional<std::is_same<T, double>::value, double, float>::type;

inline uint32_t orderable(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Lower bound for the k-th largest of a row: with ``block = n / k`` there are >= k blocks, each
// holding an element >= the smallest block maximum, so only elements >= it can be in the top-k.
template <typename T, typename A>
A block_bound(const T* row, int64_t n, int64_t k) {
  const int64_t block = std::max<int64_t>(1, n / k);
  A thr = std::numeric_limits<A>::infinity();
  for (int64_t b = 0; b < n; b += block) {
    A m = -std::numeric_limits<A>::infinity();
    const int64_t end = std::min(n, b + block);
    for (int64_t u = b; u < end; ++u) m = std::max(m, static_cast<A>(row[u]));
    thr = std::min(thr, m);
  }
  return thr;
}

// The k best of ``c`` (value bits, index) candidates in index order, written best first: the exact
// k-th largest bit pattern by bisection on counts (vectorizes), the winners taken branch-free
// (ties: lower index first), then ranked by all-pairs comparison of packed keys (k*k compares,
// no data-dependent branches).
inline void best_k(const uint32_t* bits, const int32_t* index, int64_t c, int64_t k, int64_t* out_i,
                   std::vector<uint64_t>& keys) {
  uint64_t lo = 0, hi = 0xFFFFFFFFull;  // invariant: count(bits >= lo) >= k
  while (lo < hi) {
    const uint32_t mid = static_cast<uint32_t>((lo + hi + 1) / 2);
    int64_t cnt = 0;
    for (int64_t q = 0; q < c; ++q) cnt += bits[q] >= mid;
    if (cnt >= k) lo = mid; else hi = mid - 1;
  }
  const uint32_t kth = static_cast<uint32_t>(lo);
  int64_t above = 0;
  for (int64_t q = 0; q < c; ++q) above += bits[q] > kth;
  int64_t m = 0, ties = k - above;
  for (int64_t q = 0; q < c; ++q) {
    const bool take = bits[q] > kth || (bits[q] == kth && ties > 0);
    ties -= bits[q] == kth && take;
    keys[m] = (static_cast<uint64_t>(bits[q]) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index[q]));
    m += take;
  }
  for (int64_t a = 0; a < k; ++a) {
    int64_t rank = 0;
    for (int64_t b = 0; b < k; ++b) rank += keys[b] > keys[a];
    out_i[rank] = 0xFFFFFFFFu - static_cast<uint32_t>(keys[a] & 0xFFFFFFFFu);
  }
}

struct Scratch {
  std::vector<int32_t> index;
  std::vector<uint32_t> bits;
  std::vector<uint64_t> keys;
  explicit Scratch(int64_t n) : index(n + 16), bits(n + 16), keys(n + 16) {}
};

#if defined(__AVX512F__)
template <typename T> inline __m512 load16(const T* p);
template <> inline __m512 load16<float>(const float* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <typename T> struct HasLoad16 : std::false_type {};
template <> struct HasLoad16<float> : std::true_type {};
template <> struct HasLoad16<c10::BFloat16> : std::true_type {};

inline __m512i orderable16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __mmask16 neg = _mm512_cmplt_epi32_mask(u, _mm512_setzero_si512());
  return _mm512_mask_xor_epi32(_mm512_or_si512(u, _mm512_set1_epi32(0x80000000)), neg, u, _mm512_set1_epi32(-1));
}

// The same bound with 16 lanes: split the row into k/16 parts; lane l of part p covers every 16th
// element of that part, so the k lane maxima come from k disjoint groups.
template <typename T>
int64_t candidates16(const T* row, int64_t n, int64_t k, Scratch& s) {
  const int64_t parts = k / 16, per = n / parts;
  __m512 low = _mm512_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t p = 0; p < parts; ++p) {
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (int64_t u = p * per; u < (p + 1) * per; u += 16) m = _mm512_max_ps(m, load16(row + u));
    low = _mm512_min_ps(low, m);
  }
  const __m512 thr = _mm512_set1_ps(_mm512_reduce_min_ps(low));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t c = 0;
  for (int64_t u = 0; u < n; u += 16) {
    const __m512 v = load16(row + u);
    const __mmask16 keep = _mm512_cmp_ps_mask(v, thr, _CMP_GE_OQ);
    _mm512_mask_compressstoreu_epi32(s.bits.data() + c, keep, orderable16(v));
    _mm512_mask_compressstoreu_epi32(s.index.data() + c, keep, _mm512_add_epi32(lane, _mm512_set1_epi32(u)));
    c += __builtin_popcount(keep);
  }
  return c;
}
#endif

// Top-k of one row, best first (ties: lower index first).
template <typename T, typename A>
void top_row(const T* row, int64_t n, int64_t k, A* out_v, int64_t* out_i, Scratch& s) {
#if defined(__AVX512F__)
  if constexpr (HasLoad16<T>::value) {
    if (k % 16 == 0 && n % k == 0) {
      best_k(s.bits.data(), s.index.data(), candidates16(row, n, k, s), k, out_i, s.keys);
      for (int64_t q = 0; q < k; ++q) out_v[q] = static_cast<A>(row[out_i[q]]);
      return;
    }
  }
#endif
  const A thr = block_bound<T, A>(row, n, k);
  int64_t c = 0;
  for (int64_t u = 0; u < n; ++u) {  // branch-free compaction of the candidates
    s.index[c] = u;
    c += static_cast<A>(row[u]) >= thr;
  }
  if constexpr (std::is_same<A, float>::value) {
    for (int64_t q = 0; q < c; ++q) s.bits[q] = orderable(static_cast<float>(row[s.index[q]]));
    best_k(s.bits.data(), s.index.data(), c, k, out_i, s.keys);
  } else {  // double scores (exactness tests): a plain partial sort
    std::vector<std::pair<A, int64_t>> kv(c);
    for (int64_t q = 0; q < c; ++q) kv[q] = {static_cast<A>(row[s.index[q]]), -s.index[q]};
    std::partial_sort(kv.begin(), kv.begin() + k, kv.end(), std::greater<std::pair<A, int64_t>>());
    for (int64_t q = 0; q < k; ++q) out_i[q] = -kv[q].second;
  }
  for (int64_t q = 0; q < k; ++q) out_v[q] = static_cast<A>(row[out_i[q]]);
}

template <typename T, typename A = acc_t<T>>
void select(const T* scores, int64_t heads, int64_t n, int64_t n_keys, int64_t k,
            const int64_t* ci, const int64_t* cj, int64_t pairs,
            int64_t* out_i, int64_t* out_j, A* out_s) {
  at::parallel_for(0, heads * n, 64, [&](int64_t begin, int64_t end) {
    std::vector<A> av(k), bv(k), sv(k), pv(pairs);
    std::vector<int64_t> ai(k), bi(k), best(k);
    Scratch scratch(std::max(n_keys, pairs));
    for (int64_t r = begin; r < end; ++r) {
      const int64_t h = r / n, tok = r % n;
      top_row<T, A>(scores + ((2 * h) * n + tok) * n_keys, n_keys, k, av.data(), ai.data(), scratch);
      top_row<T, A>(scores + ((2 * h + 1) * n + tok) * n_keys, n_keys, k, bv.data(), bi.data(), scratch);
      for (int64_t p = 0; p < pairs; ++p) pv[p] = av[ci[p]] + bv[cj[p]];
      top_row<A, A>(pv.data(), pairs, k, sv.data(), best.data(), scratch);
      int64_t* oi = out_i + r * k;
      int64_t* oj = out_j + r * k;
      A* os = out_s + r * k;
      for (int64_t q = 0; q < k; ++q) {
        const int64_t p = best[q];
        oi[q] = ai[ci[p]];
        oj[q] = bi[cj[p]];
        os[q] = pv[p];
      }
    }
  });
}

}  // namespace

std::vector<at::Tensor> pk_select(at::Tensor scores, at::Tensor ci, at::Tensor cj, int64_t k) {
  TORCH_CHECK(scores.dim() == 3 && scores.size(0) % 2 == 0, "scores must be (heads*2, tokens, n_keys)");
  TORCH_CHECK(k >= 1 && k <= scores.size(2), "k must be in 1..n_keys");
  scores = scores.contiguous();
  ci = ci.contiguous();
  cj = cj.contiguous();
  const int64_t heads = scores.size(0) / 2, n = scores.size(1), n_keys = scores.size(2);
  auto opts = scores.options();
  at::Tensor oi = at::empty({heads, n, k}, opts.dtype(at::kLong));
  at::Tensor oj = at::empty({heads, n, k}, opts.dtype(at::kLong));
  const bool dbl = scores.scalar_type() == at::kDouble;
  at::Tensor os = at::empty({heads, n, k}, opts.dtype(dbl ? at::kDouble : at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, scores.scalar_type(), "pk_select", [&] {
    using A = acc_t<scalar_t>;
    select<scalar_t>(scores.data_ptr<scalar_t>(), heads, n, n_keys, k, ci.data_ptr<int64_t>(),
                     cj.data_ptr<int64_t>(), ci.numel(), oi.data_ptr<int64_t>(), oj.data_ptr<int64_t>(),
                     os.data_ptr<A>());
  });
  return {oi, oj, os};
}
"""

_state: dict[str, object] = {}
_lock = threading.Lock()


def _cpu_tag() -> str:
    """Part of the build name: a binary built with -march=native must only load on the same kind of CPU."""
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = "unknown"
    return hashlib.sha1((flags + torch.__version__).encode()).hexdigest()[:10]


def _build():
    """Compile (or load the cached build of) the op. torch's own build lock is a file that a process
    killed mid-compile leaves behind, and every later build then waits on it for ever; an fcntl lock,
    which the kernel drops with its holder, guards the build instead, and a baton found while holding
    it is stale by construction."""
    from torch.utils.cpp_extension import load_inline

    from trainmem.native import extensions_dir

    name = f"trainmem_pk_select_{_cpu_tag()}"
    build_dir = os.path.join(extensions_dir(), name)
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "trainmem.lock"), "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            os.unlink(os.path.join(build_dir, "lock"))
        except FileNotFoundError:
            pass
        module = load_inline(name=name, cpp_sources=_SOURCE, functions=["pk_select"], build_directory=build_dir,
                             extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"],
                             verbose=False)
    return module.pk_select


def kernel():
    """The compiled selection op, or None when it cannot be built here (the torch path is used)."""
    if "op" in _state:
        return _state["op"]
    with _lock:
        if "op" not in _state:
            try:
                _state["op"] = _build()
            except Exception as e:  # no compiler, or a failed build: correct but slower
                log.warning("product-key CPU kernel unavailable (%s); using torch.topk", str(e).splitlines()[0][:200])
                _state["op"] = None
    return _state["op"]


def select(scores: torch.Tensor, ci: torch.Tensor, cj: torch.Tensor, k: int):
    """(heads*2, N, n_keys) scores → (i, j, summed score), each (heads, N, k), best first; None if no kernel."""
    op = kernel()
    if op is None or scores.device.type != "cpu":
        return None
    return op(scores.detach(), ci, cj, k)

// The public calls: cut a segment into fixed chunks, run the chunk loops on the pool, reduce.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

#include "convert.hpp"
#include "ferret_core/ferret_core.hpp"
#include "kernels.hpp"
#include "philox.hpp"
#include "thread_pool.hpp"
#include "tree.hpp"

namespace ferret {
namespace {

using detail::kChunk;

int default_threads() {
  if (const char* env = std::getenv("FERRET_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
#ifdef __linux__
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return std::max(1u, std::thread::hardware_concurrency());
}

std::atomic<int> g_threads{default_threads()};
std::atomic<bool> g_force_portable{false};

bool cpu_has_avx2() {
#if defined(FERRET_HAVE_AVX2_BUILD) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

const detail::ChunkKernels& kernels_for(Basis basis) {
  if (basis == Basis::gaussian) return detail::kGaussian;
#ifdef FERRET_HAVE_AVX2_BUILD
  if (cpu_has_avx2() && !g_force_portable.load()) return detail::kRademacherAvx2;
#endif
  return detail::kRademacherPortable;
}

struct Chunks {
  int64_t first, count;
  Chunks(int64_t start, int64_t n) : first(start / kChunk), count(n > 0 ? (start + n - 1) / kChunk - start / kChunk + 1 : 0) {}
  int64_t lo(int64_t i, int64_t start) const { return std::max(start, (first + i) * kChunk); }
  int64_t hi(int64_t i, int64_t start, int64_t n) const { return std::min(start + n, (first + i + 1) * kChunk); }
};

// Small jobs stay on the calling thread: waking the pool costs more than they do.
int threads_for(int64_t n, int n_coords) {
  return int64_t(n) * std::max(n_coords, 1) < (int64_t(1) << 17) ? 1 : g_threads.load();
}

}  // namespace

namespace detail {
bool use_avx2() { return cpu_has_avx2() && !g_force_portable.load(); }
}  // namespace detail

Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  Words4 r{{c0, c1, c2, c3}};
  detail::philox(r.w, k0, k1);
  return r;
}

void compress(const void* x, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis, int n_coords,
              double* gamma, const void* base) {
  if (n <= 0 || n_coords <= 0) return;
  const Chunks chunks(start, n);
  const auto& k = kernels_for(basis);
  std::vector<double> partials(size_t(chunks.count) * n_coords);
  detail::parallel_for(chunks.count, threads_for(n, n_coords), [&](int64_t i) {
    const int64_t lo = chunks.lo(i, start), hi = chunks.hi(i, start, n);
    double* partial = &partials[size_t(i) * n_coords];
    if (!base) {
      k.compress(x, dtype, start, lo, hi, seed, n_coords, partial);
      return;
    }
    std::vector<float> window(size_t(hi - lo));  // this chunk of x - base: one window, never the whole
    detail::read_elements(window.data(), x, base, dtype, lo - start, hi - lo);
    k.compress(window.data(), DType::f32, lo, lo, hi, seed, n_coords, partial);
  });
  // The chunks are aligned windows of the block: their partials continue the spec's tree.
  detail::PairwiseTree tree(n_coords);
  for (int64_t i = 0; i < chunks.count; i++) tree.add(chunks.first + i, &partials[size_t(i) * n_coords]);
  std::vector<double> segment(n_coords);
  tree.root(segment.data());
  for (int c = 0; c < n_coords; c++) gamma[c] += segment[c];
}

void reconstruct(void* out, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis, const float* gamma,
                 int n_coords, float scale) {
  if (n <= 0 || n_coords <= 0) return;
  const Chunks chunks(start, n);
  const auto& k = kernels_for(basis);
  detail::parallel_for(chunks.count, threads_for(n, n_coords), [&](int64_t i) {
    k.reconstruct(out, dtype, start, chunks.lo(i, start), chunks.hi(i, start, n), seed, gamma, n_coords, scale);
  });
}

void perturb(void* theta, DType dtype, int64_t n, int64_t start, uint64_t seed, Basis basis, float eps) {
  // acc = 0 + v_0 * 1 is exactly v_0, so this is theta + eps * v_0 with the spec's rounding.
  const float one = 1.0f;
  reconstruct(theta, dtype, n, start, seed, basis, &one, 1, eps);
}

// The spec's order: the pairwise tree over the fp64 squares. Squares are never -0, so a tree
// padded with zeros is the tree with absent nodes: each kChunk-aligned chunk is one subtree.
namespace {

// The tree over the fp64 squares of chunk c (kChunk elements) of x.
double chunk_squares(const void* x, DType dtype, int64_t n, int64_t c, const void* base) {
  const int64_t lo = c * kChunk, len = std::min(n, lo + kChunk) - lo;
  const float* f32 = static_cast<const float*>(x) + lo;
  std::vector<float> converted;
  if (dtype != DType::f32 || base) {
    converted.resize(size_t(len));
    detail::read_elements(converted.data(), x, base, dtype, lo, len);
    f32 = converted.data();
  }
#ifdef FERRET_HAVE_AVX2_BUILD
  if (detail::use_avx2()) return detail::sum_squares_chunk_avx2(f32, len);
#endif
  return detail::sum_squares_chunk_portable(f32, len);
}

double tree_of(const double* partials, int64_t count) {
  detail::PairwiseTree tree(1);
  for (int64_t c = 0; c < count; c++) tree.add(c, &partials[c]);
  double total = 0.0;
  tree.root(&total);
  return total;
}

}  // namespace

double sum_squares(const void* x, DType dtype, int64_t n) {
  double total = 0.0;
  sum_squares_many(&x, &dtype, &n, 1, &total);
  return total;
}

void sum_squares_many(const void* const* xs, const DType* dtypes, const int64_t* ns, int count, double* out,
                      const void* const* bases) {
  std::vector<int64_t> first(size_t(count) + 1, 0);  // tensor t's chunks are tasks first[t] ..
  int64_t elements = 0;
  for (int t = 0; t < count; t++) {
    const int64_t n = std::max<int64_t>(ns[t], 0);
    first[size_t(t) + 1] = first[size_t(t)] + (n + kChunk - 1) / kChunk;
    elements += n;
  }
  std::vector<double> partials(size_t(first[size_t(count)]));
  detail::parallel_for(first[size_t(count)], threads_for(elements, 1), [&](int64_t task) {
    const int t = int(std::upper_bound(first.begin(), first.end(), task) - first.begin()) - 1;
    partials[size_t(task)] = chunk_squares(xs[t], dtypes[t], ns[t], task - first[size_t(t)], bases ? bases[t] : nullptr);
  });
  for (int t = 0; t < count; t++)
    out[t] = tree_of(partials.data() + first[size_t(t)], first[size_t(t) + 1] - first[size_t(t)]);
}

void set_num_threads(int n) { g_threads.store(n > 0 ? n : default_threads()); }
int num_threads() { return g_threads.load(); }

const char* simd_level() { return cpu_has_avx2() && !g_force_portable.load() ? "avx2" : "portable"; }

bool force_portable(bool on) { return g_force_portable.exchange(on); }

}  // namespace ferret

// ferret._core: the Python face of ferret_core. Buffers come in through nanobind's ndarray
// (NumPy arrays directly, torch CPU tensors through DLPack), never copied; the GIL is released
// while the core runs. Shape and layout checks belong to python/ferret; this layer only maps
// dtypes and refuses what the core cannot read or write as given.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "ferret_core/ferret_core.hpp"

namespace nb = nanobind;

namespace {

using Input = nb::ndarray<nb::ro, nb::device::cpu, nb::c_contig>;
using Output = nb::ndarray<nb::device::cpu, nb::c_contig>;

// A buffer taken exactly as it is. Never a converted copy: a write into one would be lost (a
// strided array or a non-contiguous tensor), so those are refused. Never a torch tensor with its
// negative or conjugate bit set: DLPack exports the storage without the bit, so the core would
// read and write the values negated.
template <class A>
A buffer(nb::handle obj, const char* what, const char* must) {
  for (const char* bit : {"is_neg", "is_conj"})
    if (nb::hasattr(obj, bit) && nb::cast<bool>(obj.attr(bit)()))
      throw nb::value_error((std::string(what) + " is a negated or conjugated view; pass .resolve_neg() / "
                             ".resolve_conj() or the tensor it views").c_str());
  try {
    return nb::cast<A>(obj, false);
  } catch (const nb::cast_error&) {
    throw nb::type_error((std::string(what) + " must be " + must).c_str());
  }
}

constexpr const char* kReadable = "a C-contiguous CPU array or tensor";
constexpr const char* kWritable =
    "a C-contiguous, writable CPU array or tensor (never a strided view: a write into a copy would be lost)";

Input input(nb::handle obj, const char* what) { return buffer<Input>(obj, what, kReadable); }
Output output(nb::handle obj, const char* what) { return buffer<Output>(obj, what, kWritable); }

template <class A>
std::vector<A> buffers(const std::vector<nb::handle>& objs, const char* what, A (*take)(nb::handle, const char*)) {
  std::vector<A> out;
  for (nb::handle obj : objs) out.push_back(take(obj, what));
  return out;
}

template <class A>
ferret::DType dtype_of(const A& a, const char* what) {
  const nb::dlpack::dtype dt = a.dtype();
  if (dt.lanes == 1 && dt.code == uint8_t(nb::dlpack::dtype_code::Float) && dt.bits == 32) return ferret::DType::f32;
  if (dt.lanes == 1 && dt.code == uint8_t(nb::dlpack::dtype_code::Float) && dt.bits == 16) return ferret::DType::f16;
  if (dt.lanes == 1 && dt.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.bits == 16) return ferret::DType::bf16;
  throw nb::type_error((std::string(what) + " must hold float32, bfloat16 or float16 elements").c_str());
}

ferret::Basis basis_of(int b) {
  if (b != 0 && b != 1) throw nb::value_error("basis must be 0 (rademacher) or 1 (gaussian)");
  return ferret::Basis(b);
}

// A segment's place in its block: from 0, and ending where an int64 index still reaches.
void check_start(int64_t start, int64_t n) {
  if (start < 0 || start > INT64_MAX - n) throw nb::value_error("start must be at least 0, with start + size in int64");
}

// The segments of one block: buffers with the block index of their first element.
template <class A>
std::vector<ferret::Segment> segments_of(const std::vector<A>& xs, const std::vector<int64_t>& starts,
                                         int64_t block_n, const char* what) {
  if (xs.size() != starts.size()) throw nb::value_error("give one start per segment");
  std::vector<ferret::Segment> segments;
  for (size_t s = 0; s < xs.size(); s++) {
    const int64_t n = int64_t(xs[s].size());
    if (starts[s] < 0 || starts[s] + n > block_n) throw nb::value_error("a segment lies outside its block");
    segments.push_back({const_cast<void*>(xs[s].data()), dtype_of(xs[s], what), n, starts[s]});
  }
  return segments;
}

// The buffers each segment's difference starts from (None: none), checked to match the segments.
std::vector<Input> bases_of(nb::handle objs, std::vector<ferret::Segment>& segments) {
  std::vector<Input> bases;
  if (objs.is_none()) return bases;
  bases = buffers(nb::cast<std::vector<nb::handle>>(objs), "the start", input);
  if (bases.size() != segments.size()) throw nb::value_error("give one start buffer per segment");
  for (size_t s = 0; s < bases.size(); s++) {
    if (int64_t(bases[s].size()) != segments[s].n || dtype_of(bases[s], "the start") != segments[s].dtype)
      throw nb::value_error("a start buffer has another size or dtype than its segment");
    segments[s].base = bases[s].data();
  }
  return bases;
}

}  // namespace

NB_MODULE(_core, m) {
  m.doc() = "ferret's compiled CPU core (seeded projections); use the ferret package, not this module.";

  m.def(
      "philox4x32_10",
      [](uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
        const auto r = ferret::philox4x32_10(c0, c1, c2, c3, k0, k1);
        return std::make_tuple(r.w[0], r.w[1], r.w[2], r.w[3]);
      },
      "One Philox4x32-10 evaluation; returns the four output words.");

  m.def(
      "compress",
      [](nb::handle x_obj, int64_t start, uint64_t seed, int basis, Output gamma, nb::handle base_obj) {
        Input x = input(x_obj, "the update");
        const auto dt = dtype_of(x, "the update");
        if (gamma.dtype() != nb::dtype<double>() || gamma.ndim() != 1) throw nb::type_error("gamma must be a 1-d float64 array");
        const auto b = basis_of(basis);
        check_start(start, int64_t(x.size()));
        std::vector<ferret::Segment> one{{const_cast<void*>(x.data()), dt, int64_t(x.size()), start}};
        const auto bases = bases_of(base_obj.is_none() ? base_obj : nb::handle(nb::make_tuple(base_obj)), one);
        nb::gil_scoped_release release;
        ferret::compress(x.data(), dt, int64_t(x.size()), start, seed, b, int(gamma.shape(0)),
                         static_cast<double*>(gamma.data()), one[0].base);
      },
      nb::arg("x"), nb::arg("start"), nb::arg("seed"), nb::arg("basis"), nb::arg("gamma").noconvert(),
      nb::arg("base") = nb::none(),
      "gamma[k] += <x, v_k> (with base: <x - base, v_k>) for the block elements start .. start + x.size - 1.");

  m.def(
      "reconstruct",
      [](nb::handle out_obj, int64_t start, uint64_t seed, int basis, Input gamma, float scale) {
        Output out = output(out_obj, "the output");
        const auto dt = dtype_of(out, "the output");
        if (gamma.dtype() != nb::dtype<float>() || gamma.ndim() != 1) throw nb::type_error("gamma must be a 1-d float32 array");
        const auto b = basis_of(basis);
        check_start(start, int64_t(out.size()));
        nb::gil_scoped_release release;
        ferret::reconstruct(out.data(), dt, int64_t(out.size()), start, seed, b, static_cast<const float*>(gamma.data()),
                            int(gamma.shape(0)), scale);
      },
      nb::arg("out"), nb::arg("start"), nb::arg("seed"), nb::arg("basis"), nb::arg("gamma").noconvert(),
      nb::arg("scale"), "In place: out += scale * sum_k gamma[k] v_k, in the spec's order and rounding.");

  m.def(
      "perturb",
      [](nb::handle theta_obj, int64_t start, uint64_t seed, int basis, float eps) {
        Output theta = output(theta_obj, "the parameters");
        const auto dt = dtype_of(theta, "the parameters");
        const auto b = basis_of(basis);
        check_start(start, int64_t(theta.size()));
        nb::gil_scoped_release release;
        ferret::perturb(theta.data(), dt, int64_t(theta.size()), start, seed, b, eps);
      },
      nb::arg("theta"), nb::arg("start"), nb::arg("seed"), nb::arg("basis"), nb::arg("eps"),
      "In place: theta += eps * v_0(seed).");

  m.def(
      "srht_rows",
      [](uint64_t seed, int64_t n, nb::ndarray<int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig> rows) {
        if (int64_t(rows.shape(0)) > n) throw nb::value_error("more rows asked for than the block has");
        nb::gil_scoped_release release;
        ferret::srht_rows(seed, n, int64_t(rows.shape(0)), rows.data());
      },
      nb::arg("seed"), nb::arg("n"), nb::arg("rows").noconvert(),
      "rows[k] = the first rows.size rows of the block's seeded permutation of [0, n).");

  m.def(
      "srht_compress",
      [](std::vector<nb::handle> x_objs, std::vector<int64_t> starts, int64_t block_n, uint64_t seed, int log2_size,
         nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig> coords, nb::handle base_objs) {
        const auto xs = buffers(x_objs, "the update", input);
        auto segments = segments_of(xs, starts, block_n, "the update");
        const auto bases = bases_of(base_objs, segments);
        nb::gil_scoped_release release;
        ferret::srht_compress(segments.data(), int(segments.size()), block_n, seed, log2_size,
                              int64_t(coords.shape(0)), coords.data());
      },
      nb::arg("xs"), nb::arg("starts"), nb::arg("block_n"), nb::arg("seed"), nb::arg("log2_size"),
      nb::arg("coords").noconvert(), nb::arg("bases") = nb::none(),
      "coords[k] = SRHT coordinate k of the block the segments (minus their bases, if given) make up.");

  m.def(
      "srht_reconstruct",
      [](std::vector<nb::handle> out_objs, std::vector<int64_t> starts, int64_t block_n, uint64_t seed, int log2_size,
         nb::ndarray<const float, nb::ndim<1>, nb::device::cpu, nb::c_contig> coords, float scale) {
        const auto outs = buffers(out_objs, "the output", output);
        const auto segments = segments_of(outs, starts, block_n, "the output");
        nb::gil_scoped_release release;
        ferret::srht_reconstruct(segments.data(), int(segments.size()), block_n, seed, log2_size, coords.data(),
                                 int64_t(coords.shape(0)), scale);
      },
      nb::arg("outs"), nb::arg("starts"), nb::arg("block_n"), nb::arg("seed"), nb::arg("log2_size"),
      nb::arg("coords").noconvert(), nb::arg("scale"),
      "In place: the segments += the SRHT estimate from coords, scaled (scale = alpha * n / m in fp32).");

  m.def(
      "dense_compress",
      [](std::vector<nb::handle> x_objs, std::vector<int64_t> starts, int64_t block_n, uint64_t seed, int log2_size,
         int64_t slot, int64_t slots, nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig> coords,
         nb::handle base_objs) {
        const auto xs = buffers(x_objs, "the update", input);
        auto segments = segments_of(xs, starts, block_n, "the update");
        const auto bases = bases_of(base_objs, segments);
        nb::gil_scoped_release release;
        ferret::dense_compress(segments.data(), int(segments.size()), seed, log2_size, slot, slots,
                               int64_t(coords.shape(0)), coords.data());
      },
      nb::arg("xs"), nb::arg("starts"), nb::arg("block_n"), nb::arg("seed"), nb::arg("log2_size"), nb::arg("slot"),
      nb::arg("slots"), nb::arg("coords").noconvert(), nb::arg("bases") = nb::none(),
      "coords[k] = dense Hadamard coordinate k (slot of slots) of the block the segments make up.");

  m.def(
      "dense_compress_many",
      [](std::vector<nb::tuple> jobs) {
        std::vector<std::vector<Input>> inputs, bases;
        std::vector<std::vector<ferret::Segment>> segments;
        std::vector<ferret::DenseBlock> blocks;
        inputs.reserve(jobs.size());
        segments.reserve(jobs.size());
        for (const nb::tuple& job : jobs) {
          if (job.size() != 8 && job.size() != 9)
            throw nb::value_error("a job is (xs, starts, block_n, seed, log2_size, slot, slots, coords[, bases])");
          inputs.push_back(buffers(nb::cast<std::vector<nb::handle>>(job[0]), "the update", input));
          segments.push_back(segments_of(inputs.back(), nb::cast<std::vector<int64_t>>(job[1]),
                                         nb::cast<int64_t>(job[2]), "the update"));
          bases.push_back(bases_of(job.size() == 9 ? job[8] : nb::none(), segments.back()));
          auto coords = nb::cast<nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[7], false);
          blocks.push_back({segments.back().data(), int(segments.back().size()), nb::cast<uint64_t>(job[3]),
                            nb::cast<int>(job[4]), nb::cast<int64_t>(job[5]), nb::cast<int64_t>(job[6]),
                            int64_t(coords.shape(0)), coords.data()});
        }
        nb::gil_scoped_release release;
        ferret::dense_compress_many(blocks.data(), int(blocks.size()));
      },
      nb::arg("jobs"),
      "dense_compress for every (xs, starts, block_n, seed, log2_size, slot, slots, coords) job at once, on one pool.");

  m.def(
      "dense_fold_many",
      [](std::vector<nb::tuple> jobs) {
        std::vector<std::vector<Input>> inputs, bases;
        std::vector<std::vector<ferret::Segment>> segments;
        std::vector<ferret::DenseBlock> blocks;
        std::vector<float*> folds;
        inputs.reserve(jobs.size());
        segments.reserve(jobs.size());
        for (const nb::tuple& job : jobs) {
          if (job.size() != 7 && job.size() != 8)
            throw nb::value_error("a job is (xs, starts, block_n, seed, log2_size, fold, squares[, bases])");
          inputs.push_back(buffers(nb::cast<std::vector<nb::handle>>(job[0]), "the update", input));
          segments.push_back(segments_of(inputs.back(), nb::cast<std::vector<int64_t>>(job[1]),
                                         nb::cast<int64_t>(job[2]), "the update"));
          bases.push_back(bases_of(job.size() == 8 ? job[7] : nb::none(), segments.back()));
          const int log2_size = nb::cast<int>(job[4]);
          auto fold = nb::cast<nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[5], false);
          if (log2_size < 0 || log2_size > 22 || int64_t(fold.shape(0)) != (int64_t(1) << log2_size))
            throw nb::value_error("a fold holds 2^log2_size floats");
          double* squares = nullptr;
          if (!job[6].is_none()) {
            auto sq = nb::cast<nb::ndarray<double, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[6], false);
            if (sq.shape(0) != segments.back().size()) throw nb::value_error("squares holds one value per segment");
            squares = sq.data();
          }
          blocks.push_back({segments.back().data(), int(segments.back().size()), nb::cast<uint64_t>(job[3]), log2_size,
                            0, 1, 0, nullptr, squares});
          folds.push_back(fold.data());
        }
        nb::gil_scoped_release release;
        ferret::dense_fold_many(blocks.data(), int(blocks.size()), folds.data());
      },
      nb::arg("jobs"),
      "Each (xs, starts, block_n, seed, log2_size, fold, squares) job's dense Hadamard fold into fold, and with "
      "squares (None, or one fp64 per segment, each starting on a chunk) the segments' sums of squares.");

  m.def(
      "dense_pick_many",
      [](std::vector<nb::tuple> jobs) {
        std::vector<ferret::DenseBlock> blocks;
        std::vector<float*> folds;
        for (const nb::tuple& job : jobs) {
          if (job.size() != 6) throw nb::value_error("a job is (seed, log2_size, slot, slots, fold, coords)");
          const int log2_size = nb::cast<int>(job[1]);
          auto fold = nb::cast<nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[4], false);
          auto coords = nb::cast<nb::ndarray<float, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[5], false);
          if (log2_size < 0 || log2_size > 22 || int64_t(fold.shape(0)) != (int64_t(1) << log2_size))
            throw nb::value_error("a fold holds 2^log2_size floats");
          blocks.push_back({nullptr, 0, nb::cast<uint64_t>(job[0]), log2_size, nb::cast<int64_t>(job[2]),
                            nb::cast<int64_t>(job[3]), int64_t(coords.shape(0)), coords.data(), nullptr});
          folds.push_back(fold.data());
        }
        nb::gil_scoped_release release;
        ferret::dense_pick_many(blocks.data(), int(blocks.size()), folds.data());
      },
      nb::arg("jobs"),
      "Each (seed, log2_size, slot, slots, fold, coords) job: fold transformed in place, coords[k] = its row k of "
      "the slot.");

  m.def(
      "dense_reconstruct",
      [](std::vector<nb::handle> out_objs, std::vector<int64_t> starts, int64_t block_n, uint64_t seed, int log2_size,
         int64_t slot, int64_t slots, nb::ndarray<const float, nb::ndim<1>, nb::device::cpu, nb::c_contig> coords,
         float scale) {
        const auto outs = buffers(out_objs, "the output", output);
        const auto segments = segments_of(outs, starts, block_n, "the output");
        nb::gil_scoped_release release;
        ferret::dense_reconstruct(segments.data(), int(segments.size()), seed, log2_size, slot, slots,
                                  coords.data(), int64_t(coords.shape(0)), scale);
      },
      nb::arg("outs"), nb::arg("starts"), nb::arg("block_n"), nb::arg("seed"), nb::arg("log2_size"), nb::arg("slot"),
      nb::arg("slots"), nb::arg("coords").noconvert(), nb::arg("scale"),
      "In place: the segments += the dense Hadamard estimate from coords, scaled (scale = alpha / m in fp32).");

  m.def(
      "dense_reconstruct_many",
      [](std::vector<nb::tuple> jobs) {
        std::vector<std::vector<Output>> outputs;
        std::vector<std::vector<ferret::Segment>> segments;
        std::vector<ferret::DenseRebuild> blocks;
        outputs.reserve(jobs.size());
        segments.reserve(jobs.size());
        std::vector<nb::ndarray<const int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig>> row_arrays;
        row_arrays.reserve(jobs.size());
        for (const nb::tuple& job : jobs) {
          if (job.size() != 9 && job.size() != 10)
            throw nb::value_error("a job is (outs, starts, block_n, seed, log2_size, slot, slots, coords, scale[, rows])");
          outputs.push_back(buffers(nb::cast<std::vector<nb::handle>>(job[0]), "the output", output));
          segments.push_back(segments_of(outputs.back(), nb::cast<std::vector<int64_t>>(job[1]),
                                         nb::cast<int64_t>(job[2]), "the output"));
          auto coords = nb::cast<nb::ndarray<const float, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[7], false);
          const int64_t* rows = nullptr;
          if (job.size() == 10 && !job[9].is_none()) {
            row_arrays.push_back(
                nb::cast<nb::ndarray<const int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig>>(job[9], false));
            if (row_arrays.back().shape(0) != coords.shape(0)) throw nb::value_error("give one row per coordinate");
            rows = row_arrays.back().data();
          }
          blocks.push_back({segments.back().data(), int(segments.back().size()), nb::cast<uint64_t>(job[3]),
                            nb::cast<int>(job[4]), nb::cast<int64_t>(job[5]), nb::cast<int64_t>(job[6]), coords.data(),
                            int64_t(coords.shape(0)), nb::cast<float>(job[8]), rows});
        }
        nb::gil_scoped_release release;
        ferret::dense_reconstruct_many(blocks.data(), int(blocks.size()));
      },
      nb::arg("jobs"),
      "dense_reconstruct for every (outs, starts, block_n, seed, log2_size, slot, slots, coords, scale) job at once.");

  m.def(
      "dense_rows",
      [](uint64_t seed, int log2_size, int64_t slot, int64_t slots,
         nb::ndarray<int64_t, nb::ndim<1>, nb::device::cpu, nb::c_contig> rows) {
        nb::gil_scoped_release release;
        ferret::dense_rows(seed, log2_size, slot, slots, int64_t(rows.shape(0)), rows.data());
      },
      nb::arg("seed"), nb::arg("log2_size"), nb::arg("slot"), nb::arg("slots"), nb::arg("rows").noconvert(),
      "rows[k] = row k of the slot of the dense Hadamard basis of size 2^log2_size.");

  m.def(
      "sum_squares",
      [](nb::handle x_obj) {
        Input x = input(x_obj, "the update");
        const auto dt = dtype_of(x, "the update");
        nb::gil_scoped_release release;
        return ferret::sum_squares(x.data(), dt, int64_t(x.size()));
      },
      nb::arg("x"), "Sum of squares in float64, independent of the thread count.");

  m.def(
      "sum_squares_many",
      [](std::vector<nb::handle> x_objs, nb::handle base_objs) {
        const auto xs = buffers(x_objs, "the update", input);
        std::vector<const void*> data;
        std::vector<ferret::DType> dtypes;
        std::vector<int64_t> ns;
        std::vector<ferret::Segment> segments;
        for (const auto& x : xs) {
          data.push_back(x.data());
          dtypes.push_back(dtype_of(x, "the update"));
          ns.push_back(int64_t(x.size()));
          segments.push_back({const_cast<void*>(x.data()), dtypes.back(), ns.back(), 0});
        }
        const auto bases = bases_of(base_objs, segments);
        std::vector<const void*> base_data;
        for (const auto& seg : segments) base_data.push_back(seg.base);
        std::vector<double> out(xs.size());
        {
          nb::gil_scoped_release release;
          ferret::sum_squares_many(data.data(), dtypes.data(), ns.data(), int(xs.size()), out.data(),
                                   bases.empty() ? nullptr : base_data.data());
        }
        return out;
      },
      nb::arg("xs"), nb::arg("bases") = nb::none(),
      "[sum_squares(x) for x in xs] (with bases: of x - base), all tensors' chunks on the pool at once.");

  m.def("set_num_threads", &ferret::set_num_threads, nb::arg("n"),
        "Threads for the core's loops; n <= 0 restores the default. The ferret package sets it before each "
        "call to ferret.num_threads() (torch's count unless ferret.set_num_threads overrides it).");
  m.def("num_threads", &ferret::num_threads, "Threads the core's loops use.");
  m.def("simd_level", &ferret::simd_level, "'avx2' or 'portable': the loops this CPU runs.");
  m.def("force_portable", &ferret::force_portable, nb::arg("on"),
        "Use the portable loops even on an AVX2 CPU (for tests); returns the previous setting.");
}

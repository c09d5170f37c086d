// Sequence-packing planner: assigns the samples of one epoch to bins of at most `max_tokens` tokens.
//
// Bit-identical to the plain-Python reference in fastllava/data/packing.py (`_plan_epoch_py`); the
// tests compare the two on random inputs, so any change here must be mirrored there.
//
// One epoch:
//   1. shuffle sample indices with Fisher-Yates driven by splitmix64, seeded from (seed, epoch);
//   2. cut the shuffled order into groups of `group_size` samples (an optimizer step, or a shuffle
//      buffer), the last group possibly shorter;
//   3. per group, find the smallest M such that longest-processing-time (each sample, longest first,
//      into the currently least-loaded of R*M bins) keeps every bin <= max_tokens (see
//      smallest_micro_steps for how M is searched);
//   4. order the group's bins by load (heaviest first) and deal them to (micro-step m, rank r) in a
//      snake so that each micro-step's R bins have similar loads and rank totals stay even.
//
// Output (flat, numpy): samples[n] sample indices bin after bin; bin_offsets[nbins + 1];
// group_bins[ngroups + 1] bin offsets of each group. Inside a group, bin m*R + r is micro-step m of
// rank r. No torch headers: this builds with pybind11 alone.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    state += 0x9E3779B97F4A7C15ULL;
    uint64_t z = state;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

// Seeds of consecutive epochs must give unrelated streams; multiplying by an odd constant and
// xoring keeps (seed, epoch) -> state injective for a fixed seed.
uint64_t epoch_state(uint64_t seed, uint64_t epoch) { return seed ^ ((epoch + 1) * 0xD1B54A32D192ED03ULL); }

std::vector<int64_t> shuffled_indices(int64_t n, uint64_t seed, uint64_t epoch) {
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  SplitMix64 rng{epoch_state(seed, epoch)};
  for (int64_t i = n - 1; i > 0; --i) {
    // Modulo bias is < 2^-40 for n < 2^24 and, above all, identical in the Python reference.
    int64_t j = static_cast<int64_t>(rng.next() % static_cast<uint64_t>(i + 1));
    std::swap(order[i], order[j]);
  }
  return order;
}

// Longest-processing-time into `nbins` bins. Returns false if some sample does not fit: the least
// loaded bin is the one with the most room, so then no bin could take it.
bool assign_lpt(const std::vector<int64_t>& sorted_lengths, int64_t nbins, int64_t max_tokens,
                std::vector<int64_t>& bin_of, std::vector<int64_t>& load) {
  using Entry = std::pair<int64_t, int64_t>;  // (load, bin); ties go to the lowest bin index
  std::priority_queue<Entry, std::vector<Entry>, std::greater<Entry>> heap;
  for (int64_t b = 0; b < nbins; ++b) heap.emplace(0, b);
  load.assign(nbins, 0);
  bin_of.resize(sorted_lengths.size());
  for (size_t k = 0; k < sorted_lengths.size(); ++k) {
    Entry top = heap.top();
    heap.pop();
    int64_t new_load = top.first + sorted_lengths[k];
    if (new_load > max_tokens) return false;
    bin_of[k] = top.second;
    load[top.second] = new_load;
    heap.emplace(new_load, top.second);
  }
  return true;
}

// Smallest M (micro-steps) for which LPT fits the group into R*M bins, leaving that assignment in
// bin_of/load. Tries the token lower bound, then gallops (+1, +2, +4, ...) and bisects, so a bad
// lower bound costs O(log) attempts rather than O(n). M = ceil(g / R) always fits (one sample per
// bin). LPT feasibility is monotone in M in practice though not in theory; the bisection then
// returns a feasible M that may not be the very smallest, identically in both implementations.
int64_t smallest_micro_steps(const std::vector<int64_t>& sorted_lengths, int64_t total, int64_t num_ranks,
                             int64_t max_tokens, std::vector<int64_t>& bin_of, std::vector<int64_t>& load) {
  const int64_t g = static_cast<int64_t>(sorted_lengths.size());
  const int64_t capacity = num_ranks * max_tokens;
  const int64_t upper = std::max<int64_t>(1, (g + num_ranks - 1) / num_ranks);
  int64_t lo = 0;  // largest M known not to fit (0: none tried)
  int64_t hi = std::min(upper, std::max<int64_t>(1, (total + capacity - 1) / capacity));
  int64_t step = 1;
  while (!assign_lpt(sorted_lengths, hi * num_ranks, max_tokens, bin_of, load)) {
    lo = hi;
    hi = std::min(upper, hi + step);
    step *= 2;
  }
  if (hi - lo <= 1) return hi;  // the last attempt was at hi and fitted
  while (hi - lo > 1) {
    int64_t mid = lo + (hi - lo) / 2;
    if (assign_lpt(sorted_lengths, mid * num_ranks, max_tokens, bin_of, load))
      hi = mid;
    else
      lo = mid;
  }
  assign_lpt(sorted_lengths, hi * num_ranks, max_tokens, bin_of, load);
  return hi;
}

std::tuple<py::array_t<int64_t>, py::array_t<int64_t>, py::array_t<int64_t>> plan_epoch(
    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths_in, int64_t group_size,
    int64_t num_ranks, int64_t max_tokens, uint64_t seed, uint64_t epoch) {
  if (lengths_in.ndim() != 1) throw std::invalid_argument("lengths must be 1-D");
  if (group_size < 1 || num_ranks < 1 || max_tokens < 1)
    throw std::invalid_argument("group_size, num_ranks and max_tokens must be >= 1");
  const int64_t n = lengths_in.shape(0);
  const int64_t* lengths = lengths_in.data();
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] < 1 || lengths[i] > max_tokens)
      throw std::invalid_argument("sample " + std::to_string(i) + " has length " + std::to_string(lengths[i]) +
                                  ", outside [1, max_tokens=" + std::to_string(max_tokens) + "]");
  }

  std::vector<int64_t> samples_out;
  std::vector<int64_t> bin_offsets{0};
  std::vector<int64_t> group_bins{0};
  samples_out.reserve(n);

  {
    py::gil_scoped_release release;  // pure C++ in this block; lets loader threads run meanwhile
    const std::vector<int64_t> order = shuffled_indices(n, seed, epoch);
    std::vector<int64_t> pos, sorted_lengths, bin_of, load;
    for (int64_t start = 0; start < n; start += group_size) {
      const int64_t g = std::min(group_size, n - start);
      pos.resize(g);
      int64_t total = 0;
      for (int64_t p = 0; p < g; ++p) {
        pos[p] = p;
        total += lengths[order[start + p]];
      }
      // Longest first; equal lengths keep shuffled order so the result is a total order.
      std::sort(pos.begin(), pos.end(), [&](int64_t a, int64_t b) {
        int64_t la = lengths[order[start + a]], lb = lengths[order[start + b]];
        return la != lb ? la > lb : a < b;
      });
      sorted_lengths.resize(g);
      for (int64_t k = 0; k < g; ++k) sorted_lengths[k] = lengths[order[start + pos[k]]];

      const int64_t m = smallest_micro_steps(sorted_lengths, total, num_ranks, max_tokens, bin_of, load);
      const int64_t nbins = m * num_ranks;

      // Heaviest bins first, dealt in a snake over ranks: micro-step i's bins are sorted positions
      // i*R .. i*R+R-1, reversed on odd i.
      std::vector<int64_t> by_load(nbins);
      for (int64_t b = 0; b < nbins; ++b) by_load[b] = b;
      std::sort(by_load.begin(), by_load.end(),
                [&](int64_t a, int64_t b) { return load[a] != load[b] ? load[a] > load[b] : a < b; });
      std::vector<int64_t> slot_of(nbins);  // bin -> output slot m*R + r
      for (int64_t s = 0; s < nbins; ++s) {
        int64_t micro = s / num_ranks, k = s % num_ranks;
        int64_t rank = (micro % 2 == 0) ? k : num_ranks - 1 - k;
        slot_of[by_load[s]] = micro * num_ranks + rank;
      }
      // Counting sort of the group's samples by slot, keeping longest-first order inside a bin.
      std::vector<int64_t> count(nbins + 1, 0);
      for (int64_t k = 0; k < g; ++k) ++count[slot_of[bin_of[k]] + 1];
      for (int64_t s = 0; s < nbins; ++s) count[s + 1] += count[s];
      const size_t base = samples_out.size();
      samples_out.resize(base + g);
      std::vector<int64_t> cursor(count.begin(), count.end() - 1);
      for (int64_t k = 0; k < g; ++k) samples_out[base + cursor[slot_of[bin_of[k]]]++] = order[start + pos[k]];
      const int64_t off = bin_offsets.back();
      for (int64_t s = 1; s <= nbins; ++s) bin_offsets.push_back(off + count[s]);
      group_bins.push_back(group_bins.back() + nbins);
    }
  }

  auto to_numpy = [](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return {to_numpy(samples_out), to_numpy(bin_offsets), to_numpy(group_bins)};
}

py::array_t<int64_t> shuffle(int64_t n, uint64_t seed, uint64_t epoch) {
  std::vector<int64_t> order = shuffled_indices(n, seed, epoch);
  py::array_t<int64_t> a(static_cast<py::ssize_t>(n));
  std::copy(order.begin(), order.end(), a.mutable_data());
  return a;
}

}  // namespace

PYBIND11_MODULE(_packing, m) {
  m.doc() = "Sequence-packing planner (C++); see fastllava/data/packing.py for the Python API.";
  m.def("plan_epoch", &plan_epoch, py::arg("lengths"), py::arg("group_size"), py::arg("num_ranks"),
        py::arg("max_tokens"), py::arg("seed"), py::arg("epoch"),
        "-> (samples[n], bin_offsets[nbins+1], group_bins[ngroups+1]), all int64");
  m.def("shuffle", &shuffle, py::arg("n"), py::arg("seed"), py::arg("epoch"),
        "The epoch's sample order (Fisher-Yates over splitmix64), int64[n].");
}

// Branch-and-bound search for static memory allocation at a fixed capacity (MiniMalloc-style).
//
// Buffers live on [lower, upper) and need `size` bytes at an offset that is a multiple of
// `align`. The search only builds canonical solutions: buffers are placed in non-decreasing
// order of (offset, preorder rank), each at its lowest offset above the placed buffers it
// overlaps in time. Pruning, following Moffitt's MiniMalloc (ASPLOS 2023):
//   - dominance: skip a buffer whose offset is at or above the lowest possible top of any
//     unplaced buffer (that buffer would fit entirely below: an unnecessary gap);
//   - inference: for every section (set of buffers live at one instant), the section floor
//     plus the sizes of its unplaced buffers must stay within the capacity; the floor is the
//     top of the placed buffers there, raised to the least minimum offset of its unplaced ones;
//   - decomposition: once every buffer crossing a section boundary is placed, the two sides
//     are solved independently (also at the start, at instants where nothing crosses).
// Several static preorderings (W = lifetime width, A = area, T = largest section total, Z = size)
// are tried round robin under a node limit that doubles each round.
//
// Exposed to Python as `_memplan_search.solve(...)` (built by nncompile/solvers/packing_native.py).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

namespace py = pybind11;
using i64 = int64_t;

namespace {

enum Status { kFound = 0, kNotFound = 1, kDeadline = 2, kAborted = 3 };

constexpr i64 kUnplaced = -1;
constexpr i64 kInf = std::numeric_limits<i64>::max();

struct Key {
  i64 offset;  // the buffer's current minimum offset
  int rank;    // position in the partition's static preorder
  int buffer;
  bool operator<(const Key& o) const {
    if (offset != o.offset) return offset < o.offset;
    if (rank != o.rank) return rank < o.rank;
    return buffer < o.buffer;
  }
};

// One partition being searched: its section range, its buffers (unplaced when it was opened),
// and its unplaced buffers ordered by (minimum offset, rank) plus their lowest possible tops.
struct Partition {
  std::vector<int> buffers;
  int section_lo;  // half-open range of sections
  int section_hi;
  bool indexed;              // large partitions keep `order`/`tops` up to date incrementally;
  std::set<Key> order;       // small ones re-sort a copied list at every node (faster there)
  std::multiset<i64> tops;
};

struct Change {
  int index;
  i64 value;
};

// Range add / range max over sections (the unplaced bytes of each section).
class MaxTree {
 public:
  explicit MaxTree(const std::vector<i64>& values) : n_(std::max<int>(values.size(), 1)) {
    max_.assign(4 * n_, 0);
    add_.assign(4 * n_, 0);
    if (!values.empty()) Build(1, 0, n_, values);
  }
  void Add(int lo, int hi, i64 delta) { if (lo < hi) Add(1, 0, n_, lo, hi, delta); }
  i64 Max(int lo, int hi) const { return lo < hi ? Max(1, 0, n_, lo, hi) : std::numeric_limits<i64>::min(); }

 private:
  void Build(int node, int lo, int hi, const std::vector<i64>& values) {
    if (hi - lo == 1) { max_[node] = values[lo]; return; }
    const int mid = (lo + hi) / 2;
    Build(2 * node, lo, mid, values);
    Build(2 * node + 1, mid, hi, values);
    max_[node] = std::max(max_[2 * node], max_[2 * node + 1]);
  }
  void Add(int node, int lo, int hi, int qlo, int qhi, i64 delta) {
    if (qhi <= lo || hi <= qlo) return;
    if (qlo <= lo && hi <= qhi) { max_[node] += delta; add_[node] += delta; return; }
    const int mid = (lo + hi) / 2;
    Add(2 * node, lo, mid, qlo, qhi, delta);
    Add(2 * node + 1, mid, hi, qlo, qhi, delta);
    max_[node] = std::max(max_[2 * node], max_[2 * node + 1]) + add_[node];
  }
  i64 Max(int node, int lo, int hi, int qlo, int qhi) const {
    if (qhi <= lo || hi <= qlo) return std::numeric_limits<i64>::min();
    if (qlo <= lo && hi <= qhi) return max_[node];
    const int mid = (lo + hi) / 2;
    return std::max(Max(2 * node, lo, mid, qlo, qhi), Max(2 * node + 1, mid, hi, qlo, qhi)) + add_[node];
  }
  int n_;
  std::vector<i64> max_, add_;
};

class Search {
 public:
  Search(std::vector<i64> lower, std::vector<i64> upper, std::vector<i64> size,
         std::vector<i64> align, i64 capacity, double time_limit,
         std::vector<std::string> heuristics, int floor_limit, size_t indexed_min)
      : n_(static_cast<int>(size.size())), capacity_(capacity), lower_(std::move(lower)),
        upper_(std::move(upper)), size_(std::move(size)), align_(std::move(align)),
        heuristics_(std::move(heuristics)), floor_limit_(floor_limit), indexed_min_(indexed_min) {
    deadline_ = std::chrono::steady_clock::now() +
                std::chrono::microseconds(static_cast<i64>(time_limit * 1e6));
    Sweep();
  }

  // Returns the status; on kFound, `solution()` holds every offset.
  Status Solve() {
    offset_.assign(n_, kUnplaced);
    solution_.assign(n_, kUnplaced);
    min_offset_.assign(n_, 0);
    rank_.assign(n_, 0);
    floor_.assign(num_sections_, 0);
    stamp_.assign(num_sections_, 0);
    total_ = std::make_unique<MaxTree>(initial_total_);
    section_total_ = initial_total_;
    for (int b = 0; b < n_; ++b)
      if (size_[b] > capacity_) return kNotFound;
    std::vector<std::pair<int, int>> ranges = InitialRanges();
    std::vector<int> range_of_section(num_sections_, 0);
    for (size_t r = 0; r < ranges.size(); ++r)
      for (int s = ranges[r].first; s < ranges[r].second; ++s) range_of_section[s] = static_cast<int>(r);
    std::vector<std::vector<int>> members(ranges.size());
    for (int b = 0; b < n_; ++b) members[range_of_section[section_lo_[b]]].push_back(b);
    i64 node_limit = std::max<i64>(n_, 64);
    while (true) {
      node_limit *= 2;
      Status status = kFound;
      for (const std::string& heuristic : heuristics_) {
        heuristic_ = heuristic;
        nodes_left_ = heuristics_.size() > 1 ? node_limit : std::numeric_limits<i64>::max();
        status = kFound;
        for (size_t r = 0; r < ranges.size(); ++r) {
          status = SubSolve(members[r], ranges[r].first, ranges[r].second);
          if (status != kFound) break;
        }
        if (status != kAborted) return status;
      }
    }
  }

  const std::vector<i64>& solution() const { return solution_; }
  i64 nodes() const { return nodes_; }
  i64 backtracks() const { return backtracks_; }

 private:
  // Sections are the sets of buffers live just before each distinct end time (the maximal
  // cliques of the interval graph, plus a few subsets); each buffer spans a contiguous range.
  // Section member lists are kept only for problems small enough to use them (the
  // unplaced-floor inference); large ones keep the per-section totals only.
  void Sweep() {
    struct Event { i64 time; int kind; int buffer; };  // kind 0 = end, 1 = start
    std::vector<Event> events;
    events.reserve(2 * n_);
    for (int b = 0; b < n_; ++b) {
      events.push_back({lower_[b], 1, b});
      events.push_back({upper_[b], 0, b});
    }
    std::sort(events.begin(), events.end(), [](const Event& x, const Event& y) {
      if (x.time != y.time) return x.time < y.time;
      if (x.kind != y.kind) return x.kind < y.kind;
      return x.buffer < y.buffer;
    });
    const bool keep_members = n_ <= floor_limit_;
    section_lo_.assign(n_, 0);
    section_hi_.assign(n_, 0);
    overlaps_.assign(n_, {});
    std::vector<int> active;
    std::vector<int> where(n_, -1);
    i64 active_bytes = 0;
    num_sections_ = 0;
    i64 last_time = events.empty() ? 0 : events.front().time;
    for (const Event& e : events) {
      const int b = e.buffer;
      if (e.kind == 0) {
        if (last_time < e.time) {
          last_time = e.time;
          if (keep_members) sections_.push_back(active);
          initial_total_.push_back(active_bytes);
          ++num_sections_;
        }
        const int pos = where[b];
        where[active.back()] = pos;
        active[pos] = active.back();
        active.pop_back();
        where[b] = -1;
        active_bytes -= size_[b];
        section_hi_[b] = num_sections_;
      } else {
        for (int other : active) {
          overlaps_[b].push_back(other);
          overlaps_[other].push_back(b);
        }
        where[b] = static_cast<int>(active.size());
        active.push_back(b);
        active_bytes += size_[b];
        section_lo_[b] = num_sections_;
      }
    }
    cuts_.assign(std::max(num_sections_ - 1, 0), 0);
    for (int b = 0; b < n_; ++b)
      for (int s = section_lo_[b]; s + 1 < section_hi_[b]; ++s) ++cuts_[s];
  }

  // Section ranges separated by boundaries that no buffer crosses.
  std::vector<std::pair<int, int>> InitialRanges() const {
    std::vector<std::pair<int, int>> ranges;
    int lo = 0;
    for (int s = 0; s < num_sections_; ++s) {
      if (s + 1 == num_sections_ || cuts_[s] == 0) {
        ranges.push_back({lo, s + 1});
        lo = s + 1;
      }
    }
    return ranges;
  }

  // Ranks the (unplaced) buffers by the current heuristic and searches from offset 0.
  Status SubSolve(std::vector<int> buffers, int section_lo, int section_hi) {
    struct Pre { i64 width, area, total, size; int buffer; };
    std::vector<Pre> pre;
    pre.reserve(buffers.size());
    for (int b : buffers) {
      const i64 total = total_->Max(section_lo_[b], section_hi_[b]);
      const i64 width = upper_[b] - lower_[b];
      pre.push_back({width, width * size_[b], total, size_[b], b});
    }
    const std::string& h = heuristic_;
    std::sort(pre.begin(), pre.end(), [&h](const Pre& x, const Pre& y) {
      for (char c : h) {
        if (c == 'W' && x.width != y.width) return x.width > y.width;
        if (c == 'A' && x.area != y.area) return x.area > y.area;
        if (c == 'T' && x.total != y.total) return x.total > y.total;
        if (c == 'Z' && x.size != y.size) return x.size > y.size;
      }
      return x.buffer < y.buffer;
    });
    const bool indexed = pre.size() > indexed_min_;
    Partition partition{std::move(buffers), section_lo, section_hi, indexed, {}, {}};
    std::vector<int> saved_rank;
    std::vector<Key> ordering;
    saved_rank.reserve(pre.size());
    for (size_t r = 0; r < pre.size(); ++r) {
      const int b = pre[r].buffer;
      saved_rank.push_back(rank_[b]);
      rank_[b] = static_cast<int>(r);
      if (indexed) {
        partition.order.insert({min_offset_[b], rank_[b], b});
        partition.tops.insert(min_offset_[b] + size_[b]);
      } else {
        ordering.push_back({min_offset_[b], rank_[b], b});
      }
    }
    const Status status = Node(partition, &ordering, 0, 0);
    for (size_t r = 0; r < pre.size(); ++r) rank_[pre[r].buffer] = saved_rank[r];
    return status;
  }

  // One search node: try the unplaced buffers at or after (last_offset, last_rank) in
  // (minimum offset, rank) order. `previous` is the parent's list for small partitions.
  Status Node(Partition& partition, const std::vector<Key>* previous, i64 last_offset, int last_rank) {
    if (--nodes_left_ < 0) return kAborted;
    if ((++nodes_ & 15) == 0 && std::chrono::steady_clock::now() > deadline_) return kDeadline;
    if (partition.indexed) {
      if (partition.order.empty()) return Leaf(partition);
      const i64 min_top = *partition.tops.begin();
      auto it = partition.order.lower_bound({last_offset, last_rank, -1});
      while (it != partition.order.end()) {
        const Key key = *it;
        // a buffer at or above the lowest possible top of another would leave a needless gap;
        // the order is by offset, so every later candidate would too
        if (key.offset >= min_top) break;
        const Status status = Place(partition, nullptr, key);
        if (status != kNotFound) return status;
        it = partition.order.upper_bound(key);
      }
    } else {
      std::vector<Key> ordering;
      ordering.reserve(previous->size());
      for (const Key& key : *previous)
        if (offset_[key.buffer] == kUnplaced) ordering.push_back({min_offset_[key.buffer], key.rank, key.buffer});
      if (ordering.empty()) return Leaf(partition);
      std::sort(ordering.begin(), ordering.end());
      i64 min_top = kInf;
      for (const Key& key : ordering) min_top = std::min(min_top, key.offset + size_[key.buffer]);
      for (const Key& key : ordering) {
        if (key.offset < last_offset || (key.offset == last_offset && key.rank < last_rank)) continue;
        if (key.offset >= min_top) break;
        const Status status = Place(partition, &ordering, key);
        if (status != kNotFound) return status;
      }
    }
    ++backtracks_;
    return kNotFound;
  }

  Status Leaf(const Partition& partition) {
    for (int b : partition.buffers) solution_[b] = offset_[b];
    return kFound;
  }

  void Reorder(Partition& partition, int o, i64 new_offset) {
    if (!partition.indexed) {
      min_offset_[o] = new_offset;
      return;
    }
    partition.order.erase({min_offset_[o], rank_[o], o});
    partition.tops.erase(partition.tops.find(min_offset_[o] + size_[o]));
    min_offset_[o] = new_offset;
    partition.order.insert({new_offset, rank_[o], o});
    partition.tops.insert(new_offset + size_[o]);
  }

  // Places one buffer, propagates, recurses (through decomposition), then undoes everything.
  Status Place(Partition& partition, const std::vector<Key>* ordering, const Key& key) {
    const int b = key.buffer;
    const i64 off = key.offset;
    const i64 height = off + size_[b];
    const bool use_floor = !sections_.empty() && partition.buffers.size() <= static_cast<size_t>(floor_limit_);
    offset_[b] = off;
    if (partition.indexed) {
      partition.order.erase(key);
      partition.tops.erase(partition.tops.find(height));
    }
    // raise the minimum offsets of unplaced buffers that overlap b in time
    std::vector<Change> offset_changes;
    std::vector<int> affected;
    ++epoch_;
    for (int o : overlaps_[b]) {
      if (offset_[o] != kUnplaced || min_offset_[o] >= height) continue;
      offset_changes.push_back({o, min_offset_[o]});
      const i64 rem = height % align_[o];
      Reorder(partition, o, rem ? height + align_[o] - rem : height);
      if (!use_floor) continue;
      for (int s = section_lo_[o]; s < section_hi_[o]; ++s) {
        if (stamp_[s] != epoch_) {
          stamp_[s] = epoch_;
          affected.push_back(s);
        }
      }
    }
    // section floors and unplaced totals
    std::vector<Change> floor_changes;
    total_->Add(section_lo_[b], section_hi_[b], -size_[b]);
    bool feasible = off + total_->Max(partition.section_lo, partition.section_hi) <= capacity_;
    for (int s = section_lo_[b]; s < section_hi_[b]; ++s) {
      floor_changes.push_back({s, floor_[s]});
      floor_[s] = height;
      section_total_[s] -= size_[b];
    }
    if (feasible) feasible = height + total_->Max(section_lo_[b], section_hi_[b]) <= capacity_;
    for (int s : affected) {
      if (!feasible) break;
      i64 least = kInf;
      for (int o : sections_[s])
        if (offset_[o] == kUnplaced) least = std::min(least, min_offset_[o]);
      if (least != kInf && floor_[s] < least) {
        floor_changes.push_back({s, floor_[s]});
        floor_[s] = least;
        if (least + section_total_[s] > capacity_) feasible = false;
      }
    }
    Status status = kNotFound;
    if (feasible) status = Decompose(partition, ordering, key);
    for (auto c = floor_changes.rbegin(); c != floor_changes.rend(); ++c) floor_[c->index] = c->value;
    total_->Add(section_lo_[b], section_hi_[b], size_[b]);
    for (int s = section_lo_[b]; s < section_hi_[b]; ++s) section_total_[s] += size_[b];
    for (auto c = offset_changes.rbegin(); c != offset_changes.rend(); ++c) Reorder(partition, c->index, c->value);
    offset_[b] = kUnplaced;
    if (partition.indexed) {
      partition.order.insert(key);
      partition.tops.insert(height);
    }
    return status;
  }

  // After placing key.buffer: if some section boundary is no longer crossed by any unplaced
  // buffer, solve the pieces independently; otherwise continue the search in this partition.
  Status Decompose(Partition& partition, const std::vector<Key>* ordering, const Key& key) {
    const int b = key.buffer;
    solution_[b] = offset_[b];
    std::vector<int> cutpoints = {partition.section_lo};
    for (int s = section_lo_[b]; s + 1 < section_hi_[b]; ++s)
      if (--cuts_[s] == 0) cutpoints.push_back(s + 1);
    Status status = kFound;
    if (cutpoints.size() == 1) {
      status = Node(partition, ordering, key.offset, key.rank);
    } else {
      cutpoints.push_back(partition.section_hi);
      for (size_t c = 1; c < cutpoints.size(); ++c) {
        const int lo = cutpoints[c - 1], hi = cutpoints[c];
        std::vector<int> buffers;
        for (int o : partition.buffers)
          if (offset_[o] == kUnplaced && section_lo_[o] < hi && lo < section_hi_[o]) buffers.push_back(o);
        if (buffers.empty()) continue;
        status = SubSolve(std::move(buffers), lo, hi);
        if (status != kFound) break;
      }
    }
    for (int s = section_lo_[b]; s + 1 < section_hi_[b]; ++s) ++cuts_[s];
    return status;
  }

  int n_;
  i64 capacity_;
  std::vector<i64> lower_, upper_, size_, align_;
  std::vector<std::string> heuristics_;
  int floor_limit_;     // problems up to this many buffers use the unplaced-floor inference
  size_t indexed_min_;  // partitions above this many buffers use the incremental order
  std::string heuristic_;
  std::chrono::steady_clock::time_point deadline_;

  int num_sections_ = 0;
  std::vector<std::vector<int>> sections_;
  std::vector<i64> initial_total_;
  std::vector<int> section_lo_, section_hi_;
  std::vector<std::vector<int>> overlaps_;
  std::vector<int> cuts_;

  std::vector<i64> offset_, solution_, min_offset_, floor_;
  std::vector<int> rank_;
  std::unique_ptr<MaxTree> total_;  // unplaced bytes per section, for range maxima
  std::vector<i64> section_total_;   // the same, for single sections
  std::vector<i64> stamp_;
  i64 epoch_ = 0;
  i64 nodes_left_ = 0;
  i64 nodes_ = 0;
  i64 backtracks_ = 0;
};

std::vector<i64> ToVector(const py::array_t<i64, py::array::c_style | py::array::forcecast>& a) {
  return std::vector<i64>(a.data(), a.data() + a.size());
}

py::tuple SolvePy(const py::array_t<i64, py::array::c_style | py::array::forcecast>& lower,
                  const py::array_t<i64, py::array::c_style | py::array::forcecast>& upper,
                  const py::array_t<i64, py::array::c_style | py::array::forcecast>& size,
                  const py::array_t<i64, py::array::c_style | py::array::forcecast>& align,
                  i64 capacity, double time_limit, std::vector<std::string> heuristics,
                  int floor_limit, int indexed_min) {
  const size_t n = static_cast<size_t>(size.size());
  if (lower.size() != static_cast<py::ssize_t>(n) || upper.size() != static_cast<py::ssize_t>(n) ||
      align.size() != static_cast<py::ssize_t>(n))
    throw std::invalid_argument("lower, upper, size and align must have the same length");
  if (heuristics.empty()) heuristics = {"WAT", "TAW", "TWA"};
  Search search(ToVector(lower), ToVector(upper), ToVector(size), ToVector(align), capacity,
                time_limit, heuristics, floor_limit, static_cast<size_t>(std::max(indexed_min, 0)));
  Status status;
  {
    py::gil_scoped_release release;
    status = search.Solve();
  }
  py::array_t<i64> offsets(static_cast<py::ssize_t>(n));
  std::copy(search.solution().begin(), search.solution().end(), offsets.mutable_data());
  const char* names[] = {"found", "infeasible", "timeout", "timeout"};
  return py::make_tuple(names[status], offsets, search.nodes(), search.backtracks());
}

}  // namespace

PYBIND11_MODULE(_memplan_search, m) {
  m.doc() = "MiniMalloc-style branch-and-bound search for static memory allocation";
  m.def("solve", &SolvePy, py::arg("lower"), py::arg("upper"), py::arg("size"), py::arg("align"),
        py::arg("capacity"), py::arg("time_limit"), py::arg("heuristics") = std::vector<std::string>{},
        py::arg("floor_limit") = 5000, py::arg("indexed_min") = 1500,
        "Offsets fitting under capacity: returns (status, offsets, nodes, backtracks) with status "
        "'found', 'infeasible' or 'timeout'.");
}

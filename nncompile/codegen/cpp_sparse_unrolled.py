"""The unrolled sparse kernel: the pattern becomes straight-line code.

For ``y[M, N] = x[M, K] @ W^T`` with W's pattern fixed, the table-driven kernel (``nnc::sparse::linear``)
walks baked CSR tables. This variant emits the walk itself: every nonzero ``W[n, c]`` (value index j in
the packed order) becomes a broadcast of ``vals[j]`` and V FMAs against ``xT[c]`` (V 8-lane vectors of
the batch chunk) with ``c`` and ``j`` folded into the addresses as constants. No index loads, no loop control, no
row-pointer reads. The values still come from the packed buffer (training may change them), so the code
depends on the pattern only.

Order of the work is the table kernel's: tiles of ``TILE_ROWS`` rows, and inside a tile every K block
over the tile's rows, so the slice of xT a block reads stays in cache. One function per tile and chunk
width V (64 batch rows -> V = 8, plus the tail's V) keeps each function a size the compiler handles
quickly; tiles run in parallel when the layer is big enough. Small V gets several accumulator sets.

Code size is bounded: a layer is unrolled only when its statements (~nnz * (V + 1) per chunk width)
fit ``MAX_STATEMENTS``; bigger layers use the table kernel. The functions are compiled at -O1: straight
-line code gains nothing from -O3, which took ~4x longer to compile it. Measured against the table
kernel (one thread, whole modules, 256x256 at 90% and 512x512 at 95%; bench/RESULTS.md): batch 1
1.05-1.34x, batch 4 1.1-1.2x faster; batch 16 0.8-1.0x; at batch 64 (V = 8) 0.8x where it fits - the
instruction stream outgrows the caches and the table kernel has an AVX-512 path - so the chooser's
estimate (``estimate_s``) takes it for the smallest batches only. ``NNC_SPARSE_KERNEL=unrolled`` forces
it where it fits.
"""
from __future__ import annotations

MAX_STATEMENTS = 40000   # bound on a layer's unrolled code: about 7 s of g++ at -O1, ~100 KB of machine code
TILE_ROWS = 128          # rows per tile function (as the table kernel's row tile)
CHUNK = 64               # batch rows per chunk (V = 8 vectors of 8 lanes)
PARALLEL_WORK = 200000   # nnz * V above which the tiles run on all threads
UNROLLED_S = 0.6e-9      # seconds per nonzero per 8-lane vector (broadcast + FMA, constant addresses)
TRANSPOSE_S = 0.3e-9     # seconds per element transposed (x in, y out)


def fits(nnz: int, m: int) -> bool:
    """Whether a layer may be unrolled: the code (about nnz * (V + 1) statements for each chunk width V
    the batch needs) stays within the bound."""
    return m >= 1 and 0 < nnz and nnz * sum(v + 1 for v in set(chunk_vectors(m))) <= MAX_STATEMENTS


def chunk_vectors(m: int) -> list[int]:
    """The V of each batch chunk the layer runs (full chunks of 64 rows, then the tail)."""
    full, tail = divmod(m, CHUNK)
    return [8] * full + ([(tail + 7) // 8] if tail else [])


def tiles(csr, rows: int) -> list[tuple[int, int]]:
    """Row ranges of the tile functions: about TILE_ROWS rows, never splitting a row group."""
    starts = [int(s) for s in csr.gstart[:-1]] if len(csr.gstart) > 1 else [0]
    found, t0 = [], 0
    for s in starts[1:] + [rows]:
        if s - t0 >= TILE_ROWS or s == rows:
            if s > t0:
                found.append((t0, s))
            t0 = s
    return found


def _accumulators(v: int) -> int:
    """Independent accumulator sets: enough FMA chains in flight when the chunk has few vectors."""
    return 1 if v >= 4 else 2 if v >= 2 else 4


def definitions(name: str, csr, rows: int, vs: list[int]) -> tuple[list[str], int]:
    """File-scope C++: for each chunk width V in ``vs``, one function per row tile with the tile's
    nonzeros as straight-line intrinsics (named accumulators, constant addresses); and the tile count."""
    nkb = (len(csr.rowptr) - 1) // rows if rows else 1
    rowptr, cols = csr.rowptr, csr.cols
    ranges = tiles(csr, rows)
    out = []
    for v in sorted(set(vs)):
        u_sets = _accumulators(v)
        ld = 8 * v
        acc = [[f"a{u}_{i}" for i in range(v)] for u in range(u_sets)]
        for t, (r0, r1) in enumerate(ranges):
            out.append(f"__attribute__((optimize(\"O1\"))) static void {name}_v{v}_t{t}(const float* __restrict xT, const float* __restrict vals, "
                       "float* __restrict yT) {")
            out.append("    __m256 w, " + ", ".join(a for row in acc for a in row) + ";")
            for b in range(nkb):
                for n in range(r0, r1):
                    s, e = int(rowptr[b * rows + n]), int(rowptr[b * rows + n + 1])
                    if b > 0 and s == e:
                        continue
                    stmts = []
                    for u in range(u_sets):
                        for i in range(v):
                            load = b > 0 and u == 0
                            stmts.append(f"{acc[u][i]} = " + (f"_mm256_load_ps(yT + {n * ld + 8 * i});" if load
                                                              else "_mm256_setzero_ps();"))
                    for q, j in enumerate(range(s, e)):
                        row = acc[q % u_sets]
                        base = int(cols[j]) * ld
                        stmts.append(f"w = _mm256_broadcast_ss(vals + {j});")
                        stmts += [f"{row[i]} = _mm256_fmadd_ps(w, _mm256_load_ps(xT + {base + 8 * i}), {row[i]});"
                                  for i in range(v)]
                    for i in range(v):
                        total = acc[0][i]
                        for u in range(1, u_sets):
                            total = f"_mm256_add_ps({total}, {acc[u][i]})"
                        stmts.append(f"_mm256_store_ps(yT + {n * ld + 8 * i}, {total});")
                    out.append("    " + " ".join(stmts))
            out.append("}")
    return out, len(ranges)


def tile_table(name: str, n_tiles: int, v: int) -> str:
    entries = ", ".join(f"{name}_v{v}_t{t}" for t in range(n_tiles))
    return f"static void (*const {name}_v{v}[])(const float*, const float*, float*) = {{{entries}}};"


def call(name: str, n_tiles: int, m: int, n: int, k: int, nnz: int, x: str, vals: str, y: str, epi: str) -> list[str]:
    """Statements running the unrolled layer over the batch (inside the layer's block)."""
    vs = chunk_vectors(m)
    lines = []
    for v in sorted(set(vs)):
        lines.append(tile_table(name, n_tiles, v))
    m0 = 0
    full = vs.count(8) if vs and vs[0] == 8 else 0
    threads = "nnc::usable_threads()" if nnz * 8 > PARALLEL_WORK and n_tiles > 1 else "1"
    lines += [f"float* const xT_ = nnc::sparse::detail::scratch(0, (size_t){k} * {CHUNK});",
              f"float* const yT_ = nnc::sparse::detail::scratch(1, (size_t){n} * {CHUNK});",
              f"const int threads_ = std::min({threads}, {n_tiles});"]

    def chunk(v: int, start: str, rows: str) -> list[str]:
        return [f"nnc::sparse::detail::transpose_in({x} + (long)({start}) * {k}, {k}, {rows}, {k}, xT_, {8 * v});",
                "#pragma omp parallel for schedule(dynamic, 1) num_threads(threads_)",
                f"for (int t_ = 0; t_ < {n_tiles}; ++t_) {name}_v{v}[t_](xT_, {vals}, yT_);",
                f"nnc::sparse::detail::transpose_out(yT_, {8 * v}, {rows}, {n}, {y} + (long)({start}) * {n}, {n}, {epi}, {start});"]

    if full:
        lines.append(f"for (int m0_ = 0; m0_ < {full * CHUNK}; m0_ += {CHUNK}) {{")
        lines += ["    " + line for line in chunk(8, "m0_", str(CHUNK))]
        lines.append("}")
        m0 = full * CHUNK
    if m0 < m:
        lines += chunk(vs[-1], str(m0), str(m - m0))
    return lines


def estimate_s(m: int, n: int, k: int, nnz: int) -> float:
    """Estimated seconds: each nonzero costs UNROLLED_S per 8-lane vector of every batch chunk, plus the
    transposes of x and y (calibrated with bench/suite_sparse.py on the development machine)."""
    return UNROLLED_S * nnz * sum(chunk_vectors(m)) + TRANSPOSE_S * m * (k + n)

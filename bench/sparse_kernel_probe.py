"""Side-by-side timing of the sparse linear kernel (``native/nnc_sparse.h``) against an older revision.

    python bench/sparse_kernel_probe.py [--old REV] [--points 1024x1024:0.9:64,4096x1024:0.9:64] [--rounds 15]

A point is NxK:SPARSITY:BATCH[:PATTERN], PATTERN one of "random" (default: exactly that fraction of
zeros, as bench/suite_sparse.py), "blockBHxBW" (block sparsity) or "nmN/M" (N of every M; SPARSITY is
then ignored). For each point it times, one thread, in CPU time of the calling thread
(``time.thread_time``), medians over interleaved rounds: the current kernel with pre-packed values
(``Pattern::values`` set: "frozen"), the same kernel packing W per call ("packing"), the same two built
from revision REV's ``native/`` headers (default HEAD; skipped with ``--old none``), nnc's dense GEMM and
torch.sparse CSR (MKL); each timed block follows one untimed call of the same kernel (warm caches). AVX2 and AVX-512 are both timed where the CPU has AVX-512 (``NNC_NO_AVX512``
switches the kernels' path; the dense GEMM keeps its best path). Each kernel's output is checked
against float64 on the masked weights first.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nncompile.codegen import cpp_sparse  # noqa: E402
from nncompile.ir.types import Sparsity  # noqa: E402


def build_harness(native_dir: Path, tag: str, avx512: bool) -> "ctypes.CDLL":
    """The harness of codegen/cpp_sparse.py compiled against the headers in native_dir."""
    import ctypes

    source = cpp_sparse._HARNESS.replace('extern "C" {', 'extern "C" {\nvoid nnc_sp_avx512(int on);', 1)
    source += ('\nextern "C" void nnc_sp_avx512(int on) { nnc::gemm_use_avx512() = on; '
               + ('nnc::sparse::detail::use_avx512() = on; ' if avx512 else '') + '}\n')
    key = hashlib.sha256((source + tag).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"nnc_sparse_probe_{key}.so"
    if not out.exists():
        src = out.with_suffix(".cpp")
        src.write_text(source)
        cmd = ["g++", "-O3", "-fopenmp", "-march=x86-64-v3", "-std=c++17", "-fPIC", "-shared", "-fno-math-errno",
               "-fno-trapping-math", f"-I{native_dir}", str(src), "-o", str(out)]
        subprocess.run(cmd, check=True)
    return ctypes.CDLL(str(out))


def old_native(rev: str) -> Path:
    """native/ as of git revision rev, in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="nnc_native_old_"))
    files = subprocess.run(["git", "ls-tree", "--name-only", rev, "native/"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if name.endswith(".h"):
            blob = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=REPO, check=True, capture_output=True).stdout
            (folder / Path(name).name).write_bytes(blob)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="HEAD", help="git revision to compare against ('none': skip)")
    parser.add_argument("--points", default="1024x1024:0.9:64,4096x1024:0.9:64")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--cold", action="store_true",
                        help="no untimed call before each timed block (as bench/suite_sparse.py times)")
    args = parser.parse_args()

    import ctypes

    has512 = "avx512f" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    libs = {"new": build_harness(REPO / "native", "new" + str(os.stat(REPO / "native" / "nnc_sparse.h").st_mtime), True)}
    if args.old != "none":
        rev = subprocess.run(["git", "rev-parse", args.old], cwd=REPO, check=True, capture_output=True,
                             text=True).stdout.strip()
        old_dir = old_native(rev)
        has_switch = "use_avx512" in (old_dir / "nnc_sparse.h").read_text()
        libs["old"] = build_harness(old_dir, "old" + rev, has_switch)
        switchable = {"new": True, "old": has_switch}
    else:
        switchable = {"new": True}
    for lib in libs.values():
        lib.nnc_sp_threads(1)
    if not args.no_torch:
        import torch
        torch.set_num_threads(1)
    p = cpp_sparse._p
    for point in args.points.split(","):
        shape, sparsity, batch, *kind = point.split(":")
        n, k = map(int, shape.split("x"))
        s, m = float(sparsity), int(batch)
        kind = kind[0] if kind else "random"
        rng = np.random.default_rng(int(s * 100) + n)
        if kind == "random":
            mask = np.zeros(n * k, bool)
            mask[rng.permutation(n * k)[: int(round((1 - s) * n * k))]] = True
            mask = mask.reshape(n, k)
        elif kind.startswith("block"):
            bh, bw = map(int, kind[5:].split("x"))
            mask = Sparsity("block", density=1 - s, block=(bh, bw), seed=1).mask((n, k))
        elif kind.startswith("nm"):
            nn, mm = map(int, kind[2:].split("/"))
            mask = Sparsity("nm", n=nn, m=mm, seed=1).mask((n, k))
        else:
            raise SystemExit(f"unknown pattern {kind!r}")
        w = (rng.standard_normal((n, k)).astype(np.float32) * mask).astype(np.float32)
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = np.empty((m, n), np.float32)
        csr = cpp_sparse.pattern_from_mask(mask)
        vals = np.ascontiguousarray(w.reshape(-1)[csr.order])
        ref = x.astype(np.float64) @ w.T.astype(np.float64)

        def sparse_fn(lib, values, avx512):
            def call():
                lib.nnc_sp_avx512(avx512)
                lib.nnc_sp_linear(m, n, k, p(x), p(w), p(csr.rowptr), p(csr.cols), len(csr.gstart) - 1, p(csr.gstart),
                                  None, 0, None, p(y), p(values), csr.kb)
            return call

        fns = {"nnc dense": lambda: (libs["new"].nnc_sp_avx512(1), libs["new"].nnc_sp_dense(m, n, k, p(x), p(w), p(y)))}
        paths = [("", 1)] + ([(" avx2", 0)] if has512 else [])
        for name, lib in libs.items():
            for suffix, flag in (paths if switchable[name] else paths[:1]):
                fns[f"{name} frozen{suffix}"] = sparse_fn(lib, vals, flag)
                fns[f"{name} packing{suffix}"] = sparse_fn(lib, None, flag)
        if not args.no_torch:
            w_csr = torch.from_numpy(w).to_sparse_csr()
            x_t = torch.from_numpy(x).t().contiguous()
            fns["torch csr"] = lambda: torch.mm(w_csr, x_t)
        for label, fn in fns.items():
            if label.startswith(("old", "new")):
                y.fill(np.nan)
                fn()
                err = float(np.abs(y - ref).max() / max(1.0, np.abs(ref).max()))
                assert err < 1e-4, (label, err)
        inner = 20 if m < 8 else 3
        samples = {label: [] for label in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for label, fn in fns.items():
                if not args.cold:
                    fn()   # untimed: each kernel's first call after another kernel runs on its caches, not theirs
                t0 = time.thread_time()
                for _ in range(inner):
                    fn()
                samples[label].append((time.thread_time() - t0) / inner)
        med = {label: float(np.median(v)) for label, v in samples.items()}
        print(f"{n}x{k} {kind} sparsity {1 - csr.nnz / (n * k):.2f} batch {m} (nnz {csr.nnz}, kb {csr.kb}, "
              f"row groups {len(csr.gstart) - 1}):")
        for label, t in med.items():
            extra = ""
            if label.startswith(("old", "new")):
                extra = f"   vs dense {med['nnc dense'] / t:5.2f}x"
                if "torch csr" in med:
                    extra += f"   vs csr {med['torch csr'] / t:5.2f}x"
                extra += f"   {2.0 * csr.nnz * m / t * 1e-9:5.1f} GFLOP/s"
            print(f"  {label:<20} {t * 1e6:9.1f} us{extra}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Both vector paths of the sparse linear kernel (native/nnc_sparse.h) against float64 on the masked weights.

The kernel picks zmm (AVX-512) or ymm (AVX2) at run time; CI machines may lack AVX-512, so the ymm path
is forced here too (``nnc::sparse::detail::use_avx512()``), on every machine, and the zmm path where the
CPU has AVX-512F. Patterns include empty rows, fully dense rows, row groups (block rows) and K blocks;
batch sizes cover the tails of 8, 16 and the 64-row chunks and the small batches (M < 8: the scalar kernel,
or with packed values and M >= 2 the 8-lane kernel), with values packed beforehand and not.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nncompile.codegen import cpp_sparse

pytestmark = pytest.mark.backend

_SWITCH = '\nextern "C" void nnc_sp_test_avx512(int on) { nnc::sparse::detail::use_avx512() = on; }\n'


@pytest.fixture(scope="module")
def lib():
    """The ctypes harness of codegen/cpp_sparse.py plus a switch between the two vector paths."""
    handle = cpp_sparse.build_harness(cpp_sparse._HARNESS + _SWITCH, "nnc_sparse_paths")
    handle.nnc_sp_threads(1)
    return handle


def _has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and " avx512f" in cpuinfo.read_text()


PATHS = [0, 1] if _has_avx512() else [0]


@st.composite
def cases(draw):
    n = draw(st.integers(1, 48))
    k = draw(st.integers(1, 260))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    density = draw(st.sampled_from([0.0, 0.03, 0.1, 0.4, 1.0]))
    mask = rng.random((n, k)) < density
    for row in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        mask[row] = False
    for row in draw(st.lists(st.integers(0, n - 1), max_size=3)):
        mask[row] = True
    start, length = draw(st.integers(0, n - 1)), draw(st.integers(1, 9))
    mask[start:start + length] = mask[start]          # a group of identical rows (block row)
    kb = draw(st.sampled_from([None, 8, 24, 64]))
    m = draw(st.one_of(st.sampled_from([1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 80, 129]),
                       st.integers(1, 140)))
    return mask, kb, m, rng


@pytest.mark.parametrize("avx512", PATHS)
@settings(max_examples=60, deadline=None)
@given(case=cases(), packed=st.booleans(), grouped=st.booleans())
def test_sparse_linear_both_paths_match_dense(lib, avx512, case, packed, grouped):
    mask, kb, m, rng = case
    n, k = mask.shape
    csr = cpp_sparse.pattern_from_mask(mask, kb)
    w = np.where(mask, rng.standard_normal((n, k)), 1e6).astype(np.float32)   # garbage off the pattern
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    values = np.ascontiguousarray(w.reshape(-1)[csr.order]) if packed else None
    y = np.full((m, n), np.nan, np.float32)
    p = cpp_sparse._p
    lib.nnc_sp_test_avx512(avx512)
    try:
        lib.nnc_sp_linear(m, n, k, p(x), p(w), p(csr.rowptr), p(csr.cols), len(csr.gstart) - 1 if grouped else n,
                          p(csr.gstart) if grouped else None, p(bias), 1, None, p(y), p(values), csr.kb)
    finally:
        lib.nnc_sp_test_avx512(1 if _has_avx512() else 0)
    ref = np.maximum(x.astype(np.float64) @ np.where(mask, w, 0).astype(np.float64).T + bias, 0)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * max(1.0, np.sqrt(k)))

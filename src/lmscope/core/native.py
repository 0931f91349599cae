"""Small C kernels for the CPU, compiled on first use by the machine's C compiler and called through ctypes.

Some steps of training are selections and gathers that torch runs as several generic kernels, each a pass over
memory; one C loop does them in one pass. The source is below; it is compiled once per machine into
$LMSCOPE_CACHE/native (`-O3 -march=native`: the key includes the compiler, its flags and the CPU's model and
flags, so a cache shared between machines never hands one of them code for another CPU), written atomically
and loaded with ctypes. Calls release the GIL, so a few Python threads run it on disjoint rows in parallel.

Nothing depends on it: with no C compiler, a failed compile, or `LMSCOPE_NATIVE=0`, `library()` is None and
callers use their torch path, which gives the same results (tests check the two against each other).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lmscope.core.cache import cache_root

# lmscope_by_latent: the counting sort that orders a TopK step's (latent, token) pairs for its sparse backward.
#
# The top k of each row of a float32 matrix, exactly (the set torch.topk returns; NaN is the largest value).
#
# AVX-512 path, per row: (1) the row is folded into Q vectors of running maxima (16 Q lanes, about 2 k, at most
# 256), each lane the largest of a disjoint set of elements; t, the largest lane maximum with at least k lane maxima
# >= it, is therefore at most the row's k-th largest value (counted with vector compares, no sort). (2) The elements
# >= t, at least k of them and usually a few more, are compressed into a candidate buffer. (3) Each candidate's rank
# by (value descending, position ascending) is counted with vector compares; those ranked below k are the result,
# in descending order. A row holding a NaN (seen in pass 1), more than 256 candidates (many ties at t) or a k above
# 256 takes the scalar path: a min-heap over the row, with NaN ordered above every number.
_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

static inline int gt(float a, float b) { return a > b || (a != a && b == b); }  /* a > b, NaN largest */

static void sift(float *v, int64_t *ix, int64_t k, int64_t i) {
    for (;;) {
        int64_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && gt(v[m], v[l])) m = l;
        if (r < k && gt(v[m], v[r])) m = r;
        if (m == i) return;
        float tv = v[i]; v[i] = v[m]; v[m] = tv;
        int64_t ti = ix[i]; ix[i] = ix[m]; ix[m] = ti;
        i = m;
    }
}

/* the k largest of vals[0..n) (n >= k) into v, ix (ix from idx, or the position when idx is NULL) */
static void heap_select(const float *vals, const int32_t *idx, int64_t n, int64_t k, float *v, int64_t *ix) {
    for (int64_t j = 0; j < k; j++) { v[j] = vals[j]; ix[j] = idx ? idx[j] : j; }
    for (int64_t j = k / 2 - 1; j >= 0; j--) sift(v, ix, k, j);
    for (int64_t j = k; j < n; j++) {
        if (gt(vals[j], v[0])) { v[0] = vals[j]; ix[0] = idx ? idx[j] : j; sift(v, ix, k, 0); }
    }
}

#if defined(__AVX512F__)
#define MAXV 16  /* vectors of 16 lanes: at most 256 lane maxima and 256 candidates */

/* the largest of the 16 nv values in vec with at least k of them >= it */
static float kth_bound(const __m512 *vec, int64_t nv, int64_t k) {
    float lanes[16 * MAXV];
    __m512i cnt[MAXV];
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t a = 0; a < nv; a++) { _mm512_storeu_ps(lanes + 16 * a, vec[a]); cnt[a] = _mm512_setzero_si512(); }
    for (int64_t j = 0; j < 16 * nv; j++) {  /* cnt[lane] = #{j : lanes[j] >= lanes[lane]} */
        __m512 b = _mm512_set1_ps(lanes[j]);
        for (int64_t a = 0; a < nv; a++)
            cnt[a] = _mm512_mask_add_epi32(cnt[a], _mm512_cmp_ps_mask(vec[a], b, _CMP_LE_OQ), cnt[a], one);
    }
    __m512 best = _mm512_set1_ps(-__builtin_inff());
    for (int64_t a = 0; a < nv; a++) {
        __mmask16 enough = _mm512_cmp_epi32_mask(cnt[a], _mm512_set1_epi32((int)k), _MM_CMPINT_NLT);
        best = _mm512_mask_max_ps(best, enough, best, vec[a]);
    }
    return _mm512_reduce_max_ps(best);
}

/* the k largest of the c candidates (cv, ci), c <= 256, by (value desc, position asc), written in rank order */
static void rank_select(const float *cv, const int32_t *ci, int64_t c, int64_t k, float *v, int64_t *ix) {
    int64_t nv = (c + 15) / 16;
    __m512 vec[MAXV];
    __m512i cnt[MAXV], pos[MAXV];
    const __m512i one = _mm512_set1_epi32(1);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t a = 0; a < nv; a++) {
        vec[a] = _mm512_loadu_ps(cv + 16 * a);
        cnt[a] = _mm512_setzero_si512();
        pos[a] = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(16 * a)));
    }
    for (int64_t j = 0; j < c; j++) {  /* candidate j ranks above lane i: a larger value, or equal and j < i */
        __m512 b = _mm512_set1_ps(cv[j]);
        __m512i bj = _mm512_set1_epi32((int)j);
        for (int64_t a = 0; a < nv; a++) {
            __mmask16 below = _mm512_cmp_ps_mask(vec[a], b, _CMP_LT_OQ);
            __mmask16 tie = _mm512_cmp_ps_mask(vec[a], b, _CMP_EQ_OQ)
                            & _mm512_cmp_epi32_mask(pos[a], bj, _MM_CMPINT_NLE);
            cnt[a] = _mm512_mask_add_epi32(cnt[a], below | tie, cnt[a], one);
        }
    }
    for (int64_t a = 0; a < nv; a++) {
        __mmask16 valid = (16 * a + 16 <= c) ? (__mmask16)0xFFFF : (__mmask16)((1u << (c - 16 * a)) - 1);
        __mmask16 take = _mm512_cmp_epi32_mask(cnt[a], _mm512_set1_epi32((int)k), _MM_CMPINT_LT) & valid;
        _mm512_mask_i32scatter_ps(v, take, cnt[a], vec[a], 4);
        __m512i where = _mm512_loadu_si512(ci + 16 * a);
        _mm512_mask_i32scatter_epi64(ix, (__mmask8)take, _mm512_castsi512_si256(cnt[a]),
                                     _mm512_cvtepi32_epi64(_mm512_castsi512_si256(where)), 8);
        _mm512_mask_i32scatter_epi64(ix, (__mmask8)(take >> 8), _mm512_extracti64x4_epi64(cnt[a], 1),
                                     _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(where, 1)), 8);
    }
}

/* 1 when the row was done here; 0 when it must take the scalar path (a NaN, or too many candidates) */
static int simd_row(const float *row, int64_t width, int64_t k, int64_t q, float *v, int64_t *ix,
                    float *buf_v, int32_t *buf_i) {
    __m512 acc[MAXV];
    __mmask16 nan = 0;
    int64_t full = width / 16 * 16, j;
    for (int64_t a = 0; a < q; a++) {
        acc[a] = _mm512_loadu_ps(row + 16 * a);
        nan |= _mm512_cmp_ps_mask(acc[a], acc[a], _CMP_UNORD_Q);
    }
    for (j = 16 * q; j + 16 * q <= full; j += 16 * q) {
        for (int64_t a = 0; a < q; a++) {
            __m512 y = _mm512_loadu_ps(row + j + 16 * a);
            nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
            acc[a] = _mm512_max_ps(acc[a], y);
        }
    }
    for (int64_t a = 0; j < full; j += 16, a++) {
        __m512 y = _mm512_loadu_ps(row + j);
        nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
        acc[a] = _mm512_max_ps(acc[a], y);
    }
    for (; j < width; j++) nan |= (row[j] != row[j]);
    if (nan) return 0;
    float t = kth_bound(acc, q, k);
    const __m512 tv = _mm512_set1_ps(t);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    int64_t c = 0;
    for (j = 0; j < full; j += 16) {
        __m512 y = _mm512_loadu_ps(row + j);
        __mmask16 keep = _mm512_cmp_ps_mask(y, tv, _CMP_GE_OQ);
        if (keep) {  /* buf has 16 floats of slack: whole-vector stores of the compressed lanes */
            _mm512_storeu_ps(buf_v + c, _mm512_maskz_compress_ps(keep, y));
            _mm512_storeu_si512(buf_i + c, _mm512_maskz_compress_epi32(keep,
                                _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)j))));
            c += __builtin_popcount((unsigned)keep);
        }
    }
    for (; j < width; j++) {
        if (row[j] >= t) { buf_v[c] = row[j]; buf_i[c] = (int32_t)j; c++; }
    }
    if (c > 16 * MAXV) {
        heap_select(buf_v, buf_i, c, k, v, ix);
        return 1;
    }
    rank_select(buf_v, buf_i, c, k, v, ix);
    return 1;
}
#endif

/* The (latent, token) pairs of a k-per-token sparse matrix sorted by latent, stably (a counting sort): crow [m + 1]
   the CSR row pointers, order [n k] the flat positions in latent order, tokens [n k] their tokens (position / k);
   cursor: m int64s of scratch. Returns 0, or -1 (nothing usable written) when an index is outside [0, m). */
int lmscope_by_latent(const int64_t *idx, int64_t nk, int64_t k, int64_t m, int64_t *crow, int64_t *order,
                      int64_t *tokens, int64_t *cursor) {
    memset(crow, 0, (size_t)(m + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < nk; i++) {
        int64_t j = idx[i];
        if (j < 0 || j >= m) return -1;
        crow[j + 1]++;
    }
    for (int64_t j = 0; j < m; j++) crow[j + 1] += crow[j];
    memcpy(cursor, crow, (size_t)m * sizeof(int64_t));
    for (int64_t i = 0; i < nk; i++) {
        int64_t at = cursor[idx[i]]++;
        order[at] = i;
        tokens[at] = i / k;
    }
    return 0;
}

#ifdef _OPENMP
#include <omp.h>
#endif

/* every row of x [n, width], on `threads` OpenMP threads (torch's own runtime: the library links the libgomp torch
   loaded, so its waiting threads take this work instead of spinning beside it). Returns -1 if scratch could not be
   allocated (nothing usable written), else 0. */
int lmscope_topk(const float *x, int64_t n, int64_t width, int64_t k, float *out_v, int64_t *out_i, int threads) {
    int failed = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads) reduction(|:failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0 = n * t / nt, r1 = n * (t + 1) / nt;
        float *bv = malloc((size_t)(width + 16) * sizeof(float));
        int32_t *bi = malloc((size_t)(width + 16) * sizeof(int32_t));
        if (bv && bi) lmscope_topk_rows(x, r0, r1, width, k, out_v, out_i, bv, bi);
        else failed = 1;
        free(bv); free(bi);
    }
#else
    (void)threads;
    float *bv = malloc((size_t)(width + 16) * sizeof(float));
    int32_t *bi = malloc((size_t)(width + 16) * sizeof(int32_t));
    if (bv && bi) lmscope_topk_rows(x, 0, n, width, k, out_v, out_i, bv, bi);
    else failed = 1;
    free(bv); free(bi);
#endif
    return failed ? -1 : 0;
}

/* The projection of a unit-norm decoder's gradient: for each row r of g, w [n, width] (float32, contiguous),
   g[r] -= (<g[r], w[r]> / max(|w[r]|^2, 1e-16)) w[r], in place. Returns the sum of squares of the projected g (in
   double, each row's sum in float), which gradient clipping needs next: one pass over the rows instead of four. */
double lmscope_project_rows(float *g, const float *w, int64_t n, int64_t width, int threads) {
    double total = 0.0;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) reduction(+:total) schedule(static)
#else
    (void)threads;
#endif
    for (int64_t r = 0; r < n; r++) {
        float *gr = g + r * width;
        const float *wr = w + r * width;
        float dot = 0.0f, ww = 0.0f, s = 0.0f;
        #pragma omp simd reduction(+:dot, ww)
        for (int64_t j = 0; j < width; j++) { dot += gr[j] * wr[j]; ww += wr[j] * wr[j]; }
        const float c = dot / (ww > 1e-16f ? ww : 1e-16f);
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < width; j++) { gr[j] -= c * wr[j]; s += gr[j] * gr[j]; }
        total += (double)s;
    }
    return total;
}

/* out[i] = the row `row[i]` of the array at address bases[shard[i]], for i in [0, n): rows of row_bytes bytes, any
   dtype. One copy from memory-mapped shards straight into the batch's drawn order. Returns -1 when a shard number
   is outside [0, n_bases) (nothing usable written), else 0. */
int lmscope_gather_rows(const int64_t *bases, int64_t n_bases, const int64_t *shard, const int64_t *row, int64_t n,
                        int64_t row_bytes, char *out, int threads) {
    for (int64_t i = 0; i < n; i++) if (shard[i] < 0 || shard[i] >= n_bases) return -1;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(static)
#else
    (void)threads;
#endif
    for (int64_t i = 0; i < n; i++) {
        const char *src = (const char *)(intptr_t)bases[shard[i]] + row[i] * row_bytes;
        memcpy(out + i * row_bytes, src, (size_t)row_bytes);
    }
    return 0;
}

/* sum over rows and columns of (t - c)^2 for t [n, width] float32, c the column means rounded to float, corrected
   to the exact mean: sum |t - mean|^2 = sum |t - c|^2 - n |mean - c|^2 (the means and the total in double, each
   row's squares in float). Two passes over t and no temporary; -1.0 when scratch could not be allocated. */
double lmscope_centred_sumsq(const float *t, int64_t n, int64_t width, int threads) {
    double *mean = calloc((size_t)width, sizeof(double));
    float *c = malloc((size_t)width * sizeof(float));
    if (!mean || !c) { free(mean); free(c); return -1.0; }
    int failed = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads) reduction(|:failed)
#else
    (void)threads;
#endif
    {
        double *part = calloc((size_t)width, sizeof(double));
        if (!part) failed = 1;
#ifdef _OPENMP
        #pragma omp for schedule(static)
#endif
        for (int64_t r = 0; r < n; r++) {
            if (!part) continue;
            const float *row = t + r * width;
            #pragma omp simd
            for (int64_t j = 0; j < width; j++) part[j] += (double)row[j];
        }
        if (part) {
#ifdef _OPENMP
            #pragma omp critical
#endif
            for (int64_t j = 0; j < width; j++) mean[j] += part[j];
        }
        free(part);
    }
    if (failed) { free(mean); free(c); return -1.0; }
    double shift = 0.0;
    for (int64_t j = 0; j < width; j++) {
        mean[j] /= (double)(n > 0 ? n : 1);
        c[j] = (float)mean[j];
        double e = mean[j] - (double)c[j];
        shift += e * e;
    }
    double total = 0.0;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) reduction(+:total) schedule(static)
#endif
    for (int64_t r = 0; r < n; r++) {
        const float *row = t + r * width;
        float s = 0.0f;
        #pragma omp simd reduction(+:s)
        for (int64_t j = 0; j < width; j++) { float d = row[j] - c[j]; s += d * d; }
        total += (double)s;
    }
    free(mean); free(c);
    return total - (double)n * shift;
}

/* The sparse backward of a TopK step in one pass over its (latent, token) pairs in latent order (crow, order, tokens
   from lmscope_by_latent over idx [n, k]; grad, w_dec and g_wd are d wide, x and g_we_t d_in). For each latent j
   and each of its tokens t (at flat position p = t k + i):
     g_vals[p] = <grad[t], w_dec[j]> where vals[p] > 0, else 0   (the value's gradient, through the ReLU)
     g_wd[j]  += vals[p] grad[t]                                (the decoder's gradient; skipped when g_wd is NULL)
     g_we_t[:, j] += g_vals[p] x[t]                             (the encoder's, written in W_enc's [d, m] layout)
     g_pre_sum[j] += g_vals[p]                                  (the encoder bias's)
   Each token's gradient row is read once for the first two, the input row once for the third; torch's three
   sparse products read them three times. Latents go to threads in blocks of 16, so each block's encoder rows are
   written as whole cache lines of the [d, m] layout. Returns -1 if scratch could not be allocated, else 0. */
int lmscope_topk_backward(const int64_t *crow, const int64_t *order, const int64_t *tokens, int64_t m,
                          const float *vals, const float *grad, const float *x, const float *w_dec, int64_t d,
                          int64_t d_in, float *g_vals, float *g_wd, float *g_we_t, float *g_pre_sum, int threads) {
    const int64_t blocks = (m + 15) / 16;
    int failed = 0;
#ifdef _OPENMP
    #pragma omp parallel num_threads(threads) reduction(|:failed)
#else
    (void)threads;
#endif
    {
        float *acc = g_we_t ? malloc((size_t)(16 * d_in) * sizeof(float)) : NULL;
        if (g_we_t && !acc) failed = 1;
#ifdef _OPENMP
        #pragma omp for schedule(dynamic, 2)
#endif
        for (int64_t b = 0; b < blocks; b++) {
            if (g_we_t && !acc) continue;
            const int64_t j0 = 16 * b, j1 = j0 + 16 < m ? j0 + 16 : m;
            for (int64_t j = j0; j < j1; j++) {
                const float *w = w_dec + j * d;
                float *awd = g_wd ? g_wd + j * d : NULL;
                float *awe = acc ? acc + (j - j0) * d_in : NULL;
                if (awd) memset(awd, 0, (size_t)d * sizeof(float));
                if (awe) memset(awe, 0, (size_t)d_in * sizeof(float));
                float gsum = 0.0f;
                for (int64_t q = crow[j]; q < crow[j + 1]; q++) {
                    const int64_t at = order[q];
                    const float v = vals[at];
                    const float *gr = grad + tokens[q] * d;
                    float dot = 0.0f;
                    if (awd && v != 0.0f) {
                        #pragma omp simd reduction(+:dot)
                        for (int64_t c = 0; c < d; c++) { dot += gr[c] * w[c]; awd[c] += v * gr[c]; }
                    } else {
                        #pragma omp simd reduction(+:dot)
                        for (int64_t c = 0; c < d; c++) dot += gr[c] * w[c];
                    }
                    const float gv = v > 0.0f ? dot : 0.0f;
                    g_vals[at] = gv;
                    gsum += gv;
                    if (awe && gv != 0.0f) {
                        const float *xr = x + tokens[q] * d_in;
                        #pragma omp simd
                        for (int64_t c = 0; c < d_in; c++) awe[c] += gv * xr[c];
                    }
                }
                g_pre_sum[j] = gsum;
            }
            if (acc) {
                for (int64_t c = 0; c < d_in; c++) {
                    float *dst = g_we_t + c * m;
                    for (int64_t j = j0; j < j1; j++) dst[j] = acc[(j - j0) * d_in + c];
                }
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

int lmscope_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int lmscope_topk_simd(void) {
#if defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* rows [r0, r1) of x [*, width] -> out_v, out_i [*, k]; buf_v, buf_i: scratch of width + 16 floats / int32s */
void lmscope_topk_rows(const float *x, int64_t r0, int64_t r1, int64_t width, int64_t k,
                       float *out_v, int64_t *out_i, float *buf_v, int32_t *buf_i) {
#if defined(__AVX512F__)
    int64_t q = (2 * k + 15) / 16;
    if (q > MAXV) q = MAXV;
    int simd = k <= 16 * MAXV && width >= 32 * q;
#endif
    for (int64_t r = r0; r < r1; r++) {
        const float *row = x + r * width;
#if defined(__AVX512F__)
        if (simd && simd_row(row, width, k, q, out_v + r * k, out_i + r * k, buf_v, buf_i)) continue;
#endif
        heap_select(row, NULL, width, k, out_v + r * k, out_i + r * k);
    }
    (void)buf_v; (void)buf_i;
}
"""

_lock = threading.Lock()
_loaded: dict[tuple[str | None, tuple[str, ...], str | None], ctypes.CDLL | None] = {}
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def enabled() -> bool:
    return os.environ.get("LMSCOPE_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_key() -> str:
    """The CPU's model and feature flags (Linux), or the platform's machine name."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines) or platform.machine()
    except OSError:
        return platform.machine() + platform.processor()


def compiler() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    return cc


def build(flags: tuple[str, ...] = ("-O3", "-march=native", "-fopenmp-simd")) -> ctypes.CDLL | None:
    """The kernels compiled with `flags` (cached per machine), or None when they cannot be built here."""
    memo = (os.environ.get("CC"), flags, os.environ.get("LMSCOPE_CACHE"))  # what can change within a process
    if memo in _loaded:
        return _loaded[memo]
    with _lock:
        if memo not in _loaded:
            cc = compiler()
            if cc is None or not sys.platform.startswith(("linux", "darwin")):
                _loaded[memo] = None
            else:
                key = hashlib.sha256("\0".join([_SOURCE, cc, *flags, _cpu_key()]).encode()).hexdigest()[:24]
                _loaded[memo] = _compile_and_load(cc, flags, cache_root() / "native" / f"kernels-{key}.so")
        return _loaded[memo]


def _compile_and_load(cc: str, flags: tuple[str, ...], target: Path) -> ctypes.CDLL | None:
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "kernels.c", Path(tmp) / "kernels.so"
                src.write_text(_SOURCE)
                cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(src)]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
                if done.returncode != 0 or not out.exists():
                    return None
                os.replace(out, target)  # atomic: a reader sees no half-written library
        except (OSError, subprocess.SubprocessError):
            return None
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lmscope_topk_rows.argtypes = [ptr, i64, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.lmscope_topk_rows.restype = None
    lib.lmscope_by_latent.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, ptr]
    lib.lmscope_by_latent.restype = ctypes.c_int
    lib.lmscope_topk.argtypes = [ptr, i64, i64, i64, ptr, ptr, ctypes.c_int]
    lib.lmscope_topk.restype = ctypes.c_int
    lib.lmscope_project_rows.argtypes = [ptr, ptr, i64, i64, ctypes.c_int]
    lib.lmscope_project_rows.restype = ctypes.c_double
    lib.lmscope_gather_rows.argtypes = [ptr, i64, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.lmscope_gather_rows.restype = ctypes.c_int
    lib.lmscope_centred_sumsq.argtypes = [ptr, i64, i64, ctypes.c_int]
    lib.lmscope_centred_sumsq.restype = ctypes.c_double
    lib.lmscope_topk_backward.argtypes = [ptr, ptr, ptr, i64, *(ptr,) * 4, i64, i64, *(ptr,) * 4, ctypes.c_int]
    lib.lmscope_topk_backward.restype = ctypes.c_int
    lib.lmscope_openmp.argtypes = []
    lib.lmscope_openmp.restype = ctypes.c_int
    lib.lmscope_topk_simd.argtypes = []
    lib.lmscope_topk_simd.restype = ctypes.c_int
    return lib


_gomp: list[bool] = []  # _loaded_gomp's answer, once torch (and with it its OpenMP runtime) has loaded


def _loaded_gomp() -> bool:
    """Whether the process has loaded GNU OpenMP (torch's Linux wheels bring their own libgomp.so.1).

    Read from /proc/self/maps (half a millisecond: it lists every mapped library), then remembered once torch is
    imported, as torch loads its OpenMP runtime with itself; every kernel call asks.
    """
    if _gomp:
        return _gomp[0]
    try:
        found = "libgomp" in Path("/proc/self/maps").read_text()
    except OSError:
        found = False
    if found or "torch" in sys.modules:
        _gomp.append(found)
    return found


def library() -> ctypes.CDLL | None:
    """The kernels for this machine, or None (no compiler, a failed build, or LMSCOPE_NATIVE=0).

    Where torch runs on GNU OpenMP, the kernels are built with -fopenmp: the library then uses the libgomp already
    loaded (the same soname), so its parallel loops run on torch's own thread team. A second set of threads would
    compete with that team's threads, which keep spinning for a few milliseconds after each torch kernel (measured:
    the top-k took 9.7 ms after an addmm on Python threads, 5.9 ms on torch's team). Without it, `run_parallel`'s
    Python threads run the row ranges.
    """
    if not enabled():
        return None
    if sys.platform.startswith("linux") and _loaded_gomp():
        lib = build(("-O3", "-march=native", "-fopenmp"))
        if lib is not None:
            return lib
    return build()


def run_parallel(calls: Sequence[Callable[[], object]]) -> None:
    """Run the calls on a small pool of threads (ctypes releases the GIL), the first in this thread."""
    global _pool, _pool_size
    if len(calls) == 1:
        calls[0]()
        return
    with _lock:
        if _pool is None or _pool_size < len(calls) - 1:  # a pool too small for these calls is replaced
            _pool_size = max(1, len(calls) - 1)
            _pool = ThreadPoolExecutor(_pool_size, thread_name_prefix="lmscope-native")
        pool = _pool
    futures = [pool.submit(c) for c in calls[1:]]
    calls[0]()
    for f in futures:
        f.result()

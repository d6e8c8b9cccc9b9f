"""Triton backend of the fused speculative-sampling ops; semantics: tempspec_engine/reference.py.

Two launches per call, all arithmetic in fp32, logits read in their own dtype:
  phase 1 `_chunk_stats_kernel`, grid (B*(k+1), NUM_CHUNKS): for one (row b, position i) and one chunk of V, the
      target row's max and sum exp((l - max) / T) (T > 0) or max and first-index argmax (T == 0), and for i < k the
      draft row's max and sum. Partial stats go to an fp32 workspace [4, B*(k+1), NUM_CHUNKS] (target max, target
      sum, draft max, draft sum) and an int32 workspace [B*(k+1), NUM_CHUNKS] (target argmax).
  phase 2 `_accept_kernel`, grid (B,): combines the chunk stats, runs the acceptance test in position order (two
      logits read per position), then draws the emitted token: the residual max(0, p - q) needs one pass over V for
      its sum and a scan that stops at the crossing block; the bonus / all-zero-residual draw from the target weights
      reuses the chunk sums to start its scan at the chunk holding the crossing.
`sample_triton` is the same pair of kernels with k = 0 (HAS_DRAFT=False compiles the draft code out).
The wrappers only assert contiguity and dtypes; tempspec_engine/ops.py validates.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK = 2048  # phase 1 elements per load
SCAN_BLOCK = 2048  # phase 2 elements per load (residual sum and inverse-CDF scan)
MIN_CHUNK = 4096  # phase 1 elements per program, clamped to [MIN_CHUNK, MAX_CHUNK]
MAX_CHUNK = 16384
PROGRAMS_PER_SM = 4  # phase 1 aims at this many programs per SM before clamping the chunk size
_NO_INDEX = tl.constexpr(2147483647)  # "no index" sentinel in int32 min-reductions
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------- phase 0
# Filtered calls only: one program per logit row finds the row max M and the keep thresholds (reference.py) by
# threshold search, without sorting: bisection on the bit patterns of fp32 values (at most 32 passes each).
_NEG_INF_KEY = tl.constexpr(-2139095041)  # _ordered_key(-inf)
_ONE_BITS = tl.constexpr(0x3F800000)  # bit pattern of 1.0, the largest weight


@triton.jit
def _ordered_key(x):
    """fp32 (not NaN) -> int32 key with the same order as the values (negative floats' bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _row_max(row_ptr, V, BLOCK: tl.constexpr):
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    for off in range(0, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        m = tl.maximum(m, tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32))
    return tl.max(m, 0)


@triton.jit
def _top_k_logit_min(row_ptr, V, top_k, M, BLOCK: tl.constexpr):
    """The k-th largest logit (0 < top_k < V): the largest key whose count of logits >= it is at least top_k
    (count changes only at logit values, so it is a logit's key). Invariant: count(lo) >= k > count(hi)."""
    lo = tl.full([], _NEG_INF_KEY, tl.int64)
    hi = _ordered_key(M).to(tl.int64) + 1
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        count = tl.zeros([BLOCK], tl.int32)
        for off in range(0, V, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            count += ((_ordered_key(x).to(tl.int64) >= mid) & (offs < V)).to(tl.int32)
        enough = tl.sum(count, 0) >= top_k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    key = lo.to(tl.int32)
    return tl.where(key >= 0, key, key ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)


@triton.jit
def _top_p_weight_min(row_ptr, V, M, T, logit_min, top_p, BLOCK: tl.constexpr):
    """v* of top-p over the weights that survive top-k: the largest weight value whose fp64 mass (sum of the
    weights >= it) reaches top_p * total (weights are >= 0, so their bit patterns are ordered).
    Invariant: mass(lo) >= goal > mass(hi)."""
    total = tl.zeros([BLOCK], tl.float64)
    for off in range(0, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        total += _kept(tl.exp((x - M) / T), x, logit_min, 0.0).to(tl.float64)
    goal = top_p.to(tl.float64) * tl.sum(total, 0)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], _ONE_BITS + 1, tl.int32)
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        mass = tl.zeros([BLOCK], tl.float64)
        for off in range(0, V, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            w = _kept(tl.exp((x - M) / T), x, logit_min, 0.0)
            mass += tl.where(w.to(tl.int32, bitcast=True) >= mid, w, 0.0).to(tl.float64)
        enough = tl.sum(mass, 0) >= goal
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    return lo.to(tl.float32, bitcast=True)


@triton.jit
def _thresholds_kernel(row_ptr, temp_ptr, topk_ptr, topp_ptr, minp_ptr, thr_ptr, ROWS_PER_B, V,
                       BLOCK: tl.constexpr):
    """Logit row r = program_id(0) of batch row r // ROWS_PER_B: writes thr[r] = (M, logit_min, weight_min), the
    row max and the keep thresholds (-inf, 0: keep all; also for greedy rows)."""
    r = tl.program_id(0)
    b = r // ROWS_PER_B
    T = tl.load(temp_ptr + b)
    row = row_ptr + r.to(tl.int64) * V
    M = _row_max(row, V, BLOCK)
    logit_min = tl.full([], float("-inf"), tl.float32)
    weight_min = tl.full([], 0.0, tl.float32)
    if T > 0:
        top_k = tl.load(topk_ptr + b)
        if (top_k > 0) & (top_k < V):
            logit_min = _top_k_logit_min(row, V, top_k, M, BLOCK)
        top_p = tl.load(topp_ptr + b)
        if top_p < 1:
            weight_min = _top_p_weight_min(row, V, M, T, logit_min, top_p, BLOCK)
        weight_min = tl.maximum(weight_min, tl.load(minp_ptr + b))
    tl.store(thr_ptr + r * 3, M)
    tl.store(thr_ptr + r * 3 + 1, logit_min)
    tl.store(thr_ptr + r * 3 + 2, weight_min)


# ----------------------------------------------------------------------------------------------------------- phase 1
@triton.jit
def _max_sumexp(row_ptr, start, stop, T, BLOCK: tl.constexpr):
    """Online max m and sum exp((l - m) / T) of row[start:stop]; fp32 scalars (m = -inf, s = 0 if all -inf).
    One block reduction (the max) per load; the sums stay per lane until the end."""
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < stop, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # keeps exp() away from -inf - -inf
        s = s * tl.exp((m - m_ref) / T) + tl.exp((x - m_ref) / T)
        m = m_new
    return m, tl.sum(s, 0)


@triton.jit
def _max_argmax(row_ptr, start, stop, BLOCK: tl.constexpr):
    """Max and first index of the max of row[start:stop]; fp32 and int32 scalars. Per-lane running max and first
    index (strict >), reduced once at the end."""
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    a = tl.zeros([BLOCK], tl.int32) + start
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < stop, other=float("-inf")).to(tl.float32)
        a = tl.where(x > m, offs, a)
        m = tl.maximum(m, x)
    m_all = tl.max(m, 0)
    return m_all, tl.min(tl.where(m == m_all, a, _NO_INDEX), 0)


@triton.jit
def _kept_sum(row_ptr, start, stop, thr_ptr, T, BLOCK: tl.constexpr):
    """Filtered version of _max_sumexp: (M, sum of the kept exp((l - M) / T) of row[start:stop]) with the row's max
    M and thresholds read from thr_ptr[0:3] (phase 0), so that every weight is computed against the global max."""
    M = tl.load(thr_ptr)
    logit_min = tl.load(thr_ptr + 1)
    weight_min = tl.load(thr_ptr + 2)
    s = tl.zeros([BLOCK], tl.float32)
    for off in range(start, stop, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < stop, other=float("-inf")).to(tl.float32)
        s += _kept(tl.exp((x - M) / T), x, logit_min, weight_min)
    return M, tl.sum(s, 0)


@triton.jit
def _chunk_stats_kernel(tgt_ptr, dft_ptr, temp_ptr, wsf_ptr, wsa_ptr, thr_t_ptr, thr_d_ptr, K, V, CHUNK, NC, R,
                        BLOCK: tl.constexpr, HAS_DRAFT: tl.constexpr, FILTERED: tl.constexpr):
    """Partial stats of chunk program_id(1) of target row r = program_id(0) = b*(K+1)+i (and draft row b*K+i).
    FILTERED: the sums are of the kept weights, against the row max of phase 0 (thresholds thr_*_ptr [rows, 3])."""
    r = tl.program_id(0)
    c = tl.program_id(1)
    b = r // (K + 1)
    i = r - b * (K + 1)
    T = tl.load(temp_ptr + b)
    start = c * CHUNK
    stop = tl.minimum(start + CHUNK, V)
    slot = r * NC + c
    plane = R * NC
    if T > 0:
        if FILTERED:
            m, s = _kept_sum(tgt_ptr + r.to(tl.int64) * V, start, stop, thr_t_ptr + r * 3, T, BLOCK)
        else:
            m, s = _max_sumexp(tgt_ptr + r.to(tl.int64) * V, start, stop, T, BLOCK)
        tl.store(wsf_ptr + slot, m)
        tl.store(wsf_ptr + plane + slot, s)
        if HAS_DRAFT:
            if i < K:
                if FILTERED:
                    md, sd = _kept_sum(dft_ptr + (b * K + i).to(tl.int64) * V, start, stop,
                                       thr_d_ptr + (b * K + i) * 3, T, BLOCK)
                else:
                    md, sd = _max_sumexp(dft_ptr + (b * K + i).to(tl.int64) * V, start, stop, T, BLOCK)
                tl.store(wsf_ptr + 2 * plane + slot, md)
                tl.store(wsf_ptr + 3 * plane + slot, sd)
    else:
        m, a = _max_argmax(tgt_ptr + r.to(tl.int64) * V, start, stop, BLOCK)
        tl.store(wsf_ptr + slot, m)
        tl.store(wsa_ptr + slot, a)


# ----------------------------------------------------------------------------------------------------------- phase 2
@triton.jit
def _combine_sumexp(m_ptr, s_ptr, NC, T, NC_P2: tl.constexpr):
    """Global max m and the chunk sums rescaled to it ([NC_P2] fp32, 0 past NC); their sum is the row's sum."""
    idx = tl.arange(0, NC_P2)
    mc = tl.load(m_ptr + idx, mask=idx < NC, other=float("-inf"))
    sc = tl.load(s_ptr + idx, mask=idx < NC, other=0.0)
    m = tl.max(mc, 0)
    return m, tl.where(mc > float("-inf"), sc * tl.exp((mc - m) / T), 0.0)


@triton.jit
def _combine_argmax(m_ptr, a_ptr, NC, NC_P2: tl.constexpr):
    """First index of the row's max from the chunk maxima and argmaxes (int32 scalar)."""
    idx = tl.arange(0, NC_P2)
    mc = tl.load(m_ptr + idx, mask=idx < NC, other=float("-inf"))
    ac = tl.load(a_ptr + idx, mask=idx < NC, other=_NO_INDEX)
    return tl.min(tl.where(mc == tl.max(mc, 0), ac, _NO_INDEX), 0)


@triton.jit
def _kept(w, l, logit_min, weight_min):
    """The filters' keep rule (reference.filter_thresholds): w where l >= logit_min and w >= weight_min, else 0."""
    return tl.where((l >= logit_min) & (w >= weight_min), w, 0.0)


@triton.jit
def _weights(tgt_row, dft_row, offs, mask, mt, st, md, sd, T, flt, RESIDUAL: tl.constexpr, FILTERED: tl.constexpr):
    """Draw weights at offs: max(0, p - eps q) if RESIDUAL else exp((l_target - mt) / T); 0 where masked.
    flt = (target logit_min, target weight_min, draft logit_min, draft weight_min, eps), read only if FILTERED."""
    lt = tl.load(tgt_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
    w = tl.exp((lt - mt) / T)
    if FILTERED:
        w = _kept(w, lt, flt[0], flt[1])
    if RESIDUAL:
        ld = tl.load(dft_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        wq = tl.exp((ld - md) / T)
        # Correctly rounded divisions: p - q cannot be contracted into an FMA, so p == q gives an exact 0 residual.
        if FILTERED:
            # eps * q may be contracted into an FMA on GPU (a rounding tie at most); eps = 1 is exact either way.
            w = tl.maximum(tl.math.div_rn(w, st) - flt[4] * tl.math.div_rn(_kept(wq, ld, flt[2], flt[3]), sd), 0.0)
        else:
            w = tl.maximum(tl.math.div_rn(w, st) - tl.math.div_rn(wq, sd), 0.0)
    return w


@triton.jit
def _residual_total(tgt_row, dft_row, V, mt, st, md, sd, T, flt, BLOCK: tl.constexpr, FILTERED: tl.constexpr):
    """Sum of the residual max(0, p - eps q) over the row (fp32 scalar), per-lane sums reduced at the end."""
    total = tl.zeros([BLOCK], tl.float32)
    for off in range(0, V, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        total += _weights(tgt_row, dft_row, offs, offs < V, mt, st, md, sd, T, flt, True, FILTERED)
    return tl.sum(total, 0)


@triton.jit
def _last_positive(tgt_row, dft_row, stop, mt, st, md, sd, T, flt, BLOCK: tl.constexpr, RESIDUAL: tl.constexpr,
                   FILTERED: tl.constexpr):
    """Last t < stop with w_t > 0, scanning blocks backwards from stop (-1 if none); the rare rounding fallback."""
    last = tl.full([], -1, tl.int32)
    off = stop - 1 - (stop - 1) % BLOCK
    while (off >= 0) & (last < 0):
        offs = off + tl.arange(0, BLOCK)
        w = _weights(tgt_row, dft_row, offs, offs < stop, mt, st, md, sd, T, flt, RESIDUAL, FILTERED)
        last = tl.max(tl.where(w > 0, offs, -1), 0)
        off = off - BLOCK
    return last


@triton.jit
def _scan(tgt_row, dft_row, start, carry, thr, V, mt, st, md, sd, T, flt, BLOCK: tl.constexpr,
          RESIDUAL: tl.constexpr, FILTERED: tl.constexpr):
    """Inverse-CDF scan from `start` (cumsum before it = carry): first t >= start with w_t > 0 and cumsum_t >= thr,
    else the last t with w_t > 0. Stops after the block holding the crossing. Returns an int32 scalar."""
    found = tl.full([], -1, tl.int32)
    off = start + tl.zeros([], tl.int32)  # start / carry may be literals: make them loop-carried scalars
    carry = carry + tl.zeros([], tl.float32)
    while (off < V) & (found < 0):
        offs = off + tl.arange(0, BLOCK)
        w = _weights(tgt_row, dft_row, offs, offs < V, mt, st, md, sd, T, flt, RESIDUAL, FILTERED)
        cdf = carry + tl.cumsum(w, 0)
        first = tl.min(tl.where((w > 0) & (cdf >= thr), offs, _NO_INDEX), 0)
        found = tl.where(first < _NO_INDEX, first, -1)
        carry = carry + tl.sum(w, 0)
        off = off + BLOCK
    if found < 0:
        found = _last_positive(tgt_row, dft_row, V, mt, st, md, sd, T, flt, BLOCK, RESIDUAL, FILTERED)
    return found


@triton.jit
def _scan_target(tgt_row, wt, u, V, CHUNK, mt, T, flt, NC_P2: tl.constexpr, BLOCK: tl.constexpr,
                 FILTERED: tl.constexpr):
    """Inverse-CDF draw from the target weights exp((l - mt) / T) with the rescaled chunk sums wt [NC_P2]: the scan
    starts at the first chunk whose inclusive prefix reaches u * sum (the last positive chunk if rounding finds none)."""
    idx = tl.arange(0, NC_P2)
    thr = u * tl.sum(wt, 0)
    positive = wt > 0
    c = tl.min(tl.where(positive & (tl.cumsum(wt, 0) >= thr), idx, NC_P2), 0)
    c = tl.where(c < NC_P2, c, tl.max(tl.where(positive, idx, -1), 0))
    carry = tl.sum(tl.where(idx < c, wt, 0.0), 0)
    return _scan(tgt_row, tgt_row, c * CHUNK, carry, thr, V, mt, 1.0, mt, 1.0, T, flt, BLOCK, False, FILTERED)


@triton.jit
def _accept_kernel(tgt_ptr, dft_ptr, dtok_ptr, temp_ptr, unif_ptr, wsf_ptr, wsa_ptr, acc_ptr, tok_ptr,
                   thr_t_ptr, thr_d_ptr, len_ptr, K, V, CHUNK, NC, R,
                   NC_P2: tl.constexpr, K1_P2: tl.constexpr, BLOCK: tl.constexpr, HAS_DRAFT: tl.constexpr,
                   FILTERED: tl.constexpr):
    """Row b = program_id(0): acceptance in position order, then the emitted token; writes accepted[b], tokens[b].
    FILTERED: weights are kept by the thresholds thr_*_ptr [rows, 3] of phase 0, lenience len_ptr [B]."""
    b = tl.program_id(0)
    T = tl.load(temp_ptr + b)
    if FILTERED:
        eps = tl.load(len_ptr + b)
    else:
        eps = 1.0
    plane = R * NC
    row0 = b * (K + 1)
    n = tl.full([], 0, tl.int32)  # accepted so far
    rejected = tl.full([], 0, tl.int32)
    if HAS_DRAFT:
        while (n < K) & (rejected == 0):
            r = row0 + n
            x = tl.load(dtok_ptr + b * K + n)
            if T > 0:
                mt, wt = _combine_sumexp(wsf_ptr + r * NC, wsf_ptr + plane + r * NC, NC, T, NC_P2)
                md, wd = _combine_sumexp(wsf_ptr + 2 * plane + r * NC, wsf_ptr + 3 * plane + r * NC, NC, T, NC_P2)
                lt = tl.load(tgt_ptr + r.to(tl.int64) * V + x).to(tl.float32)
                ld = tl.load(dft_ptr + (b * K + n).to(tl.int64) * V + x).to(tl.float32)
                wx = tl.exp((lt - mt) / T)
                vx = tl.exp((ld - md) / T)
                if FILTERED:
                    flt = _row_filter(thr_t_ptr, thr_d_ptr, r, b * K + n, eps)
                    wx = _kept(wx, lt, flt[0], flt[1])
                    vx = _kept(vx, ld, flt[2], flt[3])
                px = wx / tl.sum(wt, 0)
                qx = vx / tl.sum(wd, 0)
                if FILTERED:
                    ok = (px > 0) & (tl.load(unif_ptr + r) * (eps * qx) <= px)
                else:
                    ok = (px > 0) & (tl.load(unif_ptr + r) * qx <= px)
            else:
                ok = x == _combine_argmax(wsf_ptr + r * NC, wsa_ptr + r * NC, NC, NC_P2).to(tl.int64)
            n = n + ok.to(tl.int32)
            rejected = 1 - ok.to(tl.int32)

    # The emitted token comes from position n: the first rejected one, or the bonus position K.
    r = row0 + n
    tgt_row = tgt_ptr + r.to(tl.int64) * V
    if T > 0:
        u = tl.load(unif_ptr + row0 + K)
        mt, wt = _combine_sumexp(wsf_ptr + r * NC, wsf_ptr + plane + r * NC, NC, T, NC_P2)
        token = tl.full([], -1, tl.int32)
        flt = (float("-inf"), 0.0, float("-inf"), 0.0, 1.0)  # unused unless FILTERED
        if FILTERED:
            if HAS_DRAFT:
                flt = _row_filter(thr_t_ptr, thr_d_ptr, r, b * K + tl.minimum(n, K - 1), eps)  # clamped for the bonus
            else:
                flt = _row_filter(thr_t_ptr, thr_t_ptr, r, r, eps)
        if HAS_DRAFT:
            if rejected != 0:
                dft_row = dft_ptr + (b * K + n).to(tl.int64) * V
                md, wd = _combine_sumexp(wsf_ptr + 2 * plane + r * NC, wsf_ptr + 3 * plane + r * NC, NC, T, NC_P2)
                st = tl.sum(wt, 0)
                sd = tl.sum(wd, 0)
                total = _residual_total(tgt_row, dft_row, V, mt, st, md, sd, T, flt, BLOCK, FILTERED)
                if total > 0:
                    token = _scan(tgt_row, dft_row, 0, 0.0, u * total, V, mt, st, md, sd, T, flt, BLOCK, True,
                                  FILTERED)
        if token < 0:  # bonus token, or a rejection whose residual is all zero: draw from the target weights
            token = _scan_target(tgt_row, wt, u, V, CHUNK, mt, T, flt, NC_P2, BLOCK, FILTERED)
    else:
        token = _combine_argmax(wsf_ptr + r * NC, wsa_ptr + r * NC, NC, NC_P2)

    offs = tl.arange(0, K1_P2)
    if HAS_DRAFT:
        out = tl.load(dtok_ptr + b * K + offs, mask=offs < n, other=-1)
    else:
        out = tl.full([K1_P2], -1, tl.int64)
    out = tl.where(offs == n, token.to(tl.int64), out)
    tl.store(tok_ptr + row0 + offs, out, mask=offs <= K)
    tl.store(acc_ptr + b, n.to(tl.int64))


@triton.jit
def _row_filter(thr_t_ptr, thr_d_ptr, r, d, eps):
    """flt of _weights for target row r and draft row d: (logit_min, weight_min of each, eps)."""
    return (tl.load(thr_t_ptr + r * 3 + 1), tl.load(thr_t_ptr + r * 3 + 2),
            tl.load(thr_d_ptr + d * 3 + 1), tl.load(thr_d_ptr + d * 3 + 2), eps)


# ----------------------------------------------------------------------------------------------------------- wrappers
@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter on CPU tensors: keep the grid tiny


def _chunk_size(rows: int, V: int, device: torch.device, block: int) -> int:
    """Chunk of V per phase-1 program: about PROGRAMS_PER_SM programs per SM, clamped to [MIN_CHUNK, MAX_CHUNK]."""
    chunks_per_row = triton.cdiv(PROGRAMS_PER_SM * _sm_count(device), rows)
    chunk = triton.next_power_of_2(triton.cdiv(V, chunks_per_row))
    return max(block, min(MAX_CHUNK, max(MIN_CHUNK, chunk)))


def _launch(target, draft, draft_tokens, temperature, uniforms, B, K, V, block, chunk, scan_block, settings=None):
    """Allocates outputs and workspace, launches the phases. target [B*(K+1), V] rows; returns (accepted, tokens).
    settings: None (temperature only) or (top_k int64 [B], top_p, min_p, lenience fp32 [B]): phase 0 runs first."""
    assert block & (block - 1) == 0 and scan_block & (scan_block - 1) == 0, "block sizes must be powers of two"
    device = target.device
    R = B * (K + 1)
    chunk = chunk or _chunk_size(R, V, device, block)
    NC = triton.cdiv(V, chunk)
    wsf = torch.empty((4, R, NC), dtype=torch.float32, device=device)
    wsa = torch.empty((R, NC), dtype=torch.int32, device=device)
    accepted = torch.empty(B, dtype=torch.int64, device=device)
    tokens = torch.empty((B, K + 1), dtype=torch.int64, device=device)
    has_draft = K > 0
    filtered = settings is not None
    thr_t = thr_d = lenience = temperature  # placeholders, never read unless filtered
    if filtered:
        top_k, top_p, min_p, lenience = settings
        thr_t = _thresholds(target, temperature, top_k, top_p, min_p, K + 1, block)
        thr_d = _thresholds(draft, temperature, top_k, top_p, min_p, K, block) if has_draft else thr_t
    _chunk_stats_kernel[(R, NC)](
        target, draft, temperature, wsf, wsa, thr_t, thr_d, K, V, chunk, NC, R,
        BLOCK=block, HAS_DRAFT=has_draft, FILTERED=filtered, num_warps=8 if block >= 2048 else 4,
    )
    _accept_kernel[(B,)](
        target, draft, draft_tokens, temperature, uniforms, wsf, wsa, accepted, tokens, thr_t, thr_d, lenience,
        K, V, chunk, NC, R,
        NC_P2=triton.next_power_of_2(NC), K1_P2=triton.next_power_of_2(K + 1), BLOCK=scan_block,
        HAS_DRAFT=has_draft, FILTERED=filtered, num_warps=8 if scan_block >= 2048 else 4,
    )
    return accepted, tokens


def _thresholds(logits, temperature, top_k, top_p, min_p, rows_per_b, block):
    """Phase 0 over the logit rows of `logits` ([B*rows_per_b rows, V]): fp32 [rows, 3] (M, logit_min, weight_min)."""
    V = logits.shape[-1]
    rows = logits.numel() // V
    thr = torch.empty((rows, 3), dtype=torch.float32, device=logits.device)
    _thresholds_kernel[(rows,)](logits, temperature, top_k, top_p, min_p, thr, rows_per_b, V, BLOCK=block,
                                num_warps=8 if block >= 2048 else 4)
    return thr


def _check_common(logits, temperature, uniforms):
    assert logits.is_contiguous() and logits.dtype in _FLOATS
    assert temperature.is_contiguous() and temperature.dtype == torch.float32
    assert uniforms.is_contiguous() and uniforms.dtype == torch.float32


def _check_settings(B, *settings):
    for t, dtype in zip(settings, (torch.int64, torch.float32, torch.float32, torch.float32)):
        assert t.is_contiguous() and t.dtype == dtype and t.shape == (B,)


def speculative_sample_triton(draft_logits, target_logits, draft_tokens, temperature, uniforms, *,
                              block=BLOCK, chunk=None, scan_block=SCAN_BLOCK, settings=None):
    """draft_logits [B,k,V], target_logits [B,k+1,V] (f32|bf16|f16, contiguous), draft_tokens [B,k] int64,
    temperature [B] f32, uniforms [B,k+1] f32 -> (accepted [B] int64, tokens [B,k+1] int64, -1 after the emitted one).
    block / chunk / scan_block: phase-1 load size, phase-1 elements per program (None: from the SM count), phase-2
    load size; powers of two (tests shrink them). settings: see speculative_sample_filtered_triton."""
    _check_common(target_logits, temperature, uniforms)
    assert draft_logits.is_contiguous() and draft_logits.dtype == target_logits.dtype
    assert draft_tokens.is_contiguous() and draft_tokens.dtype == torch.int64
    B, K, V = draft_logits.shape
    if K == 0:
        return _launch(target_logits, None, None, temperature, uniforms, B, 0, V, block, chunk, scan_block, settings)
    return _launch(target_logits, draft_logits, draft_tokens, temperature, uniforms, B, K, V, block, chunk,
                   scan_block, settings)


def speculative_sample_filtered_triton(draft_logits, target_logits, draft_tokens, temperature, uniforms, top_k, top_p,
                                       min_p, lenience, **kwargs):
    """speculative_sample_triton with the per-row top_k int64 [B], top_p, min_p, lenience fp32 [B]."""
    _check_settings(draft_logits.shape[0], top_k, top_p, min_p, lenience)
    return speculative_sample_triton(draft_logits, target_logits, draft_tokens, temperature, uniforms,
                                     settings=(top_k, top_p, min_p, lenience), **kwargs)


def sample_triton(logits, temperature, uniforms, *, block=BLOCK, chunk=None, scan_block=SCAN_BLOCK, settings=None):
    """logits [B,V] f32|bf16|f16 contiguous, temperature [B] f32 (0: argmax), uniforms [B] f32 -> tokens [B] int64."""
    _check_common(logits, temperature, uniforms)
    B, V = logits.shape
    _, tokens = _launch(logits, None, None, temperature, uniforms, B, 0, V, block, chunk, scan_block, settings)
    return tokens.view(B)


def sample_filtered_triton(logits, temperature, uniforms, top_k, top_p, min_p, **kwargs):
    """sample_triton from the filtered distribution: top_k int64 [B], top_p, min_p fp32 [B]."""
    B = logits.shape[0]
    _check_settings(B, top_k, top_p, min_p)
    ones = torch.ones(B, dtype=torch.float32, device=logits.device)
    return sample_triton(logits, temperature, uniforms, settings=(top_k, top_p, min_p, ones), **kwargs)

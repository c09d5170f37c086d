"""The Triton kernels of varlen attention (FlashAttention-2 over cu_seqlens: forward, backward delta, dq,
dk/dv) and the online-softmax step decode_attention shares. Launch configurations, launchers, the torch
paths and the custom op are in varlen_attention.py; the algorithm in docs/kernels-attention.md.

Shapes: T packed tokens, B samples, Hq query heads, Hkv key/value heads, D head dim.
"""

import triton
import triton.language as tl

# log2(e): the kernels work in base 2 (exp2/log2) with this factor folded into the scale. A module global
# read inside @triton.jit code must be a constexpr object: `LOG2E: tl.constexpr = ...` runs in the
# interpreter, but Triton 3.9's compiler rejects it (NameError "cannot access global variable"; checked
# with triton.compile for sm_90), while `tl.constexpr(...)` works in both and in older Tritons.
LOG2E = tl.constexpr(1.4426950408889634)

# The pack's token count T and the GQA group are never specialized by the JIT: left to it, T = 8192 would
# be compiled as "divisible by 16" and group = 1 (MHA) as a constant, launches that the compile check's
# specs (T and group plain i32) do not compile: the check compiles exactly what runs, for every pack size
# and every ratio (1:1, 4:1, 7:1, ...). Found by tests/ops/test_new_shapes.py. They only index LSE/DELTA
# rows and map heads (the loads along D take their alignment from the strides, still marked); what
# their specialization was worth on a GPU is not measured.
_NOT_SPECIALIZED = ["T", "group"]


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Every kernel locates its sample through CU_SEQLENS and works on sample-local rows
# 0..seqlen-1; rows of a tile past seqlen are loaded as zeros and never stored.
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, seqlen, offs_d, CHECK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks are emitted only where needed so full tiles stay vectorized."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=(rows < seqlen)[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, seqlen, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=(rows < seqlen)[:, None])
    else:
        tl.store(ptrs, x, mask=(rows < seqlen)[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _fwd_kv_step(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online-softmax update of one query tile with keys/values start_n .. start_n + BLOCK_N."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, seqlen, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, seqlen, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
    if MASKED:
        ok = offs_n[None, :] < seqlen
        if CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
        s = tl.where(ok, s, float("-inf"))
    # Every row sees key 0 in the first step, so m_new is finite and exp2(-inf - m_new) is a clean 0.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _varlen_fwd_kernel(
    Q, K, V, O,  # q (T, Hq, D), k and v (T, Hkv, D), o (T, Hq, D); unit stride along D
    LSE,  # (Hq, T) fp32 out: natural-log log-sum-exp of each query row's scaled scores
    CU_SEQLENS,  # (B + 1,) int32 sample boundaries
    sm_scale,  # softmax scale (fp32)
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,  # elements
    T,  # packed tokens, the row stride of LSE
    group,  # Hq // Hkv query heads per key/value head
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # BLOCK_D = next_pow2(HEAD_DIM)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # BLOCK_M % BLOCK_N == 0
    UPCAST: tl.constexpr,  # cast loads to fp32 (interpreter bf16 only)
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, else "tf32" (unused for 16-bit operands)
):
    """One program: output rows pid_m*BLOCK_M .. +BLOCK_M of query head pid_h in sample pid_b."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + pid_b)
    seqlen = tl.load(CU_SEQLENS + pid_b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    tok0 = seq_start.to(tl.int64)
    kv_h = pid_h // group
    Q += tok0 * stride_qt + pid_h * stride_qh
    K += tok0 * stride_kt + kv_h * stride_kh
    V += tok0 * stride_vt + kv_h * stride_vh
    O += tok0 * stride_ot + pid_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, seqlen, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
    qk_scale = sm_scale * LOG2E  # exp2 instead of exp: one multiply folded into the scale
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        full_end = start_m  # key tiles left of the diagonal need no mask
        hi = tl.minimum(start_m + BLOCK_M, seqlen)  # tiles above the diagonal are skipped
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        hi = seqlen
    for start_n in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _fwd_kv_step(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen,
                                     qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_kv_step(acc, l_i, m_i, q, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen,
                                     qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    acc = acc / l_i[:, None]
    _store_tile(O + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), offs_m, seqlen, offs_d,
                HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.log2(l_i)) / LOG2E
    tl.store(LSE + pid_h * T + tok0 + offs_m, lse, mask=offs_m < seqlen)


@triton.jit(do_not_specialize=["T"])
def _varlen_bwd_delta_kernel(
    O, DO,  # (T, Hq, D) output and its gradient; unit stride along D
    DELTA,  # (Hq, T) fp32 out: rowsum(dO * O)
    stride_ot, stride_oh, stride_dot, stride_doh, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """One program: delta for tokens pid_t*BLOCK_T .. +BLOCK_T of query head pid_h (samples do not matter)."""
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_t.to(tl.int64)
    o = _load_tile(O + pid_h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :], offs_t, T, offs_d, True,
                   HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + pid_h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :], offs_t, T, offs_d, True,
                    HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_h * T + rows, delta, mask=offs_t < T)


@triton.jit
def _dq_kv_step(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = _load_tile(K + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, seqlen, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, seqlen, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale - lse2[:, None])
    if MASKED:
        ok = offs_n[None, :] < seqlen
        if CAUSAL:
            ok = ok & (offs_m[:, None] >= offs_n[None, :])
        p = tl.where(ok, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _varlen_bwd_dq_kernel(
    Q, K, V, DO, DQ,  # q, do, dq (T, Hq, D); k, v (T, Hkv, D); unit stride along D
    LSE, DELTA,  # (Hq, T) fp32 from the forward and the delta kernel
    CU_SEQLENS,  # (B + 1,) int32
    sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_dqt, stride_dqh,
    T, group,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dq for rows pid_m*BLOCK_M .. +BLOCK_M of query head pid_h in sample pid_b (no atomics)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + pid_b)
    seqlen = tl.load(CU_SEQLENS + pid_b + 1) - seq_start
    start_m = pid_m * BLOCK_M
    if start_m >= seqlen:
        return
    tok0 = seq_start.to(tl.int64)
    kv_h = pid_h // group
    Q += tok0 * stride_qt + pid_h * stride_qh
    DO += tok0 * stride_dot + pid_h * stride_doh
    DQ += tok0 * stride_dqt + pid_h * stride_dqh
    K += tok0 * stride_kt + kv_h * stride_kh
    V += tok0 * stride_vt + kv_h * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, seqlen, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m, seqlen, offs_d, True, HEAD_DIM,
                    BLOCK_D)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_ok = offs_m < seqlen
    lse2 = tl.load(LSE + pid_h * T + tok0 + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + pid_h * T + tok0 + offs_m, mask=row_ok, other=0.0)
    qk_scale = sm_scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if CAUSAL:
        full_end = start_m
        hi = tl.minimum(start_m + BLOCK_M, seqlen)
    else:
        full_end = (seqlen // BLOCK_N) * BLOCK_N
        hi = seqlen
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_kv_step(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen, qk_scale,
                         False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    for start_n in range(full_end, hi, BLOCK_N):
        dq = _dq_kv_step(dq, q, do, lse2, delta, K, V, stride_kt, stride_vt, start_n, offs_m, offs_d, seqlen, qk_scale,
                         True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, DOT_PRECISION)
    _store_tile(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), offs_m,
                seqlen, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _dkdv_q_step(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_dot, start_m, offs_n, offs_d, seqlen, qk_scale,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contribution of query rows start_m .. +BLOCK_M to one key/value tile (transposed scores)."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = _load_tile(Q + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, seqlen, offs_d, MASKED, HEAD_DIM, BLOCK_D)
    do = _load_tile(DO + offs_m[:, None] * stride_dot + offs_d[None, :], offs_m, seqlen, offs_d, MASKED, HEAD_DIM,
                    BLOCK_D)
    if MASKED:
        lse2 = tl.load(LSE + offs_m, mask=offs_m < seqlen, other=0.0) * LOG2E
        delta = tl.load(DELTA + offs_m, mask=offs_m < seqlen, other=0.0)
    else:
        lse2 = tl.load(LSE + offs_m) * LOG2E
        delta = tl.load(DELTA + offs_m)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale - lse2[None, :])  # (BLOCK_N, BLOCK_M)
    if MASKED:
        ok = offs_m[None, :] < seqlen
        if CAUSAL:
            ok = ok & (offs_m[None, :] >= offs_n[:, None])
        p_t = tl.where(ok, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=_NOT_SPECIALIZED)
def _varlen_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV,  # q, do (T, Hq, D); k, v, dk, dv (T, Hkv, D); unit stride along D
    LSE, DELTA,  # (Hq, T) fp32
    CU_SEQLENS,  # (B + 1,) int32
    sm_scale,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    T, group,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program: dk, dv for keys pid_n*BLOCK_N .. +BLOCK_N of KV head pid_h in sample pid_b.

    The `group` query heads sharing this KV head are summed in a fixed order inside the program, so
    dk/dv are deterministic and need neither atomics nor a per-query-head buffer.
    """
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    pid_b = tl.program_id(2)
    seq_start = tl.load(CU_SEQLENS + pid_b)
    seqlen = tl.load(CU_SEQLENS + pid_b + 1) - seq_start
    start_n = pid_n * BLOCK_N
    if start_n >= seqlen:
        return
    tok0 = seq_start.to(tl.int64)
    K += tok0 * stride_kt + pid_h * stride_kh
    V += tok0 * stride_vt + pid_h * stride_vh
    DK += tok0 * stride_dkt + pid_h * stride_dkh
    DV += tok0 * stride_dvt + pid_h * stride_dvh

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + offs_n[:, None] * stride_kt + offs_d[None, :], offs_n, seqlen, offs_d, True, HEAD_DIM, BLOCK_D)
    v = _load_tile(V + offs_n[:, None] * stride_vt + offs_d[None, :], offs_n, seqlen, offs_d, True, HEAD_DIM, BLOCK_D)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = sm_scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query tiles: [lo, diag_hi) straddle the diagonal (masked), [diag_hi, body_end) are full,
    # [body_end, seqlen) is the ragged last tile (masked). Tiles left of lo see none of these keys.
    if CAUSAL:
        lo = (start_n // BLOCK_M) * BLOCK_M
        diag_hi = tl.minimum(tl.cdiv(start_n + BLOCK_N, BLOCK_M) * BLOCK_M, seqlen)
    else:
        lo = 0
        diag_hi = 0
    body_end = tl.maximum(diag_hi, (seqlen // BLOCK_M) * BLOCK_M)
    for g in range(0, group):
        q_h = pid_h * group + g
        Qg = Q + tok0 * stride_qt + q_h * stride_qh
        DOg = DO + tok0 * stride_dot + q_h * stride_doh
        LSEg = LSE + q_h * T + tok0
        DELTAg = DELTA + q_h * T + tok0
        for start_m in range(lo, diag_hi, BLOCK_M):
            dk, dv = _dkdv_q_step(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, stride_dot, start_m, offs_n, offs_d,
                                  seqlen, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, DOT_PRECISION)
        for start_m in range(diag_hi, body_end, BLOCK_M):
            dk, dv = _dkdv_q_step(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, stride_dot, start_m, offs_n, offs_d,
                                  seqlen, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, DOT_PRECISION)
        for start_m in range(body_end, seqlen, BLOCK_M):
            dk, dv = _dkdv_q_step(dk, dv, k, v, Qg, DOg, LSEg, DELTAg, stride_qt, stride_dot, start_m, offs_n, offs_d,
                                  seqlen, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, DOT_PRECISION)
    _store_tile(DK + offs_n[:, None] * stride_dkt + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), offs_n,
                seqlen, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + offs_n[:, None] * stride_dvt + offs_d[None, :], dv.to(DV.dtype.element_ty), offs_n, seqlen,
                offs_d, HEAD_DIM, BLOCK_D)

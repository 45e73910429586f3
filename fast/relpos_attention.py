"""Exact attention with SAM's decomposed relative-position term, as Triton kernels (forward and backward) for the
blocks of SAM's ViT: row kernels for the global blocks, window kernels (further down) for the windowed ones.

SAM adds to the logits of query i = (row a, col b) and key j = (row r, col c)
    bias(i, j) = rel_h[i, r] + rel_w[i, c],    rel_h = q_i . Rh[a - r],  rel_w = q_i . Rw[b - c],
which no fused PyTorch kernel takes as it is. fast.forwards.vit_attention otherwise folds it into q and k (q' =
[q | rel_h | rel_w], k' = [k | onehot(r) | onehot(c)]): exact, but the head width grows from 64 to 192.

Here the key tile is one key row (the W keys of row r). Within it rel_h[i, r] is one number per query and rel_w[i, c]
is the same (queries x W) tile for every key row, loaded once per query block. The logits tile is then
q k_r^T * scale + rel_h[:, r] + rel_w, and the rest is flash attention (online softmax in fp32 through exp2, no
N x N matrix in memory). The backward needs the logits' gradient ds summed over key columns (d rel_h[:, r], one
column per key row) and over key rows (d rel_w, one accumulator per query block): the kernel that walks the keys of
one query block writes both without atomics. rel_h and rel_w are computed in the kernels from q and the tables
(_rel_term) instead of by SAM's einsums; the forward stores them for the backward, and the query-side kernels turn
d rel_h and d rel_w into q's gradient (_rel_term_grad).

Kernels (FlashAttention-2's backward split): `_forward` (queries in blocks, keys row by row), `_backward_dq` (the
same walk: dq, d rel_h, d rel_w), `_backward_dkdv` (a block of keys, queries in blocks: dk, dv); the window kernels
likewise, but a window whose queries all fit one tile takes a one-kernel backward (`_window_backward_dq`, WHOLE).
Inputs: qkv (B, N, 3, heads, D) as SAM's qkv projection writes it, N = H * W; SAM's tables Rh (2H - 1, D),
Rw (2W - 1, D). The output is (B, N, heads, D), the layout the block's projection reads; the backward kernels write
dq, dk and dv into one gradient laid out as qkv, so that autograd need not stack three tensors into it. Forward +
backward of one global ViT-B block at 1024, batch 8, bf16, H100: 7.2 ms against 12.1 ms for the folded form and
3.2 ms without the term; two thirds of it is the backward, whose two kernels both recompute the logits.

`usable` (and `usable_windows`, for window_attention) says which attentions the kernels take: D one of 16, 32, 64,
128, fp32 or bf16 CUDA tensors, and W a power of two from 16 to 128 for the row kernels (ViT-B and ViT-L global
blocks at 1024 or 512) or a grid of at most 64 x 64 for the window kernels (their 14 x 14 windows); not ViT-H,
whose heads are 80 wide. Everything else goes through the folded path.

window_attention gives the window kernels a windowed block's whole grid (B, H * W tokens) instead of its padded
windows: they read each window's tokens where they lie in the grid, take the padding keys' k and v (stock SAM pads
64 x 64 to 70 x 70 with zero tokens, whose k and v are the qkv bias) from a (2, heads, D) input, skip the padding
queries and write the output in the grid's layout. The block's qkv and proj then run on 4096 tokens instead of
4900, with no pad, partition or unpartition copies (fast.forwards.vit_window_attention).
"""
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): softmax through exp2; kernels see only constexpr globals


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests): CPU tensors


def by_rows(W):
    """Whether the row kernels take a grid W wide: a key row is their tile (W a power of two from 16 to
    128: ViT's global grids). Narrower or other grids (windows) go to the window kernels."""
    return W & (W - 1) == 0 and 16 <= W <= 128


def usable_shape(H, W, D):
    """Whether some kernel's tiles fit an H x W grid with heads D wide: D a power of two from 16 to 128,
    and the row kernels' W (by_rows) or a grid of at most 64 x 64 for the window kernels."""
    return D in (16, 32, 64, 128) and (by_rows(W) or H <= 64 and W <= 64)


def _takes(qkv):
    """Whether the kernels run on qkv's device and dtype: CUDA (or Triton's interpreter), fp32 or bf16 (the
    dtypes the tests check: autocast's and fp32)."""
    on_device = qkv.is_cuda or INTERPRETED and qkv.device.type == "cpu"
    return on_device and qkv.dtype in (torch.float32, torch.bfloat16)


def usable(qkv, H, W):
    """Whether the kernels take this attention, qkv (B, N, 3, heads, D): as _takes, and a shape the tiles fit."""
    return _takes(qkv) and usable_shape(H, W, qkv.shape[-1]) and qkv.shape[1] == H * W


@triton.jit
def _online_softmax_step(s, shift, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key tile of the forward's online softmax (FlashAttention): logits s + shift (BLOCK_M, keys) in log2
    units, shift (BLOCK_M,) one number per query for the whole tile (a key row's rel_h; 0 in the windows),
    values v (keys, D); the running max m_i, sum l_i and output acc, rescaled to the new max and returned.
    The shift goes into the max that every logit is taken from, not into each logit: one operation per
    entry fewer, which counts because the entries' exp2 and arithmetic, not the products, bound these
    kernels. The backward kernels do the same (rel_w less the log-sum-exp once per query block in
    _backward_dq, the bias tile of _backward_dkdv one multiply-add per entry)."""
    m_new = tl.maximum(m_i, tl.max(s, 1) + shift)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - (m_new - shift)[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _dkdv_step(p_t, q, do, v, delta, dk, dv, PRECISION: tl.constexpr):
    """One query tile of the key-side backward, transposed (keys along the first axis): the softmax p_t
    (keys, BLOCK_M) adds p^T do to dv and ds^T q to dk, ds = p * (do v^T - rowsum(o * do))."""
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _load_table(T, SIZE: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
    """(2 SP, D) tile of a rel-pos table (2 SIZE - 1, D), rows contiguous; rows past its end zero."""
    t = tl.arange(0, 2 * SP)
    return tl.load(T + t[:, None] * D + tl.arange(0, D)[None, :], mask=(t < 2 * SIZE - 1)[:, None], other=0.0)


@triton.jit
def _rel_term(q, T, pos, SIZE: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """(BLOCK_M, SP) rel-pos term of queries q at positions pos (their rows, or columns) along an axis SIZE
    long, table T (2 SIZE - 1, D):  rel[i, r] = q_i . T[pos_i - r + SIZE - 1]  (rel_h with rows and Rh,
    rel_w with columns and Rw); zero for r >= SIZE; in q's dtype, the rounding SAM's einsums get under
    autocast. One product with the whole table, q T^T (BLOCK_M, 2 SP), whose entries each query then picks
    (tl.gather along the table axis): SAM's einsum against the table gathered to (SIZE, SIZE, D), without
    that table or the einsum's copies of q in memory."""
    p = tl.dot(q, tl.trans(_load_table(T, SIZE, SP, D).to(q.dtype)), input_precision=PRECISION).to(q.dtype)
    r = tl.arange(0, SP)[None, :]
    at = pos[:, None] - r + SIZE - 1  # (BLOCK_M, SP): the table row of each entry
    rel = tl.gather(p, tl.minimum(tl.maximum(at, 0), 2 * SP - 1), 1)
    return tl.where(r < SIZE, rel, 0.0).to(q.dtype)


@triton.jit
def _rel_term_grad(drel, T, pos, SIZE: tl.constexpr, SP: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """q's gradient (BLOCK_M, D, fp32) through _rel_term, from the term's gradient drel (BLOCK_M, SP) in q's
    dtype: each entry put back at the table row it was picked from (table row t of a query at pos held
    r = pos - t + SIZE - 1: the same gather the other way), then times the table."""
    t = tl.arange(0, 2 * SP)[None, :]
    r = pos[:, None] - t + SIZE - 1  # (BLOCK_M, 2 SP)
    d_p = tl.where((r >= 0) & (r < SIZE), tl.gather(drel, tl.minimum(tl.maximum(r, 0), SP - 1), 1), 0.0)
    return tl.dot(d_p.to(drel.dtype), _load_table(T, SIZE, SP, D).to(drel.dtype), input_precision=PRECISION)


@triton.jit
def _row_slice(T, a, SIZE: tl.constexpr, SP: tl.constexpr, D: tl.constexpr):
    """(SP, D): table rows a - r + SIZE - 1 for r < SIZE (zero beyond), the ones that queries in grid row a
    pick; for a query block within one grid row _rel_term and _rel_term_grad are then one product each,
    q @ slice^T and drel @ slice, with no picking."""
    r = tl.arange(0, SP)
    return tl.load(T + (a - r + SIZE - 1)[:, None] * D + tl.arange(0, D)[None, :], mask=(r < SIZE)[:, None],
                   other=0.0)


@triton.jit
def _row_kernels_rel_h(q, TH, offs_m, ROWS: tl.constexpr, COLS: tl.constexpr, RP: tl.constexpr,
                       D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """rel_h (BLOCK_M, RP) in the row kernels: from the row's slice of the table when the block lies within
    one grid row (BLOCK_M <= COLS, both powers of two), else by _rel_term."""
    if BLOCK_M <= COLS:
        t = _row_slice(TH, tl.program_id(0) * BLOCK_M // COLS, ROWS, RP, D).to(q.dtype)
        return tl.dot(q, tl.trans(t), input_precision=PRECISION).to(q.dtype)
    else:
        return _rel_term(q, TH, offs_m // COLS, ROWS, RP, D, PRECISION)


@triton.jit
def _row_kernels_rel_h_grad(drh, TH, offs_m, ROWS: tl.constexpr, COLS: tl.constexpr, RP: tl.constexpr,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """q's gradient (BLOCK_M, D, fp32) through _row_kernels_rel_h, from d rel_h (BLOCK_M, RP) in q's dtype,
    by the same choice."""
    if BLOCK_M <= COLS:
        t = _row_slice(TH, tl.program_id(0) * BLOCK_M // COLS, ROWS, RP, D).to(drh.dtype)
        return tl.dot(drh, t, input_precision=PRECISION)
    else:
        return _rel_term_grad(drh, TH, offs_m // COLS, ROWS, RP, D, PRECISION)


@triton.jit
def _forward(Q, K, V, TH, TW, O, LSE, RH, RW,
             sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
             heads, scale,
             N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
             BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """One query block, keys row by row. Also writes rel_h and rel_w to RH, RW, transposed (contiguous (B,
    heads, ROWS / COLS, N): a key row's rel_h and a key column's rel_w run along the queries), which the
    backward kernels read."""
    b, h = tl.program_id(2), tl.program_id(1)
    bh = b * heads + h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's queries
    offs_c = tl.arange(0, COLS)  # key columns: the keys of one key row
    offs_r = tl.arange(0, RP)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :])  # (BLOCK_M, D)
    rel_h = _row_kernels_rel_h(q, TH, offs_m, ROWS, COLS, RP, D, BLOCK_M, PRECISION)  # (BLOCK_M, RP)
    rw = _rel_term(q, TW, offs_m % COLS, COLS, COLS, D, PRECISION)  # (BLOCK_M, COLS)
    # rel_w[i, c]: the same for every key row, kept in registers; rel_h[:, r] is one column per key row, which
    # registers cannot index: read back from memory, where other threads of the program wrote it (barrier),
    # one contiguous row of RH per key row
    tl.store(RH + (bh * ROWS + offs_r[:, None]) * N + offs_m[None, :], tl.trans(rel_h), mask=offs_r[:, None] < ROWS)
    tl.store(RW + (bh * COLS + offs_c[:, None]) * N + offs_m[None, :], tl.trans(rw))
    rw = rw.to(tl.float32) * LOG2E  # in log2 units, like the logits
    tl.debug_barrier()
    rh_ptrs = RH + bh * ROWS * N + offs_m  # rel_h[i, 0]; + r * N for key row r
    k_ptrs = K + b * sk_b + h * sk_h + offs_c[:, None] * sk_n + offs_d[None, :]  # keys of row 0, (COLS, D)
    v_ptrs = V + b * sv_b + h * sv_h + offs_c[:, None] * sv_n + offs_d[None, :]
    qk_scale = scale * LOG2E
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of the logits (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of exp2(logit - max)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for r in range(ROWS):
        k = tl.load(k_ptrs + r * COLS * sk_n)
        v = tl.load(v_ptrs + r * COLS * sv_n)
        rh = tl.load(rh_ptrs + r * N).to(tl.float32) * LOG2E  # (BLOCK_M,)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + rw  # (BLOCK_M, COLS), less rel_h
        m_i, l_i, acc = _online_softmax_step(s, rh, v, m_i, l_i, acc, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :], acc.to(O.dtype.element_ty))
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i))  # log2-sum-exp2, for the backward


@triton.jit
def _backward_dq(Q, K, V, TH, TW, RH, RW, DO, O, LSE, DELTA, DQ, DRH, DRW,
                 sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n, so_b, so_h, so_n,
                 sg_b, sg_h, sg_n, heads, scale,
                 N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
                 BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
    """One query block, keys row by row: dq, with the part through rel_h and rel_w (_rel_term_grad). Also
    writes DELTA = rowsum(o * do), which _backward_dkdv reads after it (no separate passes over o and do), and
    d rel_h, d rel_w to DRH, DRW (the tables' gradient, when they train; DRH is also this kernel's scratch).
    RH, RW, DRH and DRW laid out as the forward writes rel_h and rel_w, (B, heads, ROWS / COLS, N): d rel_h's
    column of a key row, stored at every step of the walk, is then contiguous, where in SAM's layout, (B,
    heads, N, ROWS / COLS), its entries would lie a row apart. DQ strided as the gradient's q part (sg_*), a
    view of the one (B, N, 3, heads, D) gradient of qkv."""
    b, h = tl.program_id(2), tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, COLS)
    offs_r = tl.arange(0, RP)
    offs_d = tl.arange(0, D)
    bh = b * heads + h
    q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :])
    do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :])
    rw = tl.trans(tl.load(RW + (bh * COLS + offs_c[:, None]) * N + offs_m[None, :])).to(tl.float32) * LOG2E
    rw_lse = rw - tl.load(LSE + bh * N + offs_m)[:, None]  # what every key row's logits take off, but rel_h
    o = tl.load(O + b * so_b + h * so_h + offs_m[:, None] * so_n + offs_d[None, :])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,)
    tl.store(DELTA + bh * N + offs_m, delta)
    rh_ptrs = RH + bh * ROWS * N + offs_m
    k_ptrs = K + b * sk_b + h * sk_h + offs_c[:, None] * sk_n + offs_d[None, :]
    v_ptrs = V + b * sv_b + h * sv_h + offs_c[:, None] * sv_n + offs_d[None, :]
    drh_ptrs = DRH + bh * ROWS * N + offs_m
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    drw = tl.zeros([BLOCK_M, COLS], tl.float32)
    for r in range(ROWS):
        k = tl.load(k_ptrs + r * COLS * sk_n)
        v = tl.load(v_ptrs + r * COLS * sv_n)
        rh = tl.load(rh_ptrs + r * N).to(tl.float32) * LOG2E
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + (rw_lse + rh[:, None]))
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # (BLOCK_M, COLS)
        ds = p * (dp - delta[:, None])  # gradient of the logits
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        tl.store(drh_ptrs + r * N, tl.sum(ds, 1).to(DRH.dtype.element_ty))
        drw += ds
    drw = drw.to(q.dtype)
    tl.store(DRW + (bh * COLS + offs_c[None, :]) * N + offs_m[:, None], drw)
    tl.debug_barrier()  # d rel_h, stored a column per key row, read back as a (BLOCK_M, RP) tile
    drh = tl.load(drh_ptrs[:, None] + offs_r[None, :] * N, mask=offs_r[None, :] < ROWS, other=0.0)
    dq = (dq * scale + _rel_term_grad(drw, TW, offs_m % COLS, COLS, COLS, D, PRECISION)
          + _row_kernels_rel_h_grad(drh, TH, offs_m, ROWS, COLS, RP, D, BLOCK_M, PRECISION))
    tl.store(DQ + b * sg_b + h * sg_h + offs_m[:, None] * sg_n + offs_d[None, :], dq.to(DQ.dtype.element_ty))


@triton.jit
def _backward_dkdv(Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
                   sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n, sg_b, sg_h, sg_n,
                   heads, scale,
                   N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER: tl.constexpr, PRECISION: tl.constexpr):
    """ROWS_PER whole key rows (BLOCK_N = ROWS_PER * COLS keys), queries in blocks: dk, dv. Computed
    transposed, keys along the first axis, so that the products accumulate into (BLOCK_N, D) tiles. The bias
    of the tile is read as the forward wrote rel_h and rel_w, transposed ((B, heads, ROWS / COLS, N)): its
    (ROWS_PER, BLOCK_M) and (COLS, BLOCK_M) tiles are then contiguous along the queries, as the transposed
    logits want them (forward + backward of one global ViT-B block at batch 8, H200: 6.31 ms against 6.71
    with SAM's layout, read row-wise and transposed in registers). BLOCK_N may be several rows, reading q and
    do less often, but one row was faster. DK, DV strided alike (sg_*): views of the one (B, N, 3, heads, D)
    gradient of qkv."""
    b, h = tl.program_id(2), tl.program_id(1)
    row0 = tl.program_id(0) * ROWS_PER  # this program's first key row
    offs_j = row0 * COLS + tl.arange(0, BLOCK_N)  # its keys
    offs_r = row0 + tl.arange(0, ROWS_PER)
    offs_c = tl.arange(0, COLS)
    offs_d = tl.arange(0, D)
    bh = b * heads + h
    k = tl.load(K + b * sk_b + h * sk_h + offs_j[:, None] * sk_n + offs_d[None, :])  # (BLOCK_N, D)
    v = tl.load(V + b * sv_b + h * sv_h + offs_j[:, None] * sv_n + offs_d[None, :])
    rh_ptrs = RH + (bh * ROWS + offs_r[:, None]) * N  # + queries: (ROWS_PER, BLOCK_M)
    rw_ptrs = RW + (bh * COLS + offs_c[:, None]) * N  # + queries: (COLS, BLOCK_M)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = tl.load(Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :])  # (BLOCK_M, D)
        do = tl.load(DO + b * sdo_b + h * sdo_h + offs_m[:, None] * sdo_n + offs_d[None, :])
        rh_t = tl.load(rh_ptrs + offs_m[None, :]).to(tl.float32)  # rel_h[i, row0 + r], (ROWS_PER, BLOCK_M)
        rw_t = tl.load(rw_ptrs + offs_m[None, :]).to(tl.float32)  # rel_w[i, c], (COLS, BLOCK_M)
        # the term less the log-sum-exp, (rh + rw) LOG2E - lse: the per-row part first, (ROWS_PER, BLOCK_M),
        # then one multiply-add per entry; key j of the tile is (row0 + j // COLS, j % COLS): (ROWS_PER, COLS,
        # BLOCK_M) -> (BLOCK_N, BLOCK_M)
        rh_lse_t = rh_t * LOG2E - tl.load(LSE + bh * N + offs_m)[None, :]
        bias_t = tl.reshape(rw_t[None, :, :] * LOG2E + rh_lse_t[:, None, :], (BLOCK_N, BLOCK_M))
        delta = tl.load(DELTA + bh * N + offs_m)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale + bias_t)  # (BLOCK_N, BLOCK_M)
        dk, dv = _dkdv_step(p_t, q, do, v, delta, dk, dv, PRECISION)
    grad_rows = b * sg_b + h * sg_h + offs_j[:, None] * sg_n + offs_d[None, :]
    tl.store(DK + grad_rows, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + grad_rows, dv.to(DV.dtype.element_ty))


# ----------------------------------------------------------------------------------------------------
# Windows: small grids of any size (ViT's 14 x 14 windows), the term folded into the tile in registers
# ----------------------------------------------------------------------------------------------------
# In a window a key row (14 keys) is too narrow a tile, so these kernels take keys in blocks of BLOCK_N
# like FlashAttention-2, the N = H * W tokens padded to whole blocks by masks. The term of a (queries x
# keys) tile is the fold of fast.forwards.vit_attention done in registers: [rel_h | rel_w] (BLOCK_M x HP,
# x WP; computed by _rel_term in the forward, read from memory in the backward) times the one-hot codes of
# the keys' rows and columns (HP x BLOCK_N, WP x BLOCK_N, built from the key indices), two small products
# that gather exactly (one-hot). Its gradient is the same products transposed: d rel_h = ds @ onehot(rows)^T.
# No widened q', k' or padded v in memory, no cat or slice passes. H100, bf16, 8 x 25 windows of 14 x 14,
# 12 heads: forward + backward 1.70 ms, rel-pos term included, against 3.36 ms for the folded form on cuDNN.
# A window of 196 tokens fits one tile of queries, so its backward is one kernel (_window_backward_dq with
# WHOLE, no FlashAttention-2 split): the window backward of a ViT-B LoRA step, H200, 4.28 ms against 6.17.


@triton.jit
def _onehots(offs_j, N: tl.constexpr, W: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr, dtype: tl.constexpr):
    """(BLOCK_N, HP) and (BLOCK_N, WP) one-hot codes of keys offs_j: row j // W, column j % W (padded keys
    j >= N: all zero)."""
    valid = offs_j < N
    rows = ((offs_j // W)[:, None] == tl.arange(0, HP)[None, :]) & valid[:, None]
    cols = ((offs_j % W)[:, None] == tl.arange(0, WP)[None, :]) & valid[:, None]
    return rows.to(dtype), cols.to(dtype)


@triton.jit
def _window_tokens(offs, w, N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, GH: tl.constexpr,
                   GW: tl.constexpr, NWX: tl.constexpr):
    """Tokens at positions offs (row-major) of window w of a GH x GW grid cut into ROWS x COLS windows, NWX of
    them along a row: their index in the grid (row-major), whether they are in the window (offs < N: the
    tile's rows past it are masked) and whether in the grid (a window across the grid's edge holds padding
    tokens beyond it, as stock SAM pads the grid to whole windows)."""
    y = (w // NWX) * ROWS + offs // COLS
    x = (w % NWX) * COLS + offs % COLS
    in_window = offs < N
    return y * GW + x, in_window, in_window & (y < GH) & (x < GW)


@triton.jit
def _window_keys(K, V, PAD, h, heads, sk_n, sv_n, tok, in_window, in_grid, D: tl.constexpr,
                 HAS_PAD: tl.constexpr):
    """(BLOCK_N, D) k and v of a key block: read from the grid, and the padding tokens' k and v (PAD: (2,
    heads, D), what the qkv projection gives a zero token) where the window crosses the grid's edge. The
    padding rows point into PAD, and one load reads both. Swapping them in after the load (tl.where on the
    loaded tiles) was slower: the windows' forward in a ViT-B LoRA step, H200, 3.30 ms against 2.07. Our
    reading: a tile that goes from the load straight into the products is one that Triton copies to shared
    memory ahead of use, in its pipeline; one changed in registers in between is not."""
    d = tl.arange(0, D)[None, :]
    k_rows = K + tok[:, None] * sk_n  # (BLOCK_N, 1)
    v_rows = V + tok[:, None] * sv_n
    if HAS_PAD:
        pad = (in_window != in_grid)[:, None]  # in the window, beyond the grid
        k_rows = tl.where(pad, PAD + h * D, k_rows)
        v_rows = tl.where(pad, PAD + (heads + h) * D, v_rows)
    k = tl.load(k_rows + d, mask=in_window[:, None], other=0.0)
    v = tl.load(v_rows + d, mask=in_window[:, None], other=0.0)
    return k, v


@triton.jit
def _store_pad_grad(DPAD, slot, dk, dv, in_window, in_grid, D: tl.constexpr):
    """The padding keys' part of a key block's dk and dv (BLOCK_N, D), summed over them, into DPAD's (2, D)
    slot: every padding key is the same k and v, so their gradients add up (to the qkv bias's, in the end)."""
    pad = (in_window != in_grid)[:, None]
    d = tl.arange(0, D)
    tl.store(DPAD + slot * 2 * D + d, tl.sum(tl.where(pad, dk, 0.0), 0))
    tl.store(DPAD + slot * 2 * D + D + d, tl.sum(tl.where(pad, dv, 0.0), 0))


@triton.jit
def _load_rows(ptr, offs, stride, mask, width: tl.constexpr, WIDTH: tl.constexpr):
    """(len(offs), WIDTH) tile of a (tokens, width) matrix with row stride `stride`, zero beyond its edges."""
    cols = tl.arange(0, WIDTH)
    return tl.load(ptr + offs[:, None] * stride + cols[None, :], mask=mask[:, None] & (cols < width)[None, :],
                   other=0.0)


@triton.jit
def _store_rows(ptr, offs, stride, mask, tile, width: tl.constexpr, WIDTH: tl.constexpr):
    """Store a (len(offs), WIDTH) tile into the rows offs of a (tokens, width) matrix, as _load_rows reads."""
    cols = tl.arange(0, WIDTH)
    tl.store(ptr + offs[:, None] * stride + cols[None, :], tile, mask=mask[:, None] & (cols < width)[None, :])


@triton.jit
def _window_logits(q_s, k, rh, rw, code_h, code_w, base, PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) logits in log2 units, plus base (fp32, natural units: zero in the forward, minus the
    log-sum-exp in the backward): q_s k^T, q_s the queries times the scale as stock SAM's (q * scale) @ k^T
    rounds them, plus the term rel_h[i, row j] + rel_w[i, col j], gathered by the one-hot products. The
    three products accumulate into base one after the other, so that the only work per entry is the
    change to log2 units. Called with the roles swapped, (k, q_s, code_h, code_w, rh, rw), it gives the same
    logits transposed."""
    acc = tl.dot(rh, tl.trans(code_h), base, input_precision=PRECISION)
    acc = tl.dot(rw, tl.trans(code_w), acc, input_precision=PRECISION)
    return tl.dot(q_s, tl.trans(k), acc, input_precision=PRECISION) * LOG2E


# Grid and windows: the program's third axis runs over the windows of every image, wb = b * NWIN + w (NWIN
# windows per image, NWX along a row). q, k, v, the output and the gradients are read and written in the
# grid's own layout (B, GH * GW tokens), at the tokens _window_tokens names; what is kept per window (LSE,
# DELTA, rel_h, rel_w and their gradients) is (B * NWIN, heads, N, ...). Padding queries (window tokens
# beyond the grid) are computed on zeros and never stored: stock SAM drops their outputs, so they get no
# gradient either. Padding keys are PAD's k and v, as in stock SAM's border windows.


@triton.jit
def _window_forward(Q, K, V, PAD, TH, TW, O, LSE, RH, RW,
                    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, so_b, so_h, so_n,
                    heads, scale,
                    N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, HP: tl.constexpr, WP: tl.constexpr,
                    D: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, NWX: tl.constexpr, NWIN: tl.constexpr,
                    HAS_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    wb, h = tl.program_id(2), tl.program_id(1)
    b, w = wb // NWIN, wb % NWIN
    bh = wb * heads + h
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, win_m, grid_m = _window_tokens(offs_m, w, N, ROWS, COLS, GH, GW, NWX)
    q = _load_rows(Q + b * sq_b + h * sq_h, tok_m, sq_n, grid_m, D, D)  # (BLOCK_M, D); padding queries zero
    rh = _rel_term(q, TH, offs_m // COLS, ROWS, HP, D, PRECISION)  # (BLOCK_M, HP)
    rw = _rel_term(q, TW, offs_m % COLS, COLS, WP, D, PRECISION)  # (BLOCK_M, WP)
    _store_rows(RH + bh * N * ROWS, offs_m, ROWS, win_m, rh, ROWS, HP)  # for the backward
    _store_rows(RW + bh * N * COLS, offs_m, COLS, win_m, rw, COLS, WP)
    q_s = (q * scale).to(q.dtype)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        tok_j, win_j, grid_j = _window_tokens(offs_j, w, N, ROWS, COLS, GH, GW, NWX)
        k, v = _window_keys(K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, PAD, h, heads, sk_n, sv_n, tok_j,
                            win_j, grid_j, D, HAS_PAD)  # (BLOCK_N, D)
        code_h, code_w = _onehots(offs_j, N, COLS, HP, WP, q.dtype)
        s = _window_logits(q_s, k, rh, rw, code_h, code_w, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), PRECISION)
        s = tl.where(win_j[None, :], s, float("-inf"))  # the tile's keys past the window take no weight
        m_i, l_i, acc = _online_softmax_step(s, 0.0, v, m_i, l_i, acc, PRECISION)
    acc = acc / l_i[:, None]
    tl.store(O + b * so_b + h * so_h + tok_m[:, None] * so_n + tl.arange(0, D)[None, :],
             acc.to(O.dtype.element_ty), mask=grid_m[:, None])
    tl.store(LSE + bh * N + offs_m, m_i + tl.log2(l_i), mask=win_m)


@triton.jit
def _window_backward_dq(Q, K, V, PAD, TH, TW, RH, RW, DO, O, LSE, DELTA, DQ, DK, DV, DPAD, DRH, DRW,
                        sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sdo_b, sdo_h, sdo_n, so_b, so_h, so_n,
                        sg_b, sg_h, sg_n, heads, scale,
                        N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, HP: tl.constexpr,
                        WP: tl.constexpr, D: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, NWX: tl.constexpr,
                        NWIN: tl.constexpr, HAS_PAD: tl.constexpr, PAD_GRAD: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, WHOLE: tl.constexpr, PRECISION: tl.constexpr):
    """One query block against every key block: dq, d rel_h and d rel_w (the one-hot products transposed),
    and dq's part through them; DELTA = rowsum(o * do) for _window_backward_dkdv. RH, RW (the forward's),
    DRH, DRW contiguous (B * NWIN, heads, N, H / W); DQ, DK, DV strided (sg_*), as in _backward_dq.
    WHOLE: the block holds every query of the window (the launch makes BLOCK_M cover N), so each key block's
    dk and dv, p^T do and ds^T q, are whole within this program, which writes them too (and, PAD_GRAD, the
    padding keys' sums into DPAD (B * NWIN, heads, key blocks, 2, D)): the window's backward in one kernel,
    five products per tile instead of the split's seven (_window_backward_dkdv recomputes the logits and
    do v^T), and q, k, v, do read once. Not WHOLE: DELTA for the key-side kernel."""
    wb, h = tl.program_id(2), tl.program_id(1)
    b, w = wb // NWIN, wb % NWIN
    if WHOLE:  # the grid's first axis is 1: queries from 0, which the compiler then knows
        offs_m = tl.arange(0, BLOCK_M)
    else:
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tok_m, win_m, grid_m = _window_tokens(offs_m, w, N, ROWS, COLS, GH, GW, NWX)
    bh = wb * heads + h
    q = _load_rows(Q + b * sq_b + h * sq_h, tok_m, sq_n, grid_m, D, D)
    q_s = (q * scale).to(q.dtype)  # the logits' queries, and dk's (stock's autograd takes dk from q * scale)
    do = _load_rows(DO + b * sdo_b + h * sdo_h, tok_m, sdo_n, grid_m, D, D)
    o = _load_rows(O + b * so_b + h * so_h, tok_m, so_n, grid_m, D, D)
    rh = _load_rows(RH + bh * N * ROWS, offs_m, ROWS, win_m, ROWS, HP)  # (BLOCK_M, HP)
    rw = _load_rows(RW + bh * N * COLS, offs_m, COLS, win_m, COLS, WP)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK_M,); 0 for padded queries
    if not WHOLE:
        tl.store(DELTA + bh * N + offs_m, delta, mask=win_m)
    lse = tl.load(LSE + bh * N + offs_m, mask=win_m, other=0.0)
    minus_lse = tl.zeros([BLOCK_M, BLOCK_N], tl.float32) - (lse / LOG2E)[:, None]  # natural units
    dq = tl.zeros([BLOCK_M, D], tl.float32)
    drh = tl.zeros([BLOCK_M, HP], tl.float32)
    drw = tl.zeros([BLOCK_M, WP], tl.float32)
    for start in range(0, N, BLOCK_N):
        offs_j = start + tl.arange(0, BLOCK_N)
        tok_j, win_j, grid_j = _window_tokens(offs_j, w, N, ROWS, COLS, GH, GW, NWX)
        k, v = _window_keys(K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, PAD, h, heads, sk_n, sv_n, tok_j,
                            win_j, grid_j, D, HAS_PAD)
        code_h, code_w = _onehots(offs_j, N, COLS, HP, WP, q.dtype)
        s = _window_logits(q_s, k, rh, rw, code_h, code_w, minus_lse, PRECISION)
        p = tl.where(grid_m[:, None] & win_j[None, :], tl.exp2(s), 0.0)  # the softmax, recomputed
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = (p * (dp - delta[:, None])).to(q.dtype)  # gradient of the logits
        dq += tl.dot(ds, k, input_precision=PRECISION)
        drh += tl.dot(ds, code_h, input_precision=PRECISION)  # summed over the keys of each key row
        drw += tl.dot(ds, code_w, input_precision=PRECISION)  # ... of each key column
        if WHOLE:  # (BLOCK_N, D), summed over every query of the window
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dk = tl.dot(tl.trans(ds), q_s, input_precision=PRECISION)
            _store_rows(DK + b * sg_b + h * sg_h, tok_j, sg_n, grid_j, dk.to(DK.dtype.element_ty), D, D)
            _store_rows(DV + b * sg_b + h * sg_h, tok_j, sg_n, grid_j, dv.to(DV.dtype.element_ty), D, D)
            if PAD_GRAD:
                _store_pad_grad(DPAD, bh * ((N + BLOCK_N - 1) // BLOCK_N) + start // BLOCK_N, dk, dv, win_j, grid_j, D)
    drh, drw = drh.to(q.dtype), drw.to(q.dtype)
    _store_rows(DRH + bh * N * ROWS, offs_m, ROWS, win_m, drh, ROWS, HP)
    _store_rows(DRW + bh * N * COLS, offs_m, COLS, win_m, drw, COLS, WP)
    dq = (dq * scale + _rel_term_grad(drh, TH, offs_m // COLS, ROWS, HP, D, PRECISION)
          + _rel_term_grad(drw, TW, offs_m % COLS, COLS, WP, D, PRECISION))
    _store_rows(DQ + b * sg_b + h * sg_h, tok_m, sg_n, grid_m, dq.to(DQ.dtype.element_ty), D, D)


@triton.jit
def _window_backward_dkdv(Q, K, V, PAD, RH, RW, DO, LSE, DELTA, DK, DV, DPAD,
                          sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
                          srh_b, srh_h, srh_n, srw_b, srw_h, srw_n, sdo_b, sdo_h, sdo_n, sg_b, sg_h, sg_n,
                          heads, scale,
                          N: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, HP: tl.constexpr,
                          WP: tl.constexpr, D: tl.constexpr, GH: tl.constexpr, GW: tl.constexpr, NWX: tl.constexpr,
                          NWIN: tl.constexpr, HAS_PAD: tl.constexpr, PAD_GRAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block against every query block: dk, dv, computed transposed (keys along the first axis), and
    (PAD_GRAD) the padding keys' sums into DPAD. DK, DV strided (sg_*), as in _backward_dkdv."""
    wb, h = tl.program_id(2), tl.program_id(1)
    b, w = wb // NWIN, wb % NWIN
    offs_j = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    tok_j, win_j, grid_j = _window_tokens(offs_j, w, N, ROWS, COLS, GH, GW, NWX)
    bh = wb * heads + h
    k, v = _window_keys(K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, PAD, h, heads, sk_n, sv_n, tok_j, win_j,
                        grid_j, D, HAS_PAD)
    code_h, code_w = _onehots(offs_j, N, COLS, HP, WP, k.dtype)  # (BLOCK_N, HP), (BLOCK_N, WP)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    for start in range(0, N, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        tok_m, win_m, grid_m = _window_tokens(offs_m, w, N, ROWS, COLS, GH, GW, NWX)
        q = _load_rows(Q + b * sq_b + h * sq_h, tok_m, sq_n, grid_m, D, D)
        q_s = (q * scale).to(q.dtype)  # rounded as in the other window kernels (_window_logits)
        do = _load_rows(DO + b * sdo_b + h * sdo_h, tok_m, sdo_n, grid_m, D, D)
        rh = _load_rows(RH + wb * srh_b + h * srh_h, offs_m, srh_n, win_m, ROWS, HP)
        rw = _load_rows(RW + wb * srw_b + h * srw_h, offs_m, srw_n, win_m, COLS, WP)
        lse = tl.load(LSE + bh * N + offs_m, mask=win_m, other=0.0)
        delta = tl.load(DELTA + bh * N + offs_m, mask=win_m, other=0.0)
        # the logits transposed, (BLOCK_N, BLOCK_M), from minus the log-sum-exp: _window_logits with the roles
        # of queries and keys, terms and codes swapped
        minus_lse_t = tl.zeros([BLOCK_N, BLOCK_M], tl.float32) - (lse / LOG2E)[None, :]
        s_t = _window_logits(k, q_s, code_h, code_w, rh, rw, minus_lse_t, PRECISION)
        p_t = tl.where(grid_m[None, :], tl.exp2(s_t), 0.0)  # padded queries (do = 0): no overflow
        dk, dv = _dkdv_step(p_t, q_s, do, v, delta, dk, dv, PRECISION)  # dk from q * scale, as stock's
    _store_rows(DK + b * sg_b + h * sg_h, tok_j, sg_n, grid_j, dk.to(DK.dtype.element_ty), D, D)
    _store_rows(DV + b * sg_b + h * sg_h, tok_j, sg_n, grid_j, dv.to(DV.dtype.element_ty), D, D)
    if PAD_GRAD:
        _store_pad_grad(DPAD, bh * tl.num_programs(0) + tl.program_id(0), dk, dv, win_j, grid_j, D)


def _strides(*tensors):
    """(batch, head, token) strides of (B, heads, N, X) tensors whose last axis is contiguous."""
    out = []
    for t in tensors:
        assert t.stride(-1) == 1
        out += t.stride()[:3]
    return out


# Launch settings of each kernel (BLOCK_M queries, BLOCK_N keys per program or step, warps, pipeline stages),
# chosen at ViT-B's global shape (forward, dq, dkdv) and window shape (window_*), batch 8, on the H100 and in a
# graphed ViT-B LoRA step on an H200. The row kernels are latency-bound, and for want of registers (197-238 a
# thread) only two programs of 4 warps fit an SM. Capped at 168 (maxnreg), three of the forward's fit: one ViT-B
# global block's forward at batch 8, H200, 1.21 ms against 1.44 (though Triton 3.6 spills 120 bytes a thread).
# The backward kernels capped alike, smaller query blocks, and every other setting that fits more warps per SM
# without spilling (the window forward with 64 queries on 4 warps among them) were slower in the graphed step.
CONFIG = dict(forward=dict(BLOCK_M=64, num_warps=4, num_stages=3, maxnreg=168),
              dq=dict(BLOCK_M=64, num_warps=4, num_stages=4),
              dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              window_forward=dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
              window_dq=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              window_dkdv=dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
              window_backward=dict(BLOCK_N=64, num_warps=8, num_stages=2),
              # fp32 tiles take twice the shared memory: at the bf16 settings 336 KB, over the 227 KB of a
              # Hopper SM
              window_backward_fp32=dict(BLOCK_N=16, num_warps=8, num_stages=1))

# Windows of at most this many tokens take the one-kernel backward (_window_backward_dq, WHOLE), all their
# queries in one tile (BLOCK_M: N rounded up to a power of two): 196 in ViT's 14 x 14 windows. Larger grids
# (a global grid that is not a power of two, such as 56 x 56 at 896) take the split kernels.
WHOLE_WINDOW = 256
# Its tiles take more shared memory than some GPUs have: 336 KB in fp32 at the bf16 settings, about half that
# in bf16, which fits an H100 or H200 (227 KB per SM) but perhaps not an A100 (163 KB) or a 24 GB Ampere or
# Ada card (100 KB). Where Triton finds it does not fit, the split kernels run instead, and the (device,
# dtype) is noted here so that later backwards go straight to them.
_SPLIT_ONLY = set()


def _launch(name, rows, cols):
    """kernel `name`'s launch settings for a rows x cols grid of tokens, and its grid's first axis (query or
    key blocks). Row kernels: the configured blocks halved until they divide the N = rows * cols tokens, the
    key block of dkdv whole key rows (ROWS_PER of them, a divisor of rows), rel_h's tile in the forward and
    dq kernels RP wide (a power of two, at least 16: a product's side). Window kernels: blocks as
    configured, the last one masked; the one-hot codes padded to HP, WP (powers of two, at least 16); the
    one-kernel backward ("backward", "backward_fp32") every query in one block, BLOCK_M the N tokens rounded
    up to a power of two (its grid is one program per window and head)."""
    N = rows * cols
    if not by_rows(cols):
        launch = dict(CONFIG["window_" + name], HP=max(16, triton.next_power_of_2(rows)),
                      WP=max(16, triton.next_power_of_2(cols)))
        if name.startswith("backward"):  # one program per window and head, every query in its tile
            return dict(launch, BLOCK_M=max(16, triton.next_power_of_2(N))), 1
        return launch, triton.cdiv(N, launch["BLOCK_N" if name == "dkdv" else "BLOCK_M"])
    launch = dict(CONFIG[name])
    while N % launch["BLOCK_M"]:
        launch["BLOCK_M"] //= 2
    if "BLOCK_N" in launch:
        rows_per = max(1, launch["BLOCK_N"] // cols)
        while rows % rows_per:
            rows_per //= 2
        launch.update(BLOCK_N=rows_per * cols, ROWS_PER=rows_per)
    else:
        launch.update(RP=max(16, triton.next_power_of_2(rows)))
    return launch, N // launch["BLOCK_N" if name == "dkdv" else "BLOCK_M"]


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: exact products, as PyTorch's default


def _last_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _split(qkv):
    """q, k, v: (B, heads, N, D) views of qkv (B, N, 3, heads, D), the layout SAM's qkv projection writes."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def _grid(table_h, table_w):
    """The grid (rows, columns) that rel-pos tables of 2 S - 1 entries serve."""
    return (table_h.shape[0] + 1) // 2, (table_w.shape[0] + 1) // 2


def _windowing(table_h, table_w, grid_h, grid_w):
    """The window (rows, cols: the tables' grid) and the window kernels' constexprs for a grid_h x grid_w grid
    (0: the tables' grid, one window) cut into such windows: the grid GH x GW, its windows along a row (NWX)
    and in all (NWIN), HAS_PAD where windows cross the grid's edge."""
    rows, cols = _grid(table_h, table_w)
    grid_h, grid_w = grid_h or rows, grid_w or cols
    nwx = triton.cdiv(grid_w, cols)
    return rows, cols, dict(GH=grid_h, GW=grid_w, NWX=nwx, NWIN=triton.cdiv(grid_h, rows) * nwx,
                            HAS_PAD=bool(grid_h % rows or grid_w % cols))


def _pad_input(window, pad_kv, q):
    """pad_kv (2, heads, D) as the window kernels read it; where no window crosses the grid's edge they read
    nothing there, and get q."""
    assert pad_kv is not None or not window["HAS_PAD"], "windows cross the grid's edge: pad_kv is needed"
    return q if pad_kv is None else pad_kv.contiguous()


def _rel_terms_out(q, windows, heads, rows, cols):
    """rel_h and rel_w as the forward kernels write them: the row kernels' transposed, (B, heads, rows /
    columns, N) (see _backward_dkdv), the window kernels' as SAM lays them out, (B', heads, N, rows / cols)."""
    N = rows * cols
    if by_rows(cols):
        return q.new_empty(windows, heads, rows, N), q.new_empty(windows, heads, cols, N)
    return q.new_empty(windows, heads, N, rows), q.new_empty(windows, heads, N, cols)


@torch.library.custom_op("peft_sam::relpos_attention", mutates_args=())
def _relpos_attention(qkv: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor, scale: float,
                      grid_h: int = 0, grid_w: int = 0, pad_kv: Optional[torch.Tensor] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The output (B, T, heads, D), its log2-sum-exp2 (B', heads, N) and rel_h, rel_w (_rel_terms_out), the last
    three for the backward. qkv (B, T, 3, heads, D) of a grid_h x grid_w grid (0: the tables' grid, one window)
    of T tokens, cut into windows of N tokens (the tables' grid; B' = B times the windows of an image); pad_kv
    (2, heads, D): k and v of the padding tokens where windows cross the grid's edge (window_attention)."""
    q, k, v = _split(_last_contiguous(qkv)[0])
    table_h, table_w = table_h.contiguous(), table_w.contiguous()
    B, heads, T, D = q.shape
    rows, cols, window = _windowing(table_h, table_w, grid_h, grid_w)
    N, windows = rows * cols, B * window["NWIN"]
    out = q.new_empty(B, T, heads, D)
    lse = torch.empty(windows, heads, N, device=q.device, dtype=torch.float32)
    rel_h, rel_w = _rel_terms_out(q, windows, heads, rows, cols)
    launch, blocks = _launch("forward", rows, cols)
    strides = (*_strides(q, k, v, out.transpose(1, 2)), heads, scale)
    meta = dict(N=N, ROWS=rows, COLS=cols, D=D, PRECISION=_precision(q.dtype), **launch)
    if by_rows(cols):
        assert (window["GH"], window["GW"]) == (rows, cols), "the row kernels take one whole grid"
        _forward[(blocks, heads, B)](q, k, v, table_h, table_w, out, lse, rel_h, rel_w, *strides, **meta)
    else:
        _window_forward[(blocks, heads, windows)](q, k, v, _pad_input(window, pad_kv, q), table_h, table_w, out, lse,
                                                  rel_h, rel_w, *strides, **window, **meta)
    return out, lse, rel_h, rel_w


@_relpos_attention.register_fake
def _(qkv, table_h, table_w, scale, grid_h=0, grid_w=0, pad_kv=None):
    B, T, _, heads, D = qkv.shape
    rows, cols, window = _windowing(table_h, table_w, grid_h, grid_w)
    windows = B * window["NWIN"]
    return (qkv.new_empty(B, T, heads, D), qkv.new_empty(windows, heads, rows * cols, dtype=torch.float32),
            *_rel_terms_out(qkv, windows, heads, rows, cols))


@torch.library.custom_op("peft_sam::relpos_attention_backward", mutates_args=())
def _relpos_attention_backward(grad_out: torch.Tensor, qkv: torch.Tensor, table_h: torch.Tensor,
                               table_w: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, scale: float, grid_h: int = 0,
                               grid_w: int = 0, pad_kv: Optional[torch.Tensor] = None, pad_grad: bool = False
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradient of qkv (B, T, 3, heads, D), and those of rel_h and rel_w (laid out as they are,
    _rel_terms_out), which the tables' gradient needs (_table_grad) when they train; its q part includes the
    part through rel_h and rel_w. The kernels write dq, dk and dv straight into their places in qkv's layout:
    returned as three tensors, autograd would stack them into it, a pass that reads and writes the whole
    gradient (1.35 ms of a ViT-B LoRA step at batch 8, H100). Last, pad_kv's gradient (2, heads, D) where
    pad_grad (else empty): the padding keys' dk and dv, summed."""
    qkv, grad_out, out = _last_contiguous(qkv, grad_out, out)
    q, k, v = _split(qkv)
    table_h, table_w = table_h.contiguous(), table_w.contiguous()
    B, heads, T, D = q.shape
    rows, cols, window = _windowing(table_h, table_w, grid_h, grid_w)
    N, windows = rows * cols, B * window["NWIN"]
    d_rel_h, d_rel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)  # laid out as rel_h and rel_w
    d_qkv = torch.empty(B, T, 3, heads, D, device=q.device, dtype=qkv.dtype)
    dq, dk, dv = _split(d_qkv)
    strides, grad_strides = _strides(q, k, v), _strides(dq)  # dq, dk and dv: the same strides
    meta = dict(N=N, ROWS=rows, COLS=cols, D=D, PRECISION=_precision(q.dtype))
    dq_strides = (*strides, *_strides(grad_out.transpose(1, 2), out.transpose(1, 2)), *grad_strides, heads, scale)

    def new_delta():  # rowsum(o * do) (B', heads, N): the split query-side kernels write it for the key-side ones
        return torch.empty(windows, heads, N, device=q.device, dtype=torch.float32)

    if by_rows(cols):
        delta = new_delta()
        launch, blocks = _launch("dq", rows, cols)
        _backward_dq[(blocks, heads, B)](q, k, v, table_h, table_w, rel_h, rel_w, grad_out, out, lse, delta, dq,
                                         d_rel_h, d_rel_w, *dq_strides, **meta, **launch)
        launch, blocks = _launch("dkdv", rows, cols)
        _backward_dkdv[(blocks, heads, B)](
            q, k, v, rel_h, rel_w, grad_out, lse, delta, dk, dv,
            *strides, *_strides(grad_out.transpose(1, 2)), *grad_strides, heads, scale, **meta, **launch)
        return d_qkv, d_rel_h, d_rel_w, q.new_empty(0)
    pad = _pad_input(window, pad_kv, q)
    pad_grad = pad_grad and window["HAS_PAD"]
    meta.update(window, PAD_GRAD=pad_grad)

    def pad_sums(key_blocks):  # (windows, heads, key blocks, 2, D): each key block's padding keys' dk, dv summed
        return torch.empty(windows, heads, key_blocks, 2, D, device=q.device, dtype=torch.float32) if pad_grad else q

    def d_pad(sums):  # pad_kv's gradient (2, heads, D)
        return sums.sum((0, 2)).transpose(0, 1).contiguous().to(pad_kv.dtype) if pad_grad else q.new_empty(0)

    def window_dq(name, whole, sums, delta):  # whole: every query in one tile, and dk, dv written too (no delta)
        launch, blocks = _launch(name, rows, cols)
        _window_backward_dq[(blocks, heads, windows)](q, k, v, pad, table_h, table_w, rel_h, rel_w, grad_out, out, lse,
                                                      delta, dq, dk, dv, sums, d_rel_h, d_rel_w, *dq_strides,
                                                      WHOLE=whole, **meta, **launch)
    if N <= WHOLE_WINDOW and (q.device, q.dtype) not in _SPLIT_ONLY:
        name = "backward" if q.element_size() == 2 else "backward_fp32"
        sums = pad_sums(triton.cdiv(N, _launch(name, rows, cols)[0]["BLOCK_N"]))
        try:
            window_dq(name, True, sums, q)
            return d_qkv, d_rel_h, d_rel_w, d_pad(sums)
        except OutOfResources:  # raised before the launch: nothing was written; the split kernels then
            _SPLIT_ONLY.add((q.device, q.dtype))
    delta = new_delta()
    window_dq("dq", False, q, delta)
    launch, blocks = _launch("dkdv", rows, cols)
    sums = pad_sums(blocks)
    _window_backward_dkdv[(blocks, heads, windows)](
        q, k, v, pad, rel_h, rel_w, grad_out, lse, delta, dk, dv, sums,
        *strides, *_strides(rel_h, rel_w, grad_out.transpose(1, 2)), *grad_strides, heads, scale, **meta, **launch)
    return d_qkv, d_rel_h, d_rel_w, d_pad(sums)


@_relpos_attention_backward.register_fake
def _(grad_out, qkv, table_h, table_w, rel_h, rel_w, out, lse, scale, grid_h=0, grid_w=0, pad_kv=None,
      pad_grad=False):
    has_pad = pad_grad and _windowing(table_h, table_w, grid_h, grid_w)[2]["HAS_PAD"]  # never the row kernels'
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format), torch.empty_like(rel_h),
            torch.empty_like(rel_w), pad_kv.new_empty(pad_kv.shape) if has_pad else qkv.new_empty(0))


def _table_grad(d_rel, q, rows, cols, along_rows):
    """Gradient of a rel-pos table (2 S - 1, D) from that of rel_h (along_rows) or rel_w, (B, heads, N, S),
    and q (B, heads, N, D): what autograd gives through SAM's einsum against the table gathered to (S, S, D),
    whose entry [a, r] is table row a - r + S - 1. Only for tables that train (our methods freeze them)."""
    B, heads, N, D = q.shape
    grid, d_rel = q.reshape(B, heads, rows, cols, D), d_rel.reshape(B, heads, rows, cols, -1)
    per_pair = torch.einsum("bnawr,bnawd->ard" if along_rows else "bnawc,bnawd->wcd", d_rel, grid)  # (S, S, D)
    size = per_pair.shape[0]
    pos = torch.arange(size, device=q.device)
    index = (pos[:, None] - pos[None, :] + size - 1).flatten()
    return per_pair.new_zeros(2 * size - 1, D).index_add_(0, index, per_pair.flatten(0, 1))


def _window_queries(q, rows, cols, window):
    """q (B, heads, T, D) of the grid of `window` (_windowing) -> (B', heads, N, D) per rows x cols window, as
    the kernels number them (b * windows + w, w row-major); zeros for the padding queries, whose d rel_h and
    d rel_w the kernels write as zeros."""
    B, heads, _, D = q.shape
    grid_h, grid_w, nwx = window["GH"], window["GW"], window["NWX"]
    nwy = window["NWIN"] // nwx
    q = F.pad(q.reshape(B, heads, grid_h, grid_w, D), (0, 0, 0, nwx * cols - grid_w, 0, nwy * rows - grid_h))
    q = q.reshape(B, heads, nwy, rows, nwx, cols, D).permute(0, 2, 4, 1, 3, 5, 6)  # (B, nwy, nwx, heads, rows, cols, D)
    return q.reshape(B * nwy * nwx, heads, rows * cols, D)


def _setup_context(ctx, inputs, output):
    qkv, table_h, table_w, scale, grid_h, grid_w, pad_kv = inputs
    ctx.save_for_backward(qkv, table_h, table_w, pad_kv, *output)
    ctx.scale, ctx.grid = scale, (grid_h, grid_w)


def _backward(ctx, grad_out, grad_lse, grad_rel_h, grad_rel_w):  # lse, rel_h, rel_w: for the backward only
    qkv, table_h, table_w, pad_kv, out, lse, rel_h, rel_w = ctx.saved_tensors
    pad_grad = len(ctx.needs_input_grad) > 6 and ctx.needs_input_grad[6]  # trailing defaults are not counted
    d_qkv, d_rel_h, d_rel_w, d_pad_kv = _relpos_attention_backward(grad_out, qkv, table_h, table_w, rel_h, rel_w,
                                                                   out, lse, ctx.scale, *ctx.grid, pad_kv, pad_grad)
    d_tables = [None, None]
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        rows, cols, window = _windowing(table_h, table_w, *ctx.grid)
        q = _window_queries(_split(qkv)[0], rows, cols, window)
        if by_rows(cols):  # the row kernels' layout (B, heads, rows / columns, N), _rel_terms_out
            d_rel_h, d_rel_w = d_rel_h.transpose(-1, -2), d_rel_w.transpose(-1, -2)
        d_tables = [_table_grad(d_rel, q, rows, cols, along_rows).to(table.dtype) if ctx.needs_input_grad[i] else None
                    for i, d_rel, table, along_rows in ((1, d_rel_h, table_h, True), (2, d_rel_w, table_w, False))]
    d_pad_kv = d_pad_kv if pad_grad and d_pad_kv.numel() else None  # no padding: the padding keys were never used
    return d_qkv, *d_tables, None, None, None, d_pad_kv


_relpos_attention.register_autograd(_backward, setup_context=_setup_context)


def relpos_attention(qkv, table_h, table_w, scale):
    """softmax(q k^T * scale + rel_h[:, row j] + rel_w[:, col j]) v for q, k, v packed in qkv (B, N, 3, heads,
    D), the layout of SAM's qkv projection, on an H x W grid (N = H * W), with SAM's rel-pos tables table_h
    (2H - 1, D) and table_w (2W - 1, D) as get_rel_pos sizes them (rel_h[i, r] = q_i . table_h[row i - r +
    H - 1], see _rel_term). Returns (B, N, heads, D); the backward returns qkv's gradient in qkv's layout."""
    return _relpos_attention(qkv, table_h, table_w, scale, 0, 0, None)[0]  # every input given: _backward's grads


def window_attention(qkv, table_h, table_w, scale, grid, pad_kv):
    """SAM's windowed attention over a whole grid, without stock SAM's window padding in memory: qkv (B, T, 3,
    heads, D) of a grid = (rows, cols) grid (T = rows * cols), cut into windows of the tables' size (table_h
    (2h - 1, D), table_w (2w - 1, D): h x w windows, row-major, the last row and column of windows crossing
    the grid's edge when it is not a multiple of them), and relpos_attention within each window. Where a
    window crosses the edge, stock SAM pads the grid with zero tokens, which take part in the softmax as keys:
    their k and v are pad_kv (2, heads, D), what the qkv projection gives a zero token (its bias, for a linear
    layer), and their gradient comes back to pad_kv. Returns (B, T, heads, D), in the grid's own layout."""
    return _relpos_attention(qkv, table_h, table_w, scale, grid[0], grid[1], pad_kv)[0]


def usable_windows(qkv, window):
    """Whether the window kernels take window_attention's qkv (B, T, 3, heads, D) with windows window = (rows,
    cols): as _takes, and windows that the window kernels take (not the row kernels' grids)."""
    rows, cols = window
    return _takes(qkv) and usable_shape(rows, cols, qkv.shape[-1]) and not by_rows(cols)


# ----------------------------------------------------------------------------------------------------
# Compiling ahead, in another process
# ----------------------------------------------------------------------------------------------------
# Triton compiles a kernel at its first launch, in the launching process, and keeps the result in its disk
# cache (~/.triton/cache or TRITON_CACHE_DIR). On a fresh cache the three kernels take 6-8 s there (the
# first of them with Triton's own start-up), spent inside the first training step, on top of inductor's
# compilation. A child process that launches them once on small inputs of the same kind (same dtype,
# widths and grid; the batch does not enter Triton's cache key, and strides only as "a multiple of 16"
# or "1", which the model's views and the child's tensors share) fills that cache while the parent loads
# weights and compiles the encoder blocks; the parent then loads the compiled kernels from disk. Should
# the child fail or come late, the parent compiles them itself, as without it.

_PRECOMPILING = set()


def precompile(heads, rows, cols, head_dim, dtype=torch.bfloat16, grid=None):
    """Start compiling the kernels for one attention shape in a background process (CUDA only; once per
    shape and process): rows x cols attention (relpos_attention), or, given grid = (rows, columns), its
    windows over that grid (window_attention; the kernels differ where windows cross the grid's edge).
    Returns at once, with the child (subprocess.Popen) or None."""
    import subprocess
    import sys
    key = (heads, rows, cols, head_dim, str(dtype).replace("torch.", ""), *(grid or ()))
    if key in _PRECOMPILING or INTERPRETED or not torch.cuda.is_available():
        return None
    _PRECOMPILING.add(key)
    return subprocess.Popen([sys.executable, __file__, *map(str, key)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _compile_by_launching(heads, rows, cols, head_dim, dtype, grid=None):
    """Forward and backward once at batch 1, with qkv laid out as SAM's attention makes it and an output
    gradient laid out as the block's projection returns it; over a grid, with the padding tokens' k and v
    frozen (a frozen qkv bias, as our methods have it)."""
    T = grid[0] * grid[1] if grid else rows * cols
    qkv = torch.randn(1, T, 3, heads, head_dim, device="cuda", dtype=dtype, requires_grad=True)
    table_h = torch.randn(2 * rows - 1, head_dim, device="cuda")  # fp32 parameters, as SAM's
    table_w = torch.randn(2 * cols - 1, head_dim, device="cuda")
    if grid:
        pad_kv = torch.randn(2, heads, head_dim, device="cuda", dtype=dtype)
        out = window_attention(qkv, table_h, table_w, head_dim ** -0.5, grid, pad_kv)  # (1, T, heads, D)
    else:
        out = relpos_attention(qkv, table_h, table_w, head_dim ** -0.5)  # (1, T, heads, D)
    out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":  # the child of precompile: relpos_attention.py HEADS ROWS COLS HEAD_DIM DTYPE [GH GW]
    import sys
    heads, rows, cols, head_dim = map(int, sys.argv[1:5])
    _compile_by_launching(heads, rows, cols, head_dim, getattr(torch, sys.argv[5]),
                          tuple(map(int, sys.argv[6:8])) or None)

"""The Triton kernel of ``trak_core._triton`` (imported only there, on first use: it imports Triton).

Defined at module level because Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is
imported) rewrites the ``triton.language`` names of the kernel's module globals.

The product is computed transposed, ``out.T = S.T @ x.T``: the signs are the first operand (the tile of
``BLOCK_N`` columns is the products' ``M``) and the rows of ``x`` the second (``N``, which Hopper's warp-group
products take down to 8 rows). Compiled for sm_90 this needs about 40% fewer instructions a step than
``x @ S`` for 32 rows, where the flip, scale and split of ``x`` were repeated by every warp, and it uses
the warp-group products (``bench/triton_compile.py`` counts them). ``PAIRS`` makes two signs per 32-bit
operation (bits ``t`` and ``t + 16`` of a word), which permutes the tile's columns and is undone by the
store: fewer shared-memory accesses for 32 rows by the counts, timed against the default by
``bench/triton_sweep.py``.
"""
import triton
import triton.language as tl


@triton.jit
def split_projection(x_ptr, words_ptr, signs_ptr, scales_ptr, out_ptr, n, p, k, stride_x, stride_w,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ITERS: tl.constexpr,
                     TWO_PASSES: tl.constexpr, PAIRS: tl.constexpr = False):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    scale = tl.load(scales_ptr + rows, mask=row_ok, other=1.0)
    tile_words = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)  # bit t of word b: column 32 b + t
    x_rows = rows.to(tl.int64) * stride_x  # 64-bit offsets: 256 rows x 11M parameters pass 2**31
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in range(ITERS):  # a constexpr trip count (Triton's interpreter cannot loop over runtime bounds)
        r = (pid_s * ITERS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_ok = r < p
        x = tl.load(x_ptr + x_rows[:, None] + r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        flip = tl.load(signs_ptr + r, mask=r_ok, other=0.0)
        x = x * flip[None, :] * scale[:, None]  # exact: +-1 and powers of two
        # each word of the tile loaded once, (words, rows of P); its 32 bits broadcast to (columns, rows of P)
        w = tl.load(words_ptr + r.to(tl.int64)[None, :] * stride_w + tile_words[:, None],
                    mask=r_ok[None, :] & (tile_words[:, None] < stride_w), other=0)
        if PAIRS:  # bits t and t + 16 of a word become one pair of float16 signs in two 32-bit operations
            pairs = ((w.to(tl.uint32, bitcast=True)[:, None, :] << (15 - tl.arange(0, 16))[None, :, None])
                     & 0x80008000) | 0x3C003C00  # (words, 16, rows of P)
            s = tl.join(pairs.to(tl.uint16), (pairs >> 16).to(tl.uint16)).to(tl.float16, bitcast=True)
            s = tl.reshape(tl.permute(s, (0, 1, 3, 2)), (BLOCK_N, BLOCK_K))  # tile row 32 b + 2 t + h: 32 b + 16 h + t
        else:
            bits = tl.reshape((w[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1, (BLOCK_N, BLOCK_K))
            # float16 +-1 made from the bit itself: 0x3C00 is 1.0, bit 15 its sign (an int-to-float conversion runs
            # at a quarter of the integer rate and was the busiest unit of the loop compiled for sm_90)
            s = ((bits << 15) | 0x3C00).to(tl.int16).to(tl.float16, bitcast=True)
        hi = x.to(tl.float16)
        acc = tl.dot(s, tl.trans(hi), acc)
        if TWO_PASSES:
            acc = tl.dot(s, tl.trans((x - hi.to(tl.float32)).to(tl.float16)), acc)
    if PAIRS:  # the tile's rows in the order the pairs made them
        j = tl.arange(0, BLOCK_N)
        cols = pid_n * BLOCK_N + (j // 32) * 32 + (j % 2) * 16 + (j % 32) // 2
    tl.store(out_ptr + (pid_s * n).to(tl.int64) * k + rows[None, :] * k + cols[:, None], acc,
             mask=row_ok[None, :] & (cols < k)[:, None])

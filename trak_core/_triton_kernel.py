"""The Triton kernel of ``trak_core._triton`` (imported only there, on first use: it imports Triton).

Defined at module level because Triton's interpreter (``TRITON_INTERPRET=1``, read when Triton is
imported) rewrites the ``triton.language`` names of the kernel's module globals.
"""
import triton
import triton.language as tl


@triton.jit
def split_projection(x_ptr, words_ptr, signs_ptr, scales_ptr, out_ptr, n, p, k, stride_x, stride_w,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ITERS: tl.constexpr,
                     TWO_PASSES: tl.constexpr, EXPAND: tl.constexpr = False):
    pid_m, pid_n, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < n, cols < k
    scale = tl.load(scales_ptr + rows, mask=row_ok, other=1.0)
    word, bit = cols // 32, cols % 32
    x_rows = rows.to(tl.int64) * stride_x  # 64-bit offsets: 256 rows x 11M parameters pass 2**31
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(ITERS):  # a constexpr trip count (Triton's interpreter cannot loop over runtime bounds)
        r = (pid_s * ITERS + i) * BLOCK_K + tl.arange(0, BLOCK_K)
        r_ok = r < p
        x = tl.load(x_ptr + x_rows[:, None] + r[None, :], mask=row_ok[:, None] & r_ok[None, :],
                    other=0.0).to(tl.float32)
        flip = tl.load(signs_ptr + r, mask=r_ok, other=0.0)
        x = x * flip[None, :] * scale[:, None]  # exact: +-1 and powers of two
        if EXPAND:  # each word loaded once, its 32 bits broadcast out, then reshaped to the tile (BLOCK_N % 32 == 0)
            tile_words = pid_n * (BLOCK_N // 32) + tl.arange(0, BLOCK_N // 32)
            w = tl.load(words_ptr + r.to(tl.int64)[:, None] * stride_w + tile_words[None, :],
                        mask=r_ok[:, None] & (tile_words[None, :] < stride_w), other=0)
            bits = (w[:, :, None] >> tl.arange(0, 32)[None, None, :]) & 1
            s = (1 - 2 * tl.reshape(bits, (BLOCK_K, BLOCK_N))).to(tl.float16)
        else:  # each column loads its word (repeated addresses: cache hits)
            w = tl.load(words_ptr + r.to(tl.int64)[:, None] * stride_w + word[None, :],
                        mask=r_ok[:, None] & col_ok[None, :], other=0)
            s = (1 - 2 * ((w >> bit[None, :]) & 1)).to(tl.float16)  # bit t of word b: column 32 b + t
        hi = x.to(tl.float16)
        acc = tl.dot(hi, s, acc)
        if TWO_PASSES:
            acc = tl.dot((x - hi.to(tl.float32)).to(tl.float16), s, acc)
    tl.store(out_ptr + (pid_s * n).to(tl.int64) * k + rows[:, None] * k + cols[None, :], acc,
             mask=row_ok[:, None] & col_ok[None, :])

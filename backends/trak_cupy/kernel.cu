// trak-core fused projection: out = (grads * s) @ R * (1/sqrt(k)) with R generated in registers.
// Rademacher R[a, j] = bit (j % 32) of w(a, j / 32) (0 -> +1, 1 -> -1), w(a, b) = mix(rowkey(a) ^ colkey(b)),
// rowkey(a) = mix(mix(stream ^ a_lo) ^ a_hi), colkey(b) = mix(b ^ colbase); s(a) = top bit of the sign
// stream's row key. Exactly trak_core/hashing.py (the spec) and trak_core/projection.py: the same bits everywhere.
// One block computes a TILE_N x TILE_K tile of `out`; each thread a 4 x 8 sub-tile; the parameter axis
// is walked TILE_P rows at a time: gradients are staged (sign-flipped, as float) in shared memory and
// the matching TILE_P x TILE_K signs are made from TILE_P * TILE_K / 32 hash words per step.
#define TILE_N 64   // rows of grads (examples) per block
#define TILE_K 128  // output columns per block: 4 hash words
#define TILE_P 32   // parameters per step of the reduction
#define THREADS 256 // 16 x 16 threads, each 4 rows x 8 columns

TRAK_DEVICE unsigned int trak_mix(unsigned int x) {
    x ^= x >> 15; x *= 0x2C1B3C6Du; x ^= x >> 12; x *= 0x297A2D39u; x ^= x >> 15;
    return x;
}

TRAK_DEVICE unsigned int trak_rowkey(unsigned int stream, unsigned long long a) {
    return trak_mix(trak_mix(stream ^ (unsigned int)(a & 0xFFFFFFFFull)) ^ (unsigned int)(a >> 32));
}

#ifndef TRAK_HOST_ONLY
extern "C" __global__ void __launch_bounds__(THREADS) trak_project(
    const INPUT_T* __restrict__ grads, float* __restrict__ out, long long n, long long p, int k,
    long long offset, unsigned int rad_stream, unsigned int col_base, unsigned int sign_stream, float scale) {
    __shared__ float g_tile[TILE_P][TILE_N + 1];
    __shared__ float row_sign[TILE_P];
    __shared__ unsigned int words[TILE_P][TILE_K / 32];
    const int tid = threadIdx.x;
    const long long row0 = (long long)blockIdx.y * TILE_N;
    const int col0 = blockIdx.x * TILE_K;
    const int ty = tid / 16, tx = tid % 16;
    const int my_word = (tx * 8) >> 5, my_shift = (tx * 8) & 31;  // a thread's 8 columns share one word
    unsigned int colkey[TILE_K / 32];
    #pragma unroll
    for (int w = 0; w < TILE_K / 32; ++w) colkey[w] = trak_mix((unsigned int)(col0 / 32 + w) ^ col_base);
    float acc[4][8];
    #pragma unroll
    for (int i = 0; i < 4; ++i)
        #pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
    for (long long p0 = 0; p0 < p; p0 += TILE_P) {
        // hash words and row signs of this TILE_P x TILE_K block of P
        if (tid < TILE_P * (TILE_K / 32)) {
            int pp = tid / (TILE_K / 32), w = tid % (TILE_K / 32);
            long long a = p0 + pp;
            unsigned int rk = trak_rowkey(rad_stream, (unsigned long long)(offset + a));
            words[pp][w] = a < p ? trak_mix(rk ^ colkey[w]) : 0u;
            if (w == 0) row_sign[pp] = (trak_rowkey(sign_stream, (unsigned long long)(offset + a)) >> 31) ? -1.f : 1.f;
        }
        __syncthreads();
        // stage gradients (consecutive threads read consecutive parameters of one example)
        for (int e = tid; e < TILE_P * TILE_N; e += THREADS) {
            int pp = e % TILE_P, rr = e / TILE_P;
            long long a = p0 + pp, r = row0 + rr;
            g_tile[pp][rr] = (a < p && r < n) ? (float)grads[r * p + a] * row_sign[pp] : 0.f;
        }
        __syncthreads();
        #pragma unroll 8
        for (int pp = 0; pp < TILE_P; ++pp) {
            unsigned int bits = words[pp][my_word] >> my_shift;
            float g[4];
            #pragma unroll
            for (int i = 0; i < 4; ++i) g[i] = g_tile[pp][ty * 4 + i];
            #pragma unroll
            for (int j = 0; j < 8; ++j) {
                float s = ((bits >> j) & 1u) ? -1.f : 1.f;
                #pragma unroll
                for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(g[i], s, acc[i][j]);
            }
        }
        __syncthreads();
    }
    #pragma unroll
    for (int i = 0; i < 4; ++i) {
        long long r = row0 + ty * 4 + i;
        #pragma unroll
        for (int j = 0; j < 8; ++j) {
            int c = col0 + tx * 8 + j;
            if (r < n && c < k) out[r * (long long)k + c] = acc[i][j] * scale;
        }
    }
}
#endif

#ifdef TRAK_HOST_ONLY
// CPU build of the same hash, for the bit-identity test that runs without a GPU.
extern "C" void trak_signs(unsigned int rad_stream, unsigned int col_base, unsigned int sign_stream,
                           long long offset, long long p, int k, signed char* out) {
    for (long long a = 0; a < p; ++a) {
        int flip = trak_rowkey(sign_stream, (unsigned long long)(offset + a)) >> 31;
        unsigned int rk = trak_rowkey(rad_stream, (unsigned long long)(offset + a));
        for (int c = 0; c < k; ++c) {
            unsigned int w = trak_mix(rk ^ trak_mix((unsigned int)(c / 32) ^ col_base));
            int bit = (w >> (c & 31)) & 1u;
            out[a * k + c] = (bit ^ flip) ? -1 : 1;
        }
    }
}
#endif

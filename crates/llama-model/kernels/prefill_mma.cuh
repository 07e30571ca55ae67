// Prefill attention on tensor cores (mma.sync m16n8k16, f16/bf16 in, f32
// accumulate), flash-attention style: one block of 4 warps per (tile of up to
// 64 consecutive prompt tokens of one sequence, query head); each warp owns 16
// query rows. Keys and values are staged 64 at a time in shared memory (V
// transposed, so both mma operands are single 32-bit loads), scores stay in
// registers with an online softmax, so nothing of size [T, T] is ever stored.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .f16/.bf16): with g = lane / 4 and
// c = lane % 4, A regs hold (row g | g+8) x (cols 2c, 2c+1 | +8); B regs hold
// (k = 2c, 2c+1 | +8) x (n = g); C holds (row g | g+8) x (cols 2c, 2c+1).
// The C layout of two adjacent 8-key score tiles is the A layout of one
// 16-key step, so the probabilities feed the P·V product without a shuffle.
//
// tiles: [num_tiles, 2] u32 (first token, token count); tile tokens share a
//        sequence and have consecutive, increasing positions.
// Launch: grid (num_tiles, h), block MMA_WARPS * 32, static shared memory.
#pragma once
#include "common.cuh"

#define MMA_WARPS 4
#define MMA_TILE_TOKENS (16 * MMA_WARPS)
#define MMA_KEYS 64
// Row padding (elements): 16 bytes, so that the 8 row groups of a fragment
// load fall in distinct banks.
#define MMA_PAD 8

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
    __device__ __forceinline__ static void run(float (&acc)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};
template <> struct Mma<__half> {
    __device__ __forceinline__ static void run(float (&acc)[4], const uint32_t (&a)[4],
                                               uint32_t b0, uint32_t b1) {
        asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, "
            "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
        __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<uint32_t*>(&v);
    }
};

__device__ __forceinline__ uint32_t load_pair(const void* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// D: head_dim, a multiple of 16 (64 and 128 are instantiated).
template <typename T, int D>
__device__ void prefill_attention_mma(const T* __restrict__ q, const T* __restrict__ k_cache,
                                      const T* __restrict__ v_cache,
                                      const uint32_t* __restrict__ tok_pos,
                                      const uint32_t* __restrict__ tok_seq,
                                      const uint32_t* __restrict__ block_tables,
                                      const uint32_t* __restrict__ tiles, T* __restrict__ out,
                                      int h, int kvh, int block_size, int max_blocks,
                                      float scale) {
    constexpr int KS = D + MMA_PAD;        // K rows: [key][dim]
    constexpr int VS = MMA_KEYS + MMA_PAD;  // V^T rows: [dim][key]
    __shared__ __align__(16) T ks[MMA_KEYS * KS];
    __shared__ __align__(16) T vt[D * VS];
    __shared__ uint32_t slots[MMA_KEYS];

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, c = lane % 4;
    const int head = blockIdx.y;
    const int kv_head = head / (h / kvh);
    const int first = (int)tiles[2 * blockIdx.x];
    const int count = (int)tiles[2 * blockIdx.x + 1];
    const uint32_t* table = block_tables + (size_t)tok_seq[first] * max_blocks;
    const int ctx_max = (int)tok_pos[first + count - 1] + 1;
    // This thread's two query rows; rows past the tile repeat its last token
    // and are never written.
    const int r0 = warp * 16 + g, r1 = r0 + 8;
    const int t0 = first + min(r0, count - 1), t1 = first + min(r1, count - 1);
    const int pos0 = (int)tok_pos[t0], pos1 = (int)tok_pos[t1];
    const int warp_last_pos = (int)tok_pos[first + min(warp * 16 + 15, count - 1)];

    // Queries as A fragments, kept in registers for the whole key loop.
    uint32_t qf[D / 16][4];
    {
        const T* q0 = q + ((size_t)t0 * h + head) * D + 2 * c;
        const T* q1 = q + ((size_t)t1 * h + head) * D + 2 * c;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            qf[kk][0] = load_pair(q0 + kk * 16);
            qf[kk][1] = load_pair(q1 + kk * 16);
            qf[kk][2] = load_pair(q0 + kk * 16 + 8);
            qf[kk][3] = load_pair(q1 + kk * 16 + 8);
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    // Softmax state of rows r0 and r1 in the log2 domain; l is this thread's
    // share of the row sum (its columns), summed over the quad at the end.
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const float scale_log2 = scale * 1.4426950408889634f;
    const size_t row_stride = (size_t)kvh * D;
    const T* k_head = k_cache + (size_t)kv_head * D;
    const T* v_head = v_cache + (size_t)kv_head * D;
    constexpr int PIECES = D / 8;  // 16-byte pieces per row

    for (int base = 0; base < ctx_max; base += MMA_KEYS) {
        const int n_keys = min(MMA_KEYS, ctx_max - base);
        __syncthreads();  // the previous chunk is no longer read
        if (threadIdx.x < MMA_KEYS) {
            const int key = base + threadIdx.x;
            slots[threadIdx.x] = threadIdx.x < n_keys
                                     ? table[key / block_size] * (uint32_t)block_size +
                                           key % block_size
                                     : 0u;
        }
        __syncthreads();
        // K: consecutive threads fill one row (coalesced reads, 16-byte
        // stores). V: consecutive threads take consecutive keys of one
        // 8-dim piece, so the transposed 2-byte stores are spread over banks.
        // Keys past the context are zero (masked below; zero keeps 0 * v finite).
        for (int e = threadIdx.x; e < MMA_KEYS * PIECES; e += MMA_WARPS * 32) {
            const int j = e / PIECES, dim = (e % PIECES) * 8;
            uint4 kr = make_uint4(0, 0, 0, 0);
            if (j < n_keys)
                kr = *reinterpret_cast<const uint4*>(k_head + (size_t)slots[j] * row_stride + dim);
            *reinterpret_cast<uint4*>(ks + j * KS + dim) = kr;
        }
        for (int e = threadIdx.x; e < MMA_KEYS * PIECES; e += MMA_WARPS * 32) {
            const int j = e % MMA_KEYS, dim = (e / MMA_KEYS) * 8;
            uint4 vr = make_uint4(0, 0, 0, 0);
            if (j < n_keys)
                vr = *reinterpret_cast<const uint4*>(v_head + (size_t)slots[j] * row_stride + dim);
            const T* vv = reinterpret_cast<const T*>(&vr);
#pragma unroll
            for (int i = 0; i < 8; ++i) vt[(dim + i) * VS + j] = vv[i];
        }
        __syncthreads();
        if (base > warp_last_pos) continue;  // every key here is after this warp's queries

        // S = Q K^T for this warp's 16 rows and the chunk's 64 keys.
        float s[MMA_KEYS / 8][4];
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; ++nt) {
            s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
            const T* krow = ks + (nt * 8 + g) * KS + 2 * c;
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                Mma<T>::run(s[nt], qf[kk], load_pair(krow + kk * 16), load_pair(krow + kk * 16 + 8));
        }
        // Causal mask (which also hides keys past the context) and scale.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = base + nt * 8 + 2 * c + e;
                s[nt][e] = key <= pos0 ? s[nt][e] * scale_log2 : -INFINITY;
                s[nt][2 + e] = key <= pos1 ? s[nt][2 + e] * scale_log2 : -INFINITY;
                mx0 = fmaxf(mx0, s[nt][e]);
                mx1 = fmaxf(mx1, s[nt][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // Key 0 is visible to every query and sits in the first chunk, so the
        // running max is finite from then on; the guard keeps -inf - -inf out.
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float b0 = mn0 == -INFINITY ? 0.f : mn0, b1 = mn1 == -INFINITY ? 0.f : mn1;
        const float corr0 = exp2f(m0 - b0), corr1 = exp2f(m1 - b1);
        m0 = mn0;
        m1 = mn1;
        float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < MMA_KEYS / 8; ++nt) {
            s[nt][0] = exp2f(s[nt][0] - b0);
            s[nt][1] = exp2f(s[nt][1] - b0);
            s[nt][2] = exp2f(s[nt][2] - b1);
            s[nt][3] = exp2f(s[nt][3] - b1);
            sum0 += s[nt][0] + s[nt][1];
            sum1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * corr0 + sum0;
        l1 = l1 * corr1 + sum1;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= corr0;
            o[dt][1] *= corr0;
            o[dt][2] *= corr1;
            o[dt][3] *= corr1;
        }
        // O += P V, 16 keys per step.
#pragma unroll
        for (int kk = 0; kk < MMA_KEYS / 16; ++kk) {
            const uint32_t pf[4] = {
                Mma<T>::pack(s[2 * kk][0], s[2 * kk][1]),
                Mma<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                Mma<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                Mma<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
                const T* vrow = vt + (dt * 8 + g) * VS + kk * 16 + 2 * c;
                Mma<T>::run(o[dt], pf, load_pair(vrow), load_pair(vrow + 8));
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = 1.f / l0, inv1 = 1.f / l1;
    if (r0 < count) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + ((size_t)(first + r0) * h + head) * D + 2 * c);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4] = Mma<T>::pack(o[dt][0] * inv0, o[dt][1] * inv0);
    }
    if (r1 < count) {
        uint32_t* dst = reinterpret_cast<uint32_t*>(out + ((size_t)(first + r1) * h + head) * D + 2 * c);
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) dst[dt * 4] = Mma<T>::pack(o[dt][2] * inv1, o[dt][3] * inv1);
    }
}

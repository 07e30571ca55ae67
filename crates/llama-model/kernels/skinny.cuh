// Decode projections: y[M, N] = x[M, K] · w[N, K]ᵀ for a few rows (M ≤ 4),
// the weight streamed from memory once. At batch 1 a step is four of these
// per layer plus the LM head, and cuBLAS reaches about 3.3 TB/s of an H200's
// 4.2 on them.
//
// One block of SKINNY_WARPS warps per SKINNY_ROWS weight rows. The K axis is
// cut into steps of 32 lanes × one 16-byte vector; the block's warps take
// the steps round-robin, two at a time, so each lane has 2 × SKINNY_ROWS
// weight loads in flight before it uses any. Each warp sums its share in
// f32, then the warps' partial sums meet in shared memory.
//
// Needs K a multiple of the vector width (8 halves, 4 floats) and x and w
// 16-byte aligned; the caller checks and falls back to cuBLAS otherwise.
// grid: ceil(N / SKINNY_ROWS) blocks of SKINNY_WARPS * 32 threads.
#pragma once
#include "common.cuh"

#define SKINNY_WARPS 8
#define SKINNY_ROWS 4
#define SKINNY_MAX_M 4

template <typename T, int M>
__device__ void skinny_matmul(const T* __restrict__ x, const T* __restrict__ w,
                              T* __restrict__ y, int N, int K) {
    constexpr int EPV = Vec16<T>::N;
    constexpr int STEP = 32 * EPV;
    constexpr int R = SKINNY_ROWS;
    __shared__ float partial[SKINNY_WARPS][M * R];
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int n0 = blockIdx.x * R;
    const int steps = (K + STEP - 1) / STEP;
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float acc[M][R];
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

    for (int s = warp; s < steps; s += 2 * SKINNY_WARPS) {
        uint4 wr[2][R];
        uint4 xr[2][M];
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            const int k = (s + u * SKINNY_WARPS) * STEP + lane * EPV;
            const bool in = s + u * SKINNY_WARPS < steps && k < K;
#pragma unroll
            for (int r = 0; r < R; ++r)
                // Read once: streamed past the caches (evict first).
                wr[u][r] = in && n0 + r < N
                               ? __ldcs(reinterpret_cast<const uint4*>(w + (size_t)(n0 + r) * K + k))
                               : zero;
#pragma unroll
            for (int m = 0; m < M; ++m)
                xr[u][m] = in ? __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * K + k)) : zero;
        }
#pragma unroll
        for (int u = 0; u < 2; ++u) {
            float xv[M][EPV];
#pragma unroll
            for (int m = 0; m < M; ++m) Vec16<T>::unpack(xr[u][m], xv[m]);
#pragma unroll
            for (int r = 0; r < R; ++r) {
                float wv[EPV];
                Vec16<T>::unpack(wr[u][r], wv);
#pragma unroll
                for (int m = 0; m < M; ++m)
#pragma unroll
                    for (int e = 0; e < EPV; ++e) acc[m][r] += xv[m][e] * wv[e];
            }
        }
    }

#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float v = warp_sum(acc[m][r]);
            if (lane == 0) partial[warp][m * R + r] = v;
        }
    __syncthreads();
    if (threadIdx.x < M * R) {
        const int m = threadIdx.x / R;
        const int r = threadIdx.x % R;
        if (n0 + r < N) {
            float sum = 0.f;
#pragma unroll
            for (int i = 0; i < SKINNY_WARPS; ++i) sum += partial[i][threadIdx.x];
            y[(size_t)m * N + n0 + r] = from_f32<T>(sum);
        }
    }
}

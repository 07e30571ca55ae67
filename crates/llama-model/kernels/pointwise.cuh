// Per-token kernels: RoPE + KV-cache write, residual add + RMSNorm, SwiGLU.
#pragma once
#include "common.cuh"

// The slot of a row that must not be cached; must match NO_SLOT in
// src/decode_graphs.rs.
#define NO_SLOT 0xFFFFFFFFu

// ---------------------------------------------------------------------------
// RoPE on q and k straight out of the fused QKV projection, k and v written
// into the paged cache, rotated q written out: one launch instead of two
// narrows, two copies, two rope calls and two scatters.
//
// qkv:   [n, (h + 2 kvh) * d]     rows of the QKV projection
// cos/sin: [max_pos, d / 2]       rotate-half tables (Hugging Face layout)
// pos:   [n] u32                  position of each token
// slots: [n] u32                  cache slot (block * block_size + offset), or
//                                  NO_SLOT for a padding row of a CUDA graph:
//                                  its q is computed, nothing is cached
// q_out: [n, h, d]
// k_cache, v_cache: [slots, kvh, d]
// grid: n blocks; threads stride over the (h + kvh) * d/2 pairs, then kvh * d values.
template <typename T>
__device__ void rope_write_kv(const T* __restrict__ qkv, const T* __restrict__ cos_t,
                              const T* __restrict__ sin_t, const uint32_t* __restrict__ pos,
                              const uint32_t* __restrict__ slots, T* __restrict__ q_out,
                              T* __restrict__ k_cache, T* __restrict__ v_cache, int h, int kvh,
                              int d) {
    const int t = blockIdx.x;
    const int half = d / 2;
    const int width = (h + 2 * kvh) * d;
    const T* row = qkv + (size_t)t * width;
    const T* c = cos_t + (size_t)pos[t] * half;
    const T* s = sin_t + (size_t)pos[t] * half;
    const uint32_t slot32 = slots[t];
    const bool cached = slot32 != NO_SLOT;
    const size_t slot = cached ? slot32 : 0;
    // Padding rows rotate their q heads only.
    const int pairs = (cached ? h + kvh : h) * half;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const int head = i / half;
        const int j = i % half;
        const T* x = row + head * d;
        const float x1 = to_f32(x[j]);
        const float x2 = to_f32(x[j + half]);
        // Rounded like candle's rope: the table values are in the storage dtype.
        const float cj = to_f32(c[j]);
        const float sj = to_f32(s[j]);
        const float o1 = x1 * cj - x2 * sj;
        const float o2 = x2 * cj + x1 * sj;
        T* dst;
        if (head < h) {
            dst = q_out + ((size_t)t * h + head) * d;
        } else {
            dst = k_cache + (slot * kvh + (head - h)) * d;
        }
        dst[j] = from_f32<T>(o1);
        dst[j + half] = from_f32<T>(o2);
    }
    if (!cached) return;
    const T* v = row + (h + kvh) * d;
    T* vdst = v_cache + slot * kvh * d;
    for (int i = threadIdx.x; i < kvh * d; i += blockDim.x) vdst[i] = v[i];
}

// ---------------------------------------------------------------------------
// Residual add + RMSNorm in one pass: out[0] = x + delta (the new residual
// stream), out[1] = rmsnorm(out[0]) * weight.
// grid: rows; block: up to 1024 threads striding over the hidden size.
template <typename T>
__device__ void add_rms_norm(const T* __restrict__ x, const T* __restrict__ delta,
                             const T* __restrict__ weight, T* __restrict__ out, int rows,
                             int hidden, float eps) {
    __shared__ float partial[32];
    const int r = blockIdx.x;
    const T* xr = x + (size_t)r * hidden;
    const T* dr = delta + (size_t)r * hidden;
    T* sum_out = out + (size_t)r * hidden;
    T* norm_out = out + ((size_t)rows + r) * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = to_f32(xr[i]) + to_f32(dr[i]);
        // The residual stream is stored in T, so normalise the rounded value, as
        // a separate add then rms_norm would.
        const T stored = from_f32<T>(v);
        sum_out[i] = stored;
        const float vs = to_f32(stored);
        ss += vs * vs;
    }
    ss = warp_sum(ss);
    if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = ss;
    __syncthreads();
    if (threadIdx.x < 32) {
        const int nw = (blockDim.x + 31) / 32;
        float v = threadIdx.x < nw ? partial[threadIdx.x] : 0.f;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = v;
    }
    __syncthreads();
    const float inv = rsqrtf(partial[0] / hidden + eps);
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        norm_out[i] = from_f32<T>(to_f32(sum_out[i]) * inv * to_f32(weight[i]));
    }
}

// ---------------------------------------------------------------------------
// SwiGLU over the fused gate/up projection: [rows, 2 * inter] -> [rows, inter],
// silu(gate) * up.
template <typename T>
__device__ void swiglu(const T* __restrict__ gate_up, T* __restrict__ out, int rows,
                       int inter) {
    const size_t total = (size_t)rows * inter;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / inter;
        const size_t c = i % inter;
        const float g = to_f32(gate_up[r * 2 * inter + c]);
        const float u = to_f32(gate_up[r * 2 * inter + inter + c]);
        out[i] = from_f32<T>(g / (1.f + __expf(-g)) * u);
    }
}

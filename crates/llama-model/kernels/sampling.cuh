// One token id per row of f32 logits, as src/sampling.rs `pick_row` defines
// it: argmax for a temperature of 0; otherwise weights w = exp((l - max) / T),
// a floor on w raised by top-k, top-p and min-p (ties at the floor all kept),
// and the draw u taken by running sum in vocabulary order.
//
// One block per row. The weights go to `scratch` once; each threshold is then
// the largest float whose predicate holds, found by bisection over its bits
// (positive floats order as their bits), one block reduction per probe.
#pragma once

#include "common.cuh"

#define PICK_THREADS 1024
#define ONE_BITS 0x3f800000u  // 1.0f, the best token's weight

// Per row: temperature, top_k, top_p, min_p, u.
#define PICK_PARAMS 5

__device__ __forceinline__ float block_sum(float v, float* shared) {
    v = warp_sum(v);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();  // `shared` may still be read by the previous reduction
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < blockDim.x / 32 ? shared[lane] : 0.0f;
    return warp_sum(v);
}

// Largest logit (NaN never wins) and its lowest index.
__device__ __forceinline__ void block_argmax(const float* l, int vocab, float* shared_v,
                                             int* shared_i, float* max_out, int* idx_out) {
    float best = -INFINITY;
    int at = vocab;  // "none yet": any real index wins a tie against it
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = l[i];
        if (x > best) { best = x; at = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float b = __shfl_xor_sync(0xffffffffu, best, o);
        const int a = __shfl_xor_sync(0xffffffffu, at, o);
        if (b > best || (b == best && a < at)) { best = b; at = a; }
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) { shared_v[warp] = best; shared_i[warp] = at; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < blockDim.x / 32; ++w) {
            if (shared_v[w] > best || (shared_v[w] == best && shared_i[w] < at)) {
                best = shared_v[w];
                at = shared_i[w];
            }
        }
        // A row of only -inf and NaN: id 0, as on the host.
        if (at >= vocab) at = 0;
        *max_out = best;
        *idx_out = at;
    }
    __syncthreads();
}

// Count (as float) or mass of the weights >= t.
__device__ __forceinline__ float kept(const float* w, int vocab, float t, bool mass, float* shared) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = w[i];
        if (x >= t && x > 0.0f) s += mass ? x : 1.0f;
    }
    return block_sum(s, shared);
}

// The largest t in [lo, 1] with kept(t) >= need; kept(lo) >= need must hold.
__device__ __forceinline__ float highest_floor(const float* w, int vocab, float lo, bool mass,
                                               float need, float* shared) {
    unsigned a = __float_as_uint(lo), b = ONE_BITS;
    while (a < b) {
        const unsigned mid = a + (b - a + 1) / 2;
        if (kept(w, vocab, __uint_as_float(mid), mass, shared) >= need) a = mid;
        else b = mid - 1;
    }
    return __uint_as_float(a);
}

__device__ void pick_rows(const float* logits, const float* params, float* scratch,
                          uint32_t* out, int vocab) {
    __shared__ float red[32];
    __shared__ int red_i[32];
    __shared__ float bcast_max;
    __shared__ int bcast_idx;
    __shared__ float part[PICK_THREADS];
    const int row = blockIdx.x;
    const float* l = logits + (size_t)row * vocab;
    float* w = scratch + (size_t)row * vocab;
    const float* p = params + row * PICK_PARAMS;
    const float temp = p[0], top_p = p[2], min_p = p[3], u = p[4];
    const int top_k = (int)p[1];

    block_argmax(l, vocab, red, red_i, &bcast_max, &bcast_idx);
    const float max = bcast_max;
    const int best = bcast_idx;
    if (!(temp > 0.0f) || max == -INFINITY || isnan(max)) {
        if (threadIdx.x == 0) out[row] = best;
        return;
    }
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float x = l[i];
        w[i] = x == max ? 1.0f : (isnan(x) ? 0.0f : expf((x - max) / temp));
    }
    __syncthreads();

    // The smallest positive weight: the floor before any filter.
    float floor = __uint_as_float(1u);
    const float positive = kept(w, vocab, floor, false, red);
    if (top_k > 0 && (float)top_k < positive)
        floor = highest_floor(w, vocab, floor, false, (float)top_k, red);
    if (top_p < 1.0f) {
        const float need = top_p * kept(w, vocab, floor, true, red);
        floor = highest_floor(w, vocab, floor, true, need, red);
    }
    floor = fmaxf(floor, fminf(min_p, 1.0f));

    // Running sum in vocabulary order: each thread owns a contiguous span,
    // thread 0 scans the spans' sums, the owner of the target walks its span.
    const int span = (vocab + blockDim.x - 1) / blockDim.x;
    const int first = threadIdx.x * span, end = min(first + span, vocab);
    float s = 0.0f;
    for (int i = first; i < end; ++i)
        if (w[i] >= floor) s += w[i];
    part[threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0.0f;
        for (int t = 0; t < blockDim.x; ++t) total += part[t];
        const float target = u * total;
        float acc = 0.0f;
        int owner = -1, last = -1;
        for (int t = 0; t < blockDim.x; ++t) {
            if (part[t] > 0.0f) last = t;
            if (owner < 0 && part[t] > 0.0f && target < acc + part[t]) owner = t;
            if (owner < 0) acc += part[t];
        }
        // Rounding can leave the target at the very end: the last kept id.
        if (owner < 0) { owner = last; acc = -INFINITY; }
        bcast_idx = owner;
        bcast_max = target - acc;  // what is left of the target inside the owner's span
    }
    __syncthreads();
    if (threadIdx.x == bcast_idx) {
        const float left = bcast_max;
        float acc = 0.0f;
        int pick = -1;
        for (int i = first; i < end; ++i) {
            if (w[i] >= floor) {
                acc += w[i];
                pick = i;
                if (left < acc) break;
            }
        }
        out[row] = pick < 0 ? best : pick;
    }
}

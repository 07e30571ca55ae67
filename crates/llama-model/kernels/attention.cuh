// Paged attention: the decode kernel and the query-tiled prefill kernel.
#pragma once
#include "common.cuh"

// ---------------------------------------------------------------------------
// Paged attention over the block tables, for decode and prefill alike: one
// thread block per (query token, kv head), serving the `group` query heads of
// that kv head, so each key/value row is read once per group (GQA).
// The context is split among the warps; each warp keeps an online softmax
// (running max, sum, f32 accumulator) and the warps are merged at the end,
// so no [heads, T, T] matrix is ever stored.
//
// q:      [n, h, d]
// k/v:    [num_blocks * block_size, kvh, d]
// tok_pos:  [n] u32     the token's position; it sees keys 0..=pos (causal)
// tok_seq:  [n] u32     row of its sequence in block_tables
// block_tables: [num_seqs, max_blocks] u32
// tokens: the tokens this launch serves (the decode tokens of the step)
// out:    [n, h, d]
// Launch: grid (len(tokens), kvh), block of up to MAX_ATTN_WARPS warps,
// dynamic shared memory: (group * d) + warps * group * (d + 2) floats.
#define MAX_ATTN_WARPS 8
#define MAX_DPL 8   // head_dim up to 256: 8 dims per lane

// G: compile-time bound on the group size (1, 2, 4 or 8), so that a plain
// multi-head model does not pay registers for eight query heads.
template <typename T, int G, int DPL>
__device__ void paged_attention(const T* __restrict__ q, const T* __restrict__ k_cache,
                                const T* __restrict__ v_cache,
                                const uint32_t* __restrict__ tok_pos,
                                const uint32_t* __restrict__ tok_seq,
                                const uint32_t* __restrict__ block_tables,
                                const uint32_t* __restrict__ tokens, T* __restrict__ out,
                                int h, int kvh, int d, int block_size, int max_blocks,
                                float scale) {
    extern __shared__ float smem[];
    const int t = tokens[blockIdx.x];
    const int kv_head = blockIdx.y;
    const int group = h / kvh;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int ctx = (int)tok_pos[t] + 1;
    const uint32_t* table = block_tables + (size_t)tok_seq[t] * max_blocks;

    // Scaled queries of the group, in f32.
    float* qs = smem;  // [group, d]
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) {
        const int g = i / d;
        qs[i] = to_f32(q[((size_t)t * h + kv_head * group + g) * d + (i % d)]) * scale;
    }
    __syncthreads();

    float m[G];
    float l[G];
    float acc[G][DPL];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) acc[g][i] = 0.f;
    }

    // Per-warp scratch after the queries: 32 slots, then G x 32 probabilities.
    __shared__ uint32_t slots_smem[MAX_ATTN_WARPS][32];
    __shared__ float p_smem[MAX_ATTN_WARPS][G * 32];
    const int warps = blockDim.x / 32;
    uint32_t* chunk_slot = slots_smem[warp];
    float* chunk_p = p_smem[warp];
    const size_t row_stride = (size_t)kvh * d;
    const T* k_head = k_cache + (size_t)kv_head * d;
    const T* v_head = v_cache + (size_t)kv_head * d;
    // Warp w takes keys [32 * (w + warps * c), +32) for c = 0, 1, ...
    for (int base = warp * 32; base < ctx; base += warps * 32) {
        const int key = base + lane;
        const bool valid = key < ctx;
        // Each lane looks up the slot of its key once; the V pass below gets
        // them by shuffle instead of reloading the block table per key.
        uint32_t slot = 0;
        if (valid) slot = table[key / block_size] * (uint32_t)block_size + key % block_size;
        const T* krow = k_head + (size_t)slot * row_stride;
        float score[G];
#pragma unroll
        for (int g = 0; g < G; ++g) score[g] = 0.f;
        if (valid && d % 8 == 0) {
            // Each lane reads its own key row, four 16-byte loads issued
            // together before any use, so their latencies overlap.
            constexpr int EPV = Vec16<T>::N;
            for (int i0 = 0; i0 < d; i0 += 4 * EPV) {
                uint4 raw[4];
#pragma unroll
                for (int u = 0; u < 4; ++u)
                    raw[u] = i0 + u * EPV < d
                                 ? *reinterpret_cast<const uint4*>(krow + i0 + u * EPV)
                                 : make_uint4(0, 0, 0, 0);
#pragma unroll
                for (int u = 0; u < 4; ++u) {
                    if (i0 + u * EPV >= d) break;
                    float kv[EPV];
                    Vec16<T>::unpack(raw[u], kv);
#pragma unroll
                    for (int g = 0; g < G; ++g) {
                        if (g >= group) break;
                        const float* qg = qs + g * d + i0 + u * EPV;
#pragma unroll
                        for (int e = 0; e < EPV; ++e) score[g] += qg[e] * kv[e];
                    }
                }
            }
        } else if (valid) {
            for (int i = 0; i < d; ++i) {
                const float kv = to_f32(krow[i]);
#pragma unroll
                for (int g = 0; g < G; ++g)
                    if (g < group) score[g] += qs[g * d + i] * kv;
            }
        }
        const int n_keys = min(32, ctx - base);
#pragma unroll
        for (int g = 0; g < G; ++g) {
            if (g >= group) break;
            const float s = valid ? score[g] : -INFINITY;
            const float m_new = fmaxf(m[g], warp_max(s));
            const float correction = __expf(m[g] - m_new);
            const float p = valid ? __expf(s - m_new) : 0.f;
            l[g] = l[g] * correction + warp_sum(p);
            m[g] = m_new;
#pragma unroll
            for (int i = 0; i < DPL; ++i) acc[g][i] *= correction;
            score[g] = p;
        }
        // The chunk's slots and probabilities go through this warp's corner of
        // shared memory: read back as broadcasts, they leave the V loop free
        // of shuffles, so the compiler can keep many row loads in flight.
        chunk_slot[lane] = slot;
#pragma unroll
        for (int g = 0; g < G; ++g) chunk_p[g * 32 + lane] = score[g];
        __syncwarp();
        // acc[dim] += sum_j p_j v_j[dim]; lanes split the dims so each V row
        // read is coalesced. Eight rows are loaded before any is used.
        for (int j0 = 0; j0 < n_keys; j0 += 8) {
            T raw[8][DPL];
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
                const int j = min(j0 + jj, n_keys - 1);
                const T* vrow = v_head + (size_t)chunk_slot[j] * row_stride;
#pragma unroll
                for (int i = 0; i < DPL; ++i) {
                    const int dim = lane + 32 * i;
                    raw[jj][i] = dim < d ? vrow[dim] : from_f32<T>(0.f);
                }
            }
#pragma unroll
            for (int jj = 0; jj < 8; ++jj) {
                if (j0 + jj >= n_keys) break;
#pragma unroll
                for (int g = 0; g < G; ++g) {
                    if (g >= group) break;
                    const float p = chunk_p[g * 32 + j0 + jj];
#pragma unroll
                    for (int i = 0; i < DPL; ++i) acc[g][i] += p * to_f32(raw[jj][i]);
                }
            }
        }
        __syncwarp();
    }

    // Merge the warps: per warp and group, m, l and acc[d] go to shared memory.
    float* wstate = smem + group * d;  // [warps, group, d + 2]
    const int stride = d + 2;
    // Unrolled with constant indices so acc stays in registers.
#pragma unroll
    for (int g = 0; g < G; ++g) {
        if (g >= group) break;
        float* ws = wstate + (warp * group + g) * stride;
        if (lane == 0) {
            ws[0] = m[g];
            ws[1] = l[g];
        }
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
            const int dim = lane + 32 * i;
            if (dim < d) ws[2 + dim] = acc[g][i];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < group * d; i += blockDim.x) {
        const int g = i / d;
        const int dim = i % d;
        float m_all = -INFINITY;
        for (int w = 0; w < warps; ++w) m_all = fmaxf(m_all, wstate[(w * group + g) * stride]);
        float l_all = 0.f, o = 0.f;
        for (int w = 0; w < warps; ++w) {
            const float* ws = wstate + (w * group + g) * stride;
            if (ws[0] == -INFINITY) continue;  // this warp saw no keys
            const float f = __expf(ws[0] - m_all);
            l_all += ws[1] * f;
            o += ws[2 + dim] * f;
        }
        out[((size_t)t * h + kv_head * group + g) * d + dim] = from_f32<T>(o / l_all);
    }
}

// ---------------------------------------------------------------------------
// Prefill attention, tiled over queries: one block per (tile of consecutive
// prompt tokens of one sequence, kv head), one warp per (token, query head).
// The block stages each 32-key chunk of K and V in shared memory once for all
// its warps, so a prompt's keys are read from memory once per tile instead of
// once per token; each warp keeps its own online softmax, so nothing of size
// [T, T] is ever stored.
//
// tiles: [num_tiles, 2] u32 (first token, token count); tile tokens share a
//        sequence and have consecutive positions.
// Launch: grid (num_tiles, kvh), block (tile_tokens * group) warps (<= 16),
// dynamic shared memory: see prefill_smem_bytes in cuda_kernels.rs.
template <typename T>
__device__ void prefill_attention(const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache,
                                  const uint32_t* __restrict__ tok_pos,
                                  const uint32_t* __restrict__ tok_seq,
                                  const uint32_t* __restrict__ block_tables,
                                  const uint32_t* __restrict__ tiles, T* __restrict__ out, int h,
                                  int kvh, int d, int block_size, int max_blocks, float scale) {
    extern __shared__ float smem[];
    const int warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int kv_head = blockIdx.y;
    const int group = h / kvh;
    const int first = (int)tiles[2 * blockIdx.x];
    const int count = (int)tiles[2 * blockIdx.x + 1];
    const int tok_in_tile = warp / group;
    const int head = kv_head * group + warp % group;
    const bool active = tok_in_tile < count;
    const int t = first + min(tok_in_tile, count - 1);
    const int my_ctx = (int)tok_pos[t] + 1;
    const int ctx_max = (int)tok_pos[first + count - 1] + 1;
    const uint32_t* table = block_tables + (size_t)tok_seq[first] * max_blocks;

    // Shared memory: queries [warps][d] f32, chunk probabilities [warps][32],
    // chunk slots [32], then K and V chunks [32][d + pad] in T. With 16-byte
    // vectors (d % EPV == 0) rows are padded by 16 bytes, so that the 8 lanes
    // of each phase of a 16-byte read land in distinct banks; otherwise by 4.
    constexpr int EPV = Vec16<T>::N;
    const bool vec = d % EPV == 0;
    float* qs = smem;
    float* ps = qs + warps * d;
    uint32_t* chunk_slots = reinterpret_cast<uint32_t*>(ps + warps * 32);
    const int pad = vec ? EPV : 4 / (int)sizeof(T);
    const int kstride = d + pad;
    T* ks = reinterpret_cast<T*>(chunk_slots + 32);
    T* vs = ks + 32 * kstride;

    for (int i = lane; i < d; i += 32) qs[warp * d + i] = to_f32(q[((size_t)t * h + head) * d + i]) * scale;

    float m = -INFINITY, l = 0.f;
    float acc[MAX_DPL];
#pragma unroll
    for (int i = 0; i < MAX_DPL; ++i) acc[i] = 0.f;
    const size_t row_stride = (size_t)kvh * d;
    const T* k_head = k_cache + (size_t)kv_head * d;
    const T* v_head = v_cache + (size_t)kv_head * d;

    for (int base = 0; base < ctx_max; base += 32) {
        const int n_keys = min(32, ctx_max - base);
        __syncthreads();  // the previous chunk is no longer read
        if (threadIdx.x < n_keys) {
            const int key = base + threadIdx.x;
            chunk_slots[threadIdx.x] = table[key / block_size] * (uint32_t)block_size + key % block_size;
        }
        __syncthreads();
        if (vec) {
            const int per_row = d / EPV;
            for (int e = threadIdx.x; e < n_keys * per_row; e += blockDim.x) {
                const int j = e / per_row, dim = (e % per_row) * EPV;
                const size_t off = (size_t)chunk_slots[j] * row_stride + dim;
                *reinterpret_cast<uint4*>(ks + j * kstride + dim) =
                    *reinterpret_cast<const uint4*>(k_head + off);
                *reinterpret_cast<uint4*>(vs + j * kstride + dim) =
                    *reinterpret_cast<const uint4*>(v_head + off);
            }
        } else {
            for (int e = threadIdx.x; e < n_keys * d; e += blockDim.x) {
                const int j = e / d, dim = e % d;
                const size_t off = (size_t)chunk_slots[j] * row_stride + dim;
                ks[j * kstride + dim] = k_head[off];
                vs[j * kstride + dim] = v_head[off];
            }
        }
        __syncthreads();
        // Lane j scores key base + j against this warp's query.
        const int key = base + lane;
        const bool valid = active && lane < n_keys && key < my_ctx;
        float s = -INFINITY;
        if (valid) {
            float dot = 0.f;
            const T* krow = ks + lane * kstride;
            const float* qw = qs + warp * d;
            if (vec) {
                for (int i = 0; i < d; i += EPV) {
                    float kv[EPV];
                    Vec16<T>::unpack(*reinterpret_cast<const uint4*>(krow + i), kv);
#pragma unroll
                    for (int e = 0; e < EPV; ++e) dot += qw[i + e] * kv[e];
                }
            } else {
                for (int i = 0; i < d; ++i) dot += qw[i] * to_f32(krow[i]);
            }
            s = dot;
        }
        const float m_new = fmaxf(m, warp_max(s));
        if (m_new == -INFINITY) continue;  // no visible key in this chunk for this warp
        const float correction = __expf(m - m_new);
        const float p = valid ? __expf(s - m_new) : 0.f;
        l = l * correction + warp_sum(p);
        m = m_new;
#pragma unroll
        for (int i = 0; i < MAX_DPL; ++i) acc[i] *= correction;
        ps[warp * 32 + lane] = p;
        __syncwarp();
        for (int j = 0; j < n_keys; ++j) {
            const float pj = ps[warp * 32 + j];
            const T* vrow = vs + j * kstride;
#pragma unroll
            for (int i = 0; i < MAX_DPL; ++i) {
                const int dim = lane + 32 * i;
                if (dim < d) acc[i] += pj * to_f32(vrow[dim]);
            }
        }
        __syncwarp();
    }
    if (!active) return;
    const float inv = 1.f / l;
#pragma unroll
    for (int i = 0; i < MAX_DPL; ++i) {
        const int dim = lane + 32 * i;
        if (dim < d) out[((size_t)t * h + head) * d + dim] = from_f32<T>(acc[i] * inv);
    }
}

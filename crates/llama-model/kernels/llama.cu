// Fused CUDA kernels of the Llama forward pass. Built to PTX by build.rs
// (cuda feature only) and launched from src/cuda/mod.rs.
//
// Every kernel reads and writes the storage dtype (f32, f16, bf16) and
// computes in f32. Each is instantiated once per dtype with a suffix.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Eight consecutive values as f32, with 16-byte loads (p must be 16-byte aligned).
__device__ __forceinline__ void load8(const float* p, float* out) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    const float4 b = *reinterpret_cast<const float4*>(p + 4);
    out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
    out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
}
__device__ __forceinline__ void load8(const __half* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void load8(const __nv_bfloat16* p, float* out) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __bfloat1622float2(h[i]);
        out[2 * i] = f.x;
        out[2 * i + 1] = f.y;
    }
}

// One 16-byte vector as f32: 4 floats, or 8 halves / bfloat16s.
template <typename T> struct Vec16;
template <> struct Vec16<float> {
    static constexpr int N = 4;
    __device__ __forceinline__ static void unpack(const uint4& r, float* out) {
        out[0] = __uint_as_float(r.x); out[1] = __uint_as_float(r.y);
        out[2] = __uint_as_float(r.z); out[3] = __uint_as_float(r.w);
    }
};
template <> struct Vec16<__half> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void unpack(const uint4& r, float* out) {
        const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __half22float2(h[i]);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
};
template <> struct Vec16<__nv_bfloat16> {
    static constexpr int N = 8;
    __device__ __forceinline__ static void unpack(const uint4& r, float* out) {
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 f = __bfloat1622float2(h[i]);
            out[2 * i] = f.x;
            out[2 * i + 1] = f.y;
        }
    }
};

// ---------------------------------------------------------------------------
// RoPE on q and k straight out of the fused QKV projection, k and v written
// into the paged cache, rotated q written out: one launch instead of two
// narrows, two copies, two rope calls and two scatters.
//
// qkv:   [n, (h + 2 kvh) * d]     rows of the QKV projection
// cos/sin: [max_pos, d / 2]       rotate-half tables (Hugging Face layout)
// pos:   [n] u32                  position of each token
// slots: [n] u32                  cache slot (block * block_size + offset)
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
    const size_t slot = slots[t];
    const int pairs = (h + kvh) * half;
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
    const T* v = row + (h + kvh) * d;
    T* vdst = v_cache + slot * kvh * d;
    for (int i = threadIdx.x; i < kvh * d; i += blockDim.x) vdst[i] = v[i];
}

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

#define ATTENTION(T, SUFFIX, G, DPL)                                                             \
    extern "C" __global__ void __launch_bounds__(MAX_ATTN_WARPS * 32)                            \
        paged_attention_g##G##_d##DPL##_##SUFFIX(                                                \
            const T* q, const T* k_cache, const T* v_cache, const uint32_t* tok_pos,             \
            const uint32_t* tok_seq, const uint32_t* block_tables, const uint32_t* tokens,       \
            T* out, int h, int kvh, int d, int block_size, int max_blocks, float scale) {        \
        paged_attention<T, G, DPL>(q, k_cache, v_cache, tok_pos, tok_seq, block_tables, tokens,  \
                                   out, h, kvh, d, block_size, max_blocks, scale);               \
    }
#define ATTENTION_G(T, SUFFIX, G)                                                                \
    ATTENTION(T, SUFFIX, G, 2)                                                                   \
    ATTENTION(T, SUFFIX, G, 4)                                                                   \
    ATTENTION(T, SUFFIX, G, 8)

#define INSTANTIATE(T, SUFFIX)                                                                   \
    extern "C" __global__ void rope_write_kv_##SUFFIX(                                           \
        const T* qkv, const T* cos_t, const T* sin_t, const uint32_t* pos,                       \
        const uint32_t* slots, T* q_out, T* k_cache, T* v_cache, int h, int kvh, int d) {        \
        rope_write_kv<T>(qkv, cos_t, sin_t, pos, slots, q_out, k_cache, v_cache, h, kvh, d);     \
    }                                                                                            \
    ATTENTION_G(T, SUFFIX, 1)                                                                    \
    ATTENTION_G(T, SUFFIX, 2)                                                                    \
    ATTENTION_G(T, SUFFIX, 4)                                                                    \
    ATTENTION_G(T, SUFFIX, 8)                                                                    \
    extern "C" __global__ void __launch_bounds__(512) prefill_attention_##SUFFIX(                \
        const T* q, const T* k_cache, const T* v_cache, const uint32_t* tok_pos,                 \
        const uint32_t* tok_seq, const uint32_t* block_tables, const uint32_t* tiles, T* out,    \
        int h, int kvh, int d, int block_size, int max_blocks, float scale) {                    \
        prefill_attention<T>(q, k_cache, v_cache, tok_pos, tok_seq, block_tables, tiles, out, h, \
                             kvh, d, block_size, max_blocks, scale);                             \
    }                                                                                            \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* delta,                 \
                                                      const T* weight, T* out, int rows,         \
                                                      int hidden, float eps) {                   \
        add_rms_norm<T>(x, delta, weight, out, rows, hidden, eps);                               \
    }                                                                                            \
    extern "C" __global__ void swiglu_##SUFFIX(const T* gate_up, T* out, int rows, int inter) {  \
        swiglu<T>(gate_up, out, rows, inter);                                                    \
    }

INSTANTIATE(float, f32)
INSTANTIATE(__half, f16)
INSTANTIATE(__nv_bfloat16, bf16)

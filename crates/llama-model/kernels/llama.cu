// Fused CUDA kernels of the Llama forward pass. Built to PTX by build.rs
// (cuda feature only) and launched from src/cuda_kernels/.
//
// Every kernel reads and writes the storage dtype (f32, f16, bf16) and
// computes in f32. Each is instantiated once per dtype with a suffix.


#include "attention.cuh"
#include "pointwise.cuh"
#include "prefill_mma.cuh"
#include "sampling.cuh"
#include "skinny.cuh"

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

#define PREFILL_MMA(T, SUFFIX, D)                                                                \
    extern "C" __global__ void __launch_bounds__(MMA_WARPS * 32) prefill_attention_mma_d##D##_##SUFFIX( \
        const T* q, const T* k_cache, const T* v_cache, const uint32_t* tok_pos,                 \
        const uint32_t* tok_seq, const uint32_t* block_tables, const uint32_t* tiles, T* out,    \
        int h, int kvh, int block_size, int max_blocks, float scale) {                           \
        prefill_attention_mma<T, D>(q, k_cache, v_cache, tok_pos, tok_seq, block_tables, tiles,  \
                                    out, h, kvh, block_size, max_blocks, scale);                 \
    }
// Tensor cores take 16-bit inputs only; f32 models keep the tiled kernel.
PREFILL_MMA(__half, f16, 64)
PREFILL_MMA(__half, f16, 128)
PREFILL_MMA(__nv_bfloat16, bf16, 64)
PREFILL_MMA(__nv_bfloat16, bf16, 128)

#define SKINNY(T, SUFFIX, M)                                                                     \
    extern "C" __global__ void __launch_bounds__(SKINNY_WARPS * 32)                              \
        skinny_matmul_m##M##_##SUFFIX(const T* x, const T* w, T* y, int n, int k) {              \
        skinny_matmul<T, M>(x, w, y, n, k);                                                      \
    }
#define SKINNY_M(T, SUFFIX) SKINNY(T, SUFFIX, 1) SKINNY(T, SUFFIX, 2) SKINNY(T, SUFFIX, 3) SKINNY(T, SUFFIX, 4)
SKINNY_M(float, f32)
SKINNY_M(__half, f16)
SKINNY_M(__nv_bfloat16, bf16)

extern "C" __global__ void __launch_bounds__(PICK_THREADS)
    pick_rows_f32(const float* logits, const float* params, float* scratch, uint32_t* out,
                  int vocab) {
    pick_rows(logits, params, scratch, out, vocab);
}

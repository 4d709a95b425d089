/*
 * simd_attn.h: the C ABI of simd-attn, fused (flash-style) CPU attention kernels.
 *
 * C99, usable from C++. Link with -lsimd_attn (libsimd_attn.so or libsimd_attn.a; the static
 * library also needs -lpthread -ldl -lm).
 *
 * One call computes, for every batch entry b, query head h and query row i,
 *     out[b,h,i,:] = sum_j p_j * v[b, h / (q_heads / kv_heads), j, :]
 *     p = softmax_j( scale * q.k_j  (softcap)  + bias + alibi, masked ) with an optional sink,
 * without storing the score matrix. The exact semantics of every option are those of the Rust
 * API's AttentionParams (README, "Semantics"): causal masks are bottom-right aligned
 * (off = kv_len - seq_q), a fully masked row gives zeros and lse = -inf, never NaN.
 *
 * Conventions
 * - Every function returns a status (SIMD_ATTN_OK = 0, or an error code below) unless stated.
 *   On error nothing is written to the outputs, and simd_attn_last_error() gives a detailed
 *   message for the calling thread.
 * - Every pointer comes with its length in elements; the library checks that every element the
 *   shape and strides reach lies inside that length. Strides are in elements, >= 0; the last
 *   (dim) axis is contiguous. Zero strides broadcast inputs; outputs must not overlap
 *   themselves, each other, or any input.
 * - Buffers must stay valid, and outputs untouched by anyone else, for the duration of a call
 *   (for a plan: until simd_attn_plan_destroy).
 * - Every function is thread-safe. No Rust panic crosses this boundary (a bug would return
 *   SIMD_ATTN_ERR_INTERNAL).
 */
#ifndef SIMD_ATTN_H
#define SIMD_ATTN_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The ABI version this header describes; simd_attn_desc.abi_version must hold it. */
#define SIMD_ATTN_ABI_VERSION 1

/* ---- status codes (stable numbers; simd_attn_status_string gives a message) ---- */
#define SIMD_ATTN_OK 0
#define SIMD_ATTN_ERR_NULL_POINTER 1        /* a required pointer is NULL */
#define SIMD_ATTN_ERR_MISALIGNED 2          /* a pointer is not aligned to its element type */
#define SIMD_ATTN_ERR_DESC_SIZE 3           /* struct_size too small, or unknown fields set */
#define SIMD_ATTN_ERR_ABI_VERSION 4         /* abi_version is not SIMD_ATTN_ABI_VERSION */
#define SIMD_ATTN_ERR_UNKNOWN_DTYPE 5       /* a dtype field is not SIMD_ATTN_F32 / F16 / BF16 */
#define SIMD_ATTN_ERR_UNSUPPORTED_DTYPES 6  /* k and v differ in dtype (other than q8_0 with f16),
                                               or merge parts do */
#define SIMD_ATTN_ERR_NEGATIVE_STRIDE 7     /* a stride is negative */
#define SIMD_ATTN_ERR_ZERO_DIM 8            /* head_dim, heads or nth is 0 */
#define SIMD_ATTN_ERR_HEADS_NOT_DIVISIBLE 9 /* q_heads % kv_heads != 0 */
#define SIMD_ATTN_ERR_BUFFER_TOO_SMALL 10   /* shape/strides reach past a buffer's length */
#define SIMD_ATTN_ERR_SIZE_OVERFLOW 11      /* shape x strides overflows */
#define SIMD_ATTN_ERR_OVERLAPPING_OUTPUT 12 /* an output's strides overlap its own elements */
#define SIMD_ATTN_ERR_ALIASING 13           /* an output overlaps an input or the other output */
#define SIMD_ATTN_ERR_WRONG_LENGTH 14       /* kv_lens / alibi_slopes / sinks length wrong */
#define SIMD_ATTN_ERR_KV_LEN_OUT_OF_RANGE 15 /* a kv_lens entry < 0 or > seq_kv */
#define SIMD_ATTN_ERR_NON_FINITE_SCALE 16   /* use_scale with a NaN or infinite scale */
#define SIMD_ATTN_ERR_INVALID_SOFTCAP 17    /* softcap < 0, NaN or infinite */
#define SIMD_ATTN_ERR_INVALID_WINDOW 18     /* a window bound < -1 */
#define SIMD_ATTN_ERR_INVALID_VALUE 19      /* an ALiBi slope or sink value not allowed */
#define SIMD_ATTN_ERR_SHARE_OUT_OF_RANGE 20 /* ith >= nth */
#define SIMD_ATTN_ERR_SHARE_ALREADY_RUN 21  /* a share's run (or merge) called twice */
#define SIMD_ATTN_ERR_SHARES_NOT_FINISHED 22 /* merge before every share's run returned */
#define SIMD_ATTN_ERR_WORKSPACE_TOO_SMALL 23 /* workspace_len < simd_attn_plan_workspace_len */
#define SIMD_ATTN_ERR_OUT_OF_MEMORY 24      /* working memory could not be allocated */
#define SIMD_ATTN_ERR_ISA_UNAVAILABLE 25    /* the requested ISA cannot run on this machine */
#define SIMD_ATTN_ERR_UNKNOWN_ISA 26        /* an ISA value (or SIMD_ATTN_ISA) names no path */
#define SIMD_ATTN_ERR_INTERNAL 27           /* a bug in simd-attn: please report it */
#define SIMD_ATTN_ERR_INVALID_SCORE 28      /* score weights/dims/temperature don't fit, or scale set */
#define SIMD_ATTN_ERR_UNKNOWN_SCORE 29      /* the score field holds an unknown value */
#define SIMD_ATTN_ERR_UNSUPPORTED 30        /* plans run the dot scores only, without inspection */
#define SIMD_ATTN_ERR_RESERVED 31           /* a reserved field is not 0 */
#define SIMD_ATTN_ERR_INVALID_PAGE 32       /* a block-table entry a visible key reaches names no page */
#define SIMD_ATTN_ERR_INVALID_SEQLENS 33    /* cu_seqlens: not B+1 non-negative, non-decreasing offsets that fit */
#define SIMD_ATTN_ERR_INVALID_ROPE 34        /* rotary tables: bad rotary_dim, or short of a row's position */

/* ---- element types (the dtype fields) ---- */
#define SIMD_ATTN_F32 0 /* float */
#define SIMD_ATTN_F16 1 /* IEEE binary16 (uint16_t bits, _Float16, __fp16) */
#define SIMD_ATTN_BF16 2 /* bfloat16: the top 16 bits of a float (uint16_t bits, __bf16) */
#define SIMD_ATTN_I8 3   /* int8_t codes, k and v only: value = factor * code, the factors
                            from k_scale_kind / v_scale_kind (all 1 with SIMD_ATTN_SCALE_NONE) */
#define SIMD_ATTN_F8E4M3 4 /* OCP fp8 E4M3 codes (uint8_t; torch.float8_e4m3fn), k and v only:
                              value = factor * decode(code); bias 7, subnormals, no infinity,
                              0x7f / 0xff are NaN, largest 448 */
#define SIMD_ATTN_F8E5M2 5 /* OCP fp8 E5M2 codes (uint8_t; torch.float8_e5m2): the top byte of
                              an IEEE binary16, infinities and NaNs included; k and v only,
                              value = factor * decode(code) */
#define SIMD_ATTN_Q8_0 6   /* ggml q8_0 blocks (block_q8_0, 34 bytes: a binary16 scale d, then
                              32 int8_t codes), k and v only: value i of a row = factor *
                              d * qs[i % 32] of the row's block i / 32; head_dim and v_head_dim
                              multiples of 32; len and strides count blocks (ggml's nb / 34);
                              data 2-byte aligned */

/* ---- dequantization factors of K and V (simd_attn_desc.k_scale_kind, v_scale_kind) ---- */
#define SIMD_ATTN_SCALE_NONE 0   /* every factor 1 (the default) */
#define SIMD_ATTN_SCALE_TENSOR 1 /* one factor for the tensor: k_scale / v_scale */
#define SIMD_ATTN_SCALE_HEAD 2   /* one per KV head: k_scales [Hkv] */
#define SIMD_ATTN_SCALE_TOKEN 3  /* one per (token, KV head): k_scales through its strides */

/* ---- score functions (simd_attn_desc.score): e = f(q, k) before terms and masks ---- */
#define SIMD_ATTN_SCORE_SCALED_DOT 0 /* scale * q.k (the default; scale as use_scale says) */
#define SIMD_ATTN_SCORE_DOT 1        /* q.k (Luong "dot") */
#define SIMD_ATTN_SCORE_COSINE 2     /* temperature * q.k / (max(|q|,1e-8) * max(|k|,1e-8)) */
#define SIMD_ATTN_SCORE_GENERAL 3    /* q^T W k, W = score_w [q_dim, head_dim] (Luong "general") */
#define SIMD_ATTN_SCORE_ADDITIVE 4   /* sum_a v_a tanh(q'_a + k'_a) (Bahdanau), v = additive_v */

/* ---- instruction-set paths (the isa arguments) ---- */
#define SIMD_ATTN_ISA_AUTO (-1)   /* override, else env SIMD_ATTN_ISA, else the best (and bf16
                                     prefill on AVX512BF16 where vdpbf16ps runs at the FMA rate:
                                     AMD; run_info.isa says which ran) */
#define SIMD_ATTN_ISA_PORTABLE 0  /* plain Rust flash kernel (the baseline) */
#define SIMD_ATTN_ISA_SCALAR 1    /* the SIMD kernel on one lane */
#define SIMD_ATTN_ISA_AVX2 2      /* AVX2 + FMA + F16C */
#define SIMD_ATTN_ISA_AVX512 3    /* AVX-512 F/BW/CD/DQ/VL */
#define SIMD_ATTN_ISA_NEON 4      /* aarch64 NEON */
#define SIMD_ATTN_ISA_AVX512BF16 5 /* AVX-512 + AVX512_BF16: bf16 Q and K/V prefill on vdpbf16ps */

/* An input tensor [batch, head, seq, dim] with the dim axis contiguous. */
typedef struct simd_attn_tensor {
    const void *data;     /* first element; may be NULL only when len == 0 */
    size_t len;           /* elements readable from data */
    int32_t dtype;        /* SIMD_ATTN_F32, SIMD_ATTN_F16, SIMD_ATTN_BF16 (k, v: or SIMD_ATTN_I8,
                             SIMD_ATTN_F8E4M3, SIMD_ATTN_F8E5M2, SIMD_ATTN_Q8_0; k and v the same,
                             or the mixed pairs q8_0 k + f16 v and f16 k + q8_0 v) */
    int32_t reserved;     /* must be 0 (SIMD_ATTN_ERR_RESERVED otherwise) */
    int64_t stride_batch; /* elements between batch entries (>= 0; 0 broadcasts) */
    int64_t stride_head;  /* elements between heads */
    int64_t stride_seq;   /* elements between rows (tokens) */
} simd_attn_tensor;

/* An output tensor: the same fields, writable. */
typedef struct simd_attn_output {
    void *data;
    size_t len;
    int32_t dtype;
    int32_t reserved;     /* must be 0 */
    int64_t stride_batch;
    int64_t stride_head;
    int64_t stride_seq;
} simd_attn_output;

/*
 * The problem of one call. Fill it with simd_attn_desc_init (which sets struct_size,
 * abi_version and every optional field to "off"), then set the shape and tensors.
 */
typedef struct simd_attn_desc {
    uint32_t struct_size; /* sizeof(simd_attn_desc) as compiled by the caller */
    uint32_t abi_version; /* SIMD_ATTN_ABI_VERSION */
    size_t batch;         /* B (0: nothing to do) */
    size_t q_heads;       /* Hq >= 1 */
    size_t kv_heads;      /* Hkv >= 1, divides Hq (GQA / MQA) */
    size_t seq_q;         /* Sq (0: nothing to do) */
    size_t seq_kv;        /* Skv (0: every row fully masked) */
    size_t head_dim;      /* D >= 1, of Q and K */
    size_t v_head_dim;    /* Dv of V and out; 0 means head_dim */
    simd_attn_tensor q;   /* [B, Hq, Sq, D] */
    simd_attn_tensor k;   /* [B, Hkv, Skv, D] */
    simd_attn_tensor v;   /* [B, Hkv, Skv, Dv], same dtype as k, or f16 with q8_0 k (and q8_0
                             with f16 k): llama.cpp's -ctk / -ctv pairs */
    simd_attn_output out; /* [B, Hq, Sq, Dv] */
    float *lse;           /* optional [B, Hq, Sq] contiguous natural-log sum-exp; NULL: none */
    size_t lse_len;
    int32_t use_scale;    /* 0: scale = 1/sqrt(head_dim); 1: use `scale` */
    float scale;
    int32_t causal;       /* 1: key j visible iff j <= i + kv_len - seq_q (bottom-right) */
    float softcap;        /* > 0: s -> softcap * tanh(s / softcap); 0: off */
    int64_t window_left;  /* keys i+off-left .. i+off+right visible; -1: unbounded */
    int64_t window_right;
    const int64_t *kv_lens; /* optional per-batch valid key counts (len batch); NULL: seq_kv */
    size_t kv_lens_len;
    const float *bias;    /* optional additive bias / mask [B, Hq, Sq, Skv], keys contiguous */
    size_t bias_len;
    int64_t bias_stride_batch; /* 0 broadcasts (e.g. [1, 1, Sq, Skv] masks) */
    int64_t bias_stride_head;
    int64_t bias_stride_row;
    const float *alibi_slopes; /* optional, len q_heads: s += slope_h * (j - (i + off)) */
    size_t alibi_slopes_len;
    const float *sinks;   /* optional, len q_heads: a virtual key's logit; -inf: none */
    size_t sinks_len;
    /* Appended fields: a descriptor from an older header (struct_size up to sinks_len) reads
     * them as their defaults. Weights are f32, row-major, shared by every head, finite. */
    int32_t score;        /* SIMD_ATTN_SCORE_*; 0: scaled dot. Others require use_scale = 0 */
    float temperature;    /* cosine's temperature (desc_init: 1) */
    size_t q_dim;         /* Q's columns for general and projected additive; 0: head_dim */
    const float *score_w; /* general: W [q_dim, head_dim] */
    size_t score_w_len;
    const float *additive_v;   /* additive: v [A], A the attention dim */
    size_t additive_v_len;
    const float *additive_w_q; /* additive, optional: W_q [A, q_dim]; NULL with w_k NULL: Q and K */
    size_t additive_w_q_len;   /*   are already projected (then head_dim == A) */
    const float *additive_w_k; /* additive, optional: W_k [A, head_dim] */
    size_t additive_w_k_len;
    float *alignment;     /* optional output [B, Hq, Sq, Skv] f32: the attention probabilities */
    size_t alignment_len; /*   (a second pass from the LSE; forward and reference only) */
    float *coverage;      /* optional output [B, Hq, Skv] f32: attention summed over rows */
    size_t coverage_len;
    /* Paged K/V (appended; a descriptor up to coverage_len reads them as 0: K and V are tensors).
     * With a block table, k and v are pools of num_pages pages read in place: their strides are
     * (stride_batch, stride_head, stride_seq) = (between pages, between KV heads, between the
     * tokens of a page), e.g. [num_pages, page_size, Hkv, D] or [num_pages, Hkv, page_size, D].
     * Key j of sequence b is slot j % page_size of page block_table[b * pages_per_seq +
     * j / page_size]; kv_lens (or seq_kv) gives each sequence's keys, at most pages_per_seq *
     * page_size. Every entry a key reaches must be in 0..num_pages (SIMD_ATTN_ERR_INVALID_PAGE);
     * the others are never read. */
    const int32_t *block_table; /* [B, pages_per_seq] page indices; NULL: K/V are tensors */
    size_t block_table_len;
    size_t pages_per_seq;
    size_t page_size;     /* tokens per page, >= 1 */
    size_t num_pages;
    /* Packed variable-length sequences (appended; a descriptor up to num_pages reads them as
     * NULL), as flash_attn_varlen_func takes them: B + 1 non-decreasing int32 offsets from >= 0.
     * cu_seqlens_q: q and out hold tokens; row i of sequence b is token cu_seqlens_q[b] + i
     * (stride_seq between tokens, stride_head between heads, stride_batch unused); sequence b
     * has cu_seqlens_q[b+1] - cu_seqlens_q[b] <= seq_q rows, its causal mask and ALiBi aligned
     * to its own last row; lse is [Hq, cu_seqlens_q[B]]. Dot scores only, no bias, no
     * alignment/coverage (SIMD_ATTN_ERR_UNSUPPORTED).
     * cu_seqlens_k: k and v (tensors, not pages) hold tokens likewise; sequence b has its
     * segment's keys (<= seq_kv), or kv_lens[b] of them when kv_lens is set. */
    const int32_t *cu_seqlens_q;
    size_t cu_seqlens_q_len;
    const int32_t *cu_seqlens_k;
    size_t cu_seqlens_k_len;
    /* RoPE and KV cache appends (appended; a descriptor up to cu_seqlens_k_len reads them as
     * NULL / 0: no rotation, no append).
     * Rotary tables as flash_attn_with_kvcache takes them: rope_cos and rope_sin are
     * [positions, rotary_dim / 2] f32 row-major (rope_len elements each); rotary_dim even, in
     * 2..head_dim (the rest of a row is not rotated); rope_interleaved 1: pairs (x[2t], x[2t+1])
     * (GPT-J), 0: pairs (x[t], x[t + rotary_dim/2]) (GPT-NeoX, Llama). Q row i of sequence b is
     * rotated at position i + kv_len - q_len as it is packed (dot and cosine scores only); in
     * simd_attn_forward_with_kvcache each new K row is rotated at the position it is written to.
     * Only the table rows a call reads must be finite (SIMD_ATTN_ERR_INVALID_ROPE otherwise). */
    const float *rope_cos;
    const float *rope_sin;
    size_t rope_len;
    size_t rotary_dim;
    int32_t rope_interleaved;
    int32_t rope_reserved; /* must be 0 */
    /* Read by simd_attn_forward_with_kvcache only (the other entries reject them set,
     * SIMD_ATTN_ERR_UNSUPPORTED). k_new / v_new: this step's rows in the cache's dtype,
     * [B, seq_new, Hkv, D] through their strides, or, with cu_seqlens_new (B + 1 offsets),
     * packed tokens [total, Hkv, D] (stride_batch unused; sequence b appends tokens
     * cu_seqlens_new[b] .. cu_seqlens_new[b+1], at most seq_new of them). Both NULL: no append.
     * cache_lens [B] (required): each sequence's keys already in the cache; the new rows land
     * at cache_lens[b] onwards, and attention runs over cache_lens[b] + its new rows. */
    simd_attn_tensor k_new;
    simd_attn_tensor v_new;
    size_t seq_new;
    const int32_t *cu_seqlens_new;
    size_t cu_seqlens_new_len;
    const int64_t *cache_lens;
    size_t cache_lens_len;
    /* Quantized K/V (appended; a descriptor up to cache_lens_len reads them as
     * SIMD_ATTN_SCALE_NONE). Key j of KV head hk, sequence b is read as factor * stored value
     * (int8 or fp8 codes with k.dtype = SIMD_ATTN_I8 / F8E4M3 / F8E5M2, the code decoded
     * exactly; any dtype may carry factors). The factor is
     * k_scale (SIMD_ATTN_SCALE_TENSOR), k_scales[hk] (HEAD, k_scales_len = Hkv), or (TOKEN)
     * k_scales[b * stride_batch + hk * stride_head + j * stride_seq] for tensors (with
     * cu_seqlens_k, token cu_seqlens_k[b] + j at stride_seq, stride_batch unused) and, with a
     * block table, k_scales[page * stride_batch + hk * stride_head + slot * stride_seq] through
     * the same table as k. Fields a kind does not read must be 0. Dot and general scores only;
     * the V factor of a key multiplies its softmax weight, and a factor of exactly 0 makes its
     * V row count for nothing (like a zero weight). The v_ fields likewise for V. */
    int32_t k_scale_kind;
    float k_scale;
    const float *k_scales;
    size_t k_scales_len;
    int64_t k_scale_stride_batch;
    int64_t k_scale_stride_head;
    int64_t k_scale_stride_seq;
    int32_t v_scale_kind;
    float v_scale;
    const float *v_scales;
    size_t v_scales_len;
    int64_t v_scale_stride_batch;
    int64_t v_scale_stride_head;
    int64_t v_scale_stride_seq;
    /* Per-token factors stored as IEEE binary16 (appended; a descriptor up to
     * v_scale_stride_seq reads them as NULL). With SIMD_ATTN_SCALE_TOKEN, exactly one of
     * k_scales (float) and k_scales_f16 is set; k_scales_len and the strides count its
     * elements either way, and each binary16 factor widens exactly. Other kinds: NULL. The
     * v_ field likewise for V. */
    const uint16_t *k_scales_f16;
    const uint16_t *v_scales_f16;
} simd_attn_desc;

/* One partial result for simd_attn_merge_partials: rows normalised over its keys, and their
 * LSE ([B, Hq, Sq] contiguous), as simd_attn_forward writes them with an lse buffer. */
typedef struct simd_attn_partial {
    simd_attn_tensor out; /* [B, Hq, Sq, Dv] */
    const float *lse;
    size_t lse_len;
} simd_attn_partial;

/* What a call ran on. */
typedef struct simd_attn_run_info {
    int32_t isa;                  /* SIMD_ATTN_ISA_* */
    int32_t specialised_head_dim; /* the compile-time head dim that ran; 0: the generic path,
                                     the portable path, the additive score (specialised on
                                     its attention dim instead) or an empty call */
    size_t threads;               /* workers that ran */
    int32_t decode;               /* 1: the decode path (split keys, merged) ran */
    int32_t reserved;             /* written as 0 */
} simd_attn_run_info;

/* Fills *desc with defaults (see simd_attn_desc). */
int simd_attn_desc_init(simd_attn_desc *desc);

/* Fused attention on the library's thread pool. threads: 0 = the default (every core, or
 * simd_attn_set_default_threads); isa: SIMD_ATTN_ISA_AUTO or a path; info may be NULL.
 * Results are bitwise identical for every thread count. */
int simd_attn_forward(const simd_attn_desc *desc, size_t threads, int32_t isa, simd_attn_run_info *info);

/* Appends k_new / v_new (if set) to the cache desc->k, desc->v (tensors or a paged pool, as
 * for simd_attn_forward) at each sequence's cache_lens, rotating new K rows by the rotary
 * tables if set, then attends over the cache (as flash_attn_with_kvcache). desc->k.data and
 * desc->v.data are WRITTEN: they must be writable and not overlap q, out, lse or the new rows.
 * Everything is validated before anything is written: on error the cache and the outputs are
 * untouched. kv_lens and cu_seqlens_k must be unset (cache_lens says it); no alignment or
 * coverage. */
int simd_attn_forward_with_kvcache(const simd_attn_desc *desc, size_t threads, int32_t isa, simd_attn_run_info *info);

/* The library's f64 reference for the same descriptor (slow; for tests), rounded once into
 * out and lse. */
int simd_attn_reference(const simd_attn_desc *desc);

/* ---- host-driven execution: the engine's own threads run the call ---- */
typedef struct simd_attn_plan simd_attn_plan;

/* Validates and plans a call for nth workers; *plan_out receives the plan (NULL on error).
 * Every buffer desc points to must stay valid until simd_attn_plan_destroy; desc itself may
 * be freed. */
int simd_attn_plan_create(const simd_attn_desc *desc, size_t nth, int32_t isa, simd_attn_plan **plan_out);
/* Floats of workspace each worker passes to run and merge. */
size_t simd_attn_plan_workspace_len(const simd_attn_plan *plan);
/* 1: after every worker's run returned (the engine's barrier), each worker calls merge. */
int simd_attn_plan_needs_merge(const simd_attn_plan *plan);
/* Worker ith (0 <= ith < nth) runs its share, once, with its own workspace; no allocation,
 * no locks. info may be NULL. */
int simd_attn_plan_run(const simd_attn_plan *plan, size_t ith, float *workspace, size_t workspace_len, simd_attn_run_info *info);
/* Worker ith's share of the merge (a no-op when needs_merge is 0). */
int simd_attn_plan_merge(const simd_attn_plan *plan, size_t ith, float *workspace, size_t workspace_len);
/* Frees the plan (NULL: no-op). */
void simd_attn_plan_destroy(simd_attn_plan *plan);

/* out = exact attention over the union of the parts' (disjoint) key sets, from each part's
 * normalised output and LSE (e.g. KV shards on other devices). lse (optional, [B, Hq, Sq])
 * receives the combined LSE. Parts combine in the order given: the result does not depend on
 * scheduling. All parts share one dtype. */
int simd_attn_merge_partials(size_t batch, size_t q_heads, size_t seq_q, size_t v_head_dim,
                             const simd_attn_partial *parts, size_t n_parts,
                             const simd_attn_output *out, float *lse, size_t lse_len);

/* ---- instruction sets ---- */
int32_t simd_attn_isa_best(void);          /* the fastest path this machine has */
int32_t simd_attn_isa_current(void);       /* what SIMD_ATTN_ISA_AUTO resolves to now, or a
                                              negative status (-SIMD_ATTN_ERR_UNKNOWN_ISA when
                                              the environment variable is invalid) */
int simd_attn_isa_available(int32_t isa);  /* 1 if the path can run here, else 0 */
int simd_attn_set_isa(int32_t isa);        /* process-wide override; SIMD_ATTN_ISA_AUTO clears */
const char *simd_attn_isa_name(int32_t isa); /* "avx512", ...; NULL for unknown values */

/* Thread count of forward calls that pass threads = 0 (0 restores every core). */
void simd_attn_set_default_threads(size_t threads);

/* ---- version and errors ---- */
const char *simd_attn_version(void);       /* crate version, e.g. "0.1.0" */
uint32_t simd_attn_abi_version(void);      /* SIMD_ATTN_ABI_VERSION of the library */
const char *simd_attn_status_string(int status); /* one-line message; never NULL */
const char *simd_attn_status_name(int status);   /* "SIMD_ATTN_ERR_..."; NULL if unknown */
const char *simd_attn_last_error(void);    /* details of this thread's last failed call */

/* The library's struct sizes and field offsets in SIMD_ATTN_ABI_LAYOUT's order: writes up to
 * cap values to out and returns how many there are. Tests compare it with the header's. */
size_t simd_attn_abi_layout(size_t *out, size_t cap);

#define SIMD_ATTN_ABI_LAYOUT                                                                   \
    {                                                                                          \
        sizeof(simd_attn_tensor), offsetof(simd_attn_tensor, data),                            \
            offsetof(simd_attn_tensor, len), offsetof(simd_attn_tensor, dtype),                \
            offsetof(simd_attn_tensor, stride_batch), offsetof(simd_attn_tensor, stride_head), \
            offsetof(simd_attn_tensor, stride_seq), sizeof(simd_attn_output),                  \
            sizeof(simd_attn_desc), offsetof(simd_attn_desc, struct_size),                     \
            offsetof(simd_attn_desc, abi_version), offsetof(simd_attn_desc, batch),            \
            offsetof(simd_attn_desc, q_heads), offsetof(simd_attn_desc, kv_heads),             \
            offsetof(simd_attn_desc, seq_q), offsetof(simd_attn_desc, seq_kv),                 \
            offsetof(simd_attn_desc, head_dim), offsetof(simd_attn_desc, v_head_dim),          \
            offsetof(simd_attn_desc, q), offsetof(simd_attn_desc, k),                          \
            offsetof(simd_attn_desc, v), offsetof(simd_attn_desc, out),                        \
            offsetof(simd_attn_desc, lse), offsetof(simd_attn_desc, lse_len),                  \
            offsetof(simd_attn_desc, use_scale), offsetof(simd_attn_desc, scale),              \
            offsetof(simd_attn_desc, causal), offsetof(simd_attn_desc, softcap),               \
            offsetof(simd_attn_desc, window_left), offsetof(simd_attn_desc, window_right),     \
            offsetof(simd_attn_desc, kv_lens), offsetof(simd_attn_desc, kv_lens_len),          \
            offsetof(simd_attn_desc, bias), offsetof(simd_attn_desc, bias_len),                \
            offsetof(simd_attn_desc, bias_stride_batch),                                       \
            offsetof(simd_attn_desc, bias_stride_head),                                        \
            offsetof(simd_attn_desc, bias_stride_row), offsetof(simd_attn_desc, alibi_slopes), \
            offsetof(simd_attn_desc, alibi_slopes_len), offsetof(simd_attn_desc, sinks),       \
            offsetof(simd_attn_desc, sinks_len), sizeof(simd_attn_partial),                    \
            offsetof(simd_attn_partial, out), offsetof(simd_attn_partial, lse),                \
            offsetof(simd_attn_partial, lse_len), sizeof(simd_attn_run_info),                  \
            offsetof(simd_attn_run_info, isa),                                                 \
            offsetof(simd_attn_run_info, specialised_head_dim),                                \
            offsetof(simd_attn_run_info, threads), offsetof(simd_attn_run_info, decode),       \
            offsetof(simd_attn_desc, score),\
            offsetof(simd_attn_desc, temperature),\
            offsetof(simd_attn_desc, q_dim),\
            offsetof(simd_attn_desc, score_w),\
            offsetof(simd_attn_desc, score_w_len),\
            offsetof(simd_attn_desc, additive_v),\
            offsetof(simd_attn_desc, additive_v_len),\
            offsetof(simd_attn_desc, additive_w_q),\
            offsetof(simd_attn_desc, additive_w_q_len),\
            offsetof(simd_attn_desc, additive_w_k),\
            offsetof(simd_attn_desc, additive_w_k_len),\
            offsetof(simd_attn_desc, alignment),\
            offsetof(simd_attn_desc, alignment_len),\
            offsetof(simd_attn_desc, coverage),\
            offsetof(simd_attn_desc, coverage_len),\
            offsetof(simd_attn_desc, block_table),\
            offsetof(simd_attn_desc, block_table_len),\
            offsetof(simd_attn_desc, pages_per_seq),\
            offsetof(simd_attn_desc, page_size),\
            offsetof(simd_attn_desc, num_pages),\
            offsetof(simd_attn_desc, cu_seqlens_q),\
            offsetof(simd_attn_desc, cu_seqlens_q_len),\
            offsetof(simd_attn_desc, cu_seqlens_k),\
            offsetof(simd_attn_desc, cu_seqlens_k_len),\
            offsetof(simd_attn_desc, rope_cos),\
            offsetof(simd_attn_desc, rope_sin),\
            offsetof(simd_attn_desc, rope_len),\
            offsetof(simd_attn_desc, rotary_dim),\
            offsetof(simd_attn_desc, rope_interleaved),\
            offsetof(simd_attn_desc, rope_reserved),\
            offsetof(simd_attn_desc, k_new),\
            offsetof(simd_attn_desc, v_new),\
            offsetof(simd_attn_desc, seq_new),\
            offsetof(simd_attn_desc, cu_seqlens_new),\
            offsetof(simd_attn_desc, cu_seqlens_new_len),\
            offsetof(simd_attn_desc, cache_lens),\
            offsetof(simd_attn_desc, cache_lens_len),\
            offsetof(simd_attn_desc, k_scale_kind),\
            offsetof(simd_attn_desc, k_scale),\
            offsetof(simd_attn_desc, k_scales),\
            offsetof(simd_attn_desc, k_scales_len),\
            offsetof(simd_attn_desc, k_scale_stride_batch),\
            offsetof(simd_attn_desc, k_scale_stride_head),\
            offsetof(simd_attn_desc, k_scale_stride_seq),\
            offsetof(simd_attn_desc, v_scale_kind),\
            offsetof(simd_attn_desc, v_scale),\
            offsetof(simd_attn_desc, v_scales),\
            offsetof(simd_attn_desc, v_scales_len),\
            offsetof(simd_attn_desc, v_scale_stride_batch),\
            offsetof(simd_attn_desc, v_scale_stride_head),\
            offsetof(simd_attn_desc, v_scale_stride_seq),\
            offsetof(simd_attn_desc, k_scales_f16),\
            offsetof(simd_attn_desc, v_scales_f16)\
    }

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* SIMD_ATTN_H */

/*
 * The C ABI, tested from C: header/library agreement, forward against the library's f64
 * reference (every dtype mix, every option), host-driven plans from several pthreads, the
 * partial merge, concurrent calls, and every error path (with the outputs left untouched).
 *
 * Built and run by tests/capi.rs (dynamic and static linking). Run it under valgrind with
 * SIMD_ATTN_ISA=avx2 (valgrind cannot decode AVX-512); then only that path is exercised.
 * Exit status 0 means every check passed.
 */
#include "simd_attn.h"

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

static const char *name_of(int s) {
    const char *n = simd_attn_status_name(s);
    return n ? n : "(unknown)";
}

#define EXPECT_STATUS(call, want)                                                          \
    do {                                                                                   \
        int s_ = (call);                                                                   \
        CHECK(s_ == (want), "%s returned %s, want %s (%s)", #call, name_of(s_),            \
              name_of(want), simd_attn_last_error());                                      \
        if (s_ != SIMD_ATTN_OK)                                                            \
            CHECK(strlen(simd_attn_last_error()) > 0, "%s: no error message", #call);     \
    } while (0)

/* ---- f16 bits <-> float (round to nearest even), so the test needs no compiler support ---- */
static uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, exp = (x >> 23) & 0xffu, man = x & 0x7fffffu;
    if (exp == 0xff) return (uint16_t)(sign | 0x7c00u | (man ? 0x200u : 0));
    int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7c00u);
    if (e <= 0) {
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - e);
        uint32_t half = man >> shift, rem = man & ((1u << shift) - 1), mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = ((uint32_t)e << 10) | (man >> 13), rem = man & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1))) half++;
    return (uint16_t)(sign | half);
}

static float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, x;
    if (exp == 0) {
        float f = (float)man * 5.9604644775390625e-8f; /* 2^-24 */
        return sign ? -f : f;
    }
    if (exp == 31) x = sign | 0x7f800000u | (man << 13);
    else x = sign | ((exp - 15 + 127) << 23) | (man << 13);
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* bf16 is the top half of a float: round to nearest even on the dropped half. */
static uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u); /* quiet NaN */
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static float bf16_to_f32(uint16_t h) {
    uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;
static float uniform(void) { /* in [-1, 1) */
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng >> 40) & 0xffffff) / 8388608.0f - 1.0f;
}

static size_t esize(int dtype) { return dtype == SIMD_ATTN_F32 ? 4 : 2; }

static void *alloc_filled(size_t n, int dtype) {
    void *p = malloc(n * esize(dtype) + 1);
    for (size_t i = 0; i < n; i++) {
        float x = uniform();
        if (dtype == SIMD_ATTN_F16) ((uint16_t *)p)[i] = f32_to_f16(x);
        else if (dtype == SIMD_ATTN_BF16) ((uint16_t *)p)[i] = f32_to_bf16(x);
        else ((float *)p)[i] = x;
    }
    return p;
}

static float get(const void *p, int dtype, size_t i) {
    if (dtype == SIMD_ATTN_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    if (dtype == SIMD_ATTN_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

/* A problem with contiguous [B, H, S, D] tensors it owns. */
typedef struct problem {
    simd_attn_desc d;
    void *q, *k, *v, *out;
    float *lse;
    float *bias, *slopes, *sinks;
    int64_t *kv_lens;
} problem;

static simd_attn_tensor tensor(const void *data, size_t h, size_t s, size_t dim, size_t batch, int dtype) {
    simd_attn_tensor t;
    memset(&t, 0, sizeof t);
    t.data = data;
    t.len = batch * h * s * dim;
    t.dtype = dtype;
    t.stride_batch = (int64_t)(h * s * dim);
    t.stride_head = (int64_t)(s * dim);
    t.stride_seq = (int64_t)dim;
    return t;
}

static simd_attn_output output(void *data, size_t h, size_t s, size_t dim, size_t batch, int dtype) {
    simd_attn_tensor t = tensor(data, h, s, dim, batch, dtype);
    simd_attn_output o;
    o.data = data;
    o.len = t.len;
    o.dtype = dtype;
    o.reserved = 0;
    o.stride_batch = t.stride_batch;
    o.stride_head = t.stride_head;
    o.stride_seq = t.stride_seq;
    return o;
}

static void make(problem *p, size_t b, size_t hq, size_t hkv, size_t sq, size_t skv, size_t dim, size_t dv,
                 int dq, int dkv, int dout) {
    memset(p, 0, sizeof *p);
    int s = simd_attn_desc_init(&p->d);
    CHECK(s == SIMD_ATTN_OK, "desc_init: %s", name_of(s));
    p->d.batch = b;
    p->d.q_heads = hq;
    p->d.kv_heads = hkv;
    p->d.seq_q = sq;
    p->d.seq_kv = skv;
    p->d.head_dim = dim;
    p->d.v_head_dim = dv;
    p->q = alloc_filled(b * hq * sq * dim, dq);
    p->k = alloc_filled(b * hkv * skv * dim, dkv);
    p->v = alloc_filled(b * hkv * skv * dv, dkv);
    p->out = calloc(b * hq * sq * dv + 1, 4);
    p->lse = calloc(b * hq * sq + 1, 4);
    p->d.q = tensor(p->q, hq, sq, dim, b, dq);
    p->d.k = tensor(p->k, hkv, skv, dim, b, dkv);
    p->d.v = tensor(p->v, hkv, skv, dv, b, dkv);
    p->d.out = output(p->out, hq, sq, dv, b, dout);
    p->d.lse = p->lse;
    p->d.lse_len = b * hq * sq;
}

static void release(problem *p) {
    free(p->q);
    free(p->k);
    free(p->v);
    free(p->out);
    free(p->lse);
    free(p->bias);
    free(p->slopes);
    free(p->sinks);
    free(p->kv_lens);
}

static size_t out_len(const problem *p) { return p->d.batch * p->d.q_heads * p->d.seq_q * p->d.v_head_dim; }
static size_t rows(const problem *p) { return p->d.batch * p->d.q_heads * p->d.seq_q; }

/* A copy of p's descriptor that writes into fresh buffers. */
static simd_attn_desc redirect(const problem *p, void **out, float **lse) {
    simd_attn_desc d = p->d;
    *out = calloc(out_len(p) + 1, 4);
    *lse = calloc(rows(p) + 1, 4);
    d.out.data = *out;
    d.lse = *lse;
    return d;
}

/* Forward against the reference: |out - ref| <= tol * (1 + |ref|), lse likewise. */
static void check_against_reference(const char *name, problem *p, int32_t isa, size_t threads) {
    void *ref_out;
    float *ref_lse;
    simd_attn_desc r = redirect(p, &ref_out, &ref_lse);
    EXPECT_STATUS(simd_attn_reference(&r), SIMD_ATTN_OK);
    simd_attn_run_info info;
    memset(&info, 0xff, sizeof info);
    EXPECT_STATUS(simd_attn_forward(&p->d, threads, isa, &info), SIMD_ATTN_OK);
    if (isa != SIMD_ATTN_ISA_AUTO) CHECK(info.isa == isa, "%s: ran on %d, asked %d", name, info.isa, isa);
    CHECK(info.threads >= 1, "%s: info.threads = %zu", name, info.threads);
    int dout = p->d.out.dtype;
    /* A 16-bit output is rounded by both sides: up to an ulp apart (2^-10 f16, 2^-7 bf16). */
    float tol = dout == SIMD_ATTN_F16 ? 2e-3f : dout == SIMD_ATTN_BF16 ? 1.6e-2f : 2e-5f * (float)(p->d.head_dim + 8);
    double worst = 0;
    for (size_t i = 0; i < out_len(p); i++) {
        float a = get(p->out, dout, i), e = get(ref_out, dout, i);
        double err = fabs((double)a - e) / (1.0 + fabs(e));
        if (!(err <= worst)) worst = err; /* NaN-safe */
    }
    CHECK(worst <= tol, "%s (isa %d): max out error %g > %g", name, isa, worst, tol);
    for (size_t i = 0; i < rows(p); i++) {
        float a = p->lse[i], e = ref_lse[i];
        if (isinf(e)) CHECK(a == e, "%s: lse[%zu] = %g, want %g", name, i, a, e);
        else CHECK(fabs(a - e) <= 1e-4 * (1 + fabs(e)), "%s: lse[%zu] = %g, want %g", name, i, a, e);
    }
    free(ref_out);
    free(ref_lse);
}

/* ---- the cases ---- */
typedef void (*case_fn)(problem *);

static void case_prefill_f32(problem *p) {
    make(p, 2, 4, 2, 7, 33, 64, 64, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    p->d.causal = 1;
}

static void case_f16_every_option(problem *p) {
    make(p, 2, 8, 2, 9, 40, 128, 128, SIMD_ATTN_F16, SIMD_ATTN_F16, SIMD_ATTN_F16);
    p->d.causal = 1;
    p->d.window_left = 8;
    p->d.window_right = 0;
    p->kv_lens = malloc(2 * sizeof(int64_t));
    p->kv_lens[0] = 20;
    p->kv_lens[1] = 40;
    p->d.kv_lens = p->kv_lens;
    p->d.kv_lens_len = 2;
    p->d.softcap = 30.0f;
    p->slopes = malloc(8 * sizeof(float));
    p->sinks = malloc(8 * sizeof(float));
    for (int h = 0; h < 8; h++) {
        p->slopes[h] = 0.05f * (float)(h + 1);
        p->sinks[h] = h % 3 == 0 ? -INFINITY : 0.5f * (float)h;
    }
    p->d.alibi_slopes = p->slopes;
    p->d.alibi_slopes_len = 8;
    p->d.sinks = p->sinks;
    p->d.sinks_len = 8;
    p->d.use_scale = 1;
    p->d.scale = 0.2f;
}

static void case_decode_f16_kv(problem *p) {
    make(p, 1, 8, 2, 1, 2500, 128, 128, SIMD_ATTN_F32, SIMD_ATTN_F16, SIMD_ATTN_F32);
}

static void case_bf16_causal_window(problem *p) {
    make(p, 2, 8, 2, 9, 40, 128, 128, SIMD_ATTN_BF16, SIMD_ATTN_BF16, SIMD_ATTN_BF16);
    p->d.causal = 1;
    p->d.window_left = 8;
    p->d.window_right = 0;
}

static void case_decode_bf16_kv(problem *p) {
    make(p, 1, 8, 2, 1, 2500, 128, 128, SIMD_ATTN_F32, SIMD_ATTN_BF16, SIMD_ATTN_F32);
}

static void case_masked_rows_bias(problem *p) {
    /* A [1, 1, Sq, Skv] mask broadcast over batch and heads; row 2 is fully masked. */
    make(p, 2, 2, 1, 5, 17, 32, 32, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F16);
    p->bias = malloc(5 * 17 * sizeof(float));
    for (size_t i = 0; i < 5 * 17; i++) p->bias[i] = (i / 17 == 2 || i % 5 == 1) ? -INFINITY : uniform();
    p->d.bias = p->bias;
    p->d.bias_len = 5 * 17;
    p->d.bias_stride_row = 17;
}

static void case_generic_head_dims(problem *p) {
    /* D=48, Dv=40: no specialisation, the generic path. */
    make(p, 1, 3, 3, 6, 29, 48, 40, SIMD_ATTN_F16, SIMD_ATTN_F32, SIMD_ATTN_F32);
}

static const struct {
    const char *name;
    case_fn make;
} cases[] = {
    {"prefill f32", case_prefill_f32},
    {"f16 with every option", case_f16_every_option},
    {"decode f16 kv", case_decode_f16_kv},
    {"bf16 causal window", case_bf16_causal_window},
    {"decode bf16 kv", case_decode_bf16_kv},
    {"masked rows via broadcast bias", case_masked_rows_bias},
    {"generic head dims", case_generic_head_dims},
};
#define N_CASES (sizeof cases / sizeof cases[0])

static void test_header_agrees_with_library(void) {
    size_t header[] = SIMD_ATTN_ABI_LAYOUT;
    size_t n_header = sizeof header / sizeof header[0];
    size_t lib[128];
    size_t n_lib = simd_attn_abi_layout(lib, 128);
    CHECK(n_lib == n_header, "the library reports %zu layout values, the header %zu", n_lib, n_header);
    for (size_t i = 0; i < n_header && i < n_lib; i++)
        CHECK(header[i] == lib[i], "layout value %zu: header %zu, library %zu", i, header[i], lib[i]);
    CHECK(simd_attn_abi_version() == SIMD_ATTN_ABI_VERSION, "abi version %u", simd_attn_abi_version());

#define CODE(x) {x, #x}
    static const struct {
        int code;
        const char *name;
    } codes[] = {
        CODE(SIMD_ATTN_OK), CODE(SIMD_ATTN_ERR_NULL_POINTER), CODE(SIMD_ATTN_ERR_MISALIGNED),
        CODE(SIMD_ATTN_ERR_DESC_SIZE), CODE(SIMD_ATTN_ERR_ABI_VERSION), CODE(SIMD_ATTN_ERR_UNKNOWN_DTYPE),
        CODE(SIMD_ATTN_ERR_UNSUPPORTED_DTYPES), CODE(SIMD_ATTN_ERR_NEGATIVE_STRIDE), CODE(SIMD_ATTN_ERR_ZERO_DIM),
        CODE(SIMD_ATTN_ERR_HEADS_NOT_DIVISIBLE), CODE(SIMD_ATTN_ERR_BUFFER_TOO_SMALL),
        CODE(SIMD_ATTN_ERR_SIZE_OVERFLOW), CODE(SIMD_ATTN_ERR_OVERLAPPING_OUTPUT), CODE(SIMD_ATTN_ERR_ALIASING),
        CODE(SIMD_ATTN_ERR_WRONG_LENGTH), CODE(SIMD_ATTN_ERR_KV_LEN_OUT_OF_RANGE),
        CODE(SIMD_ATTN_ERR_NON_FINITE_SCALE), CODE(SIMD_ATTN_ERR_INVALID_SOFTCAP),
        CODE(SIMD_ATTN_ERR_INVALID_WINDOW), CODE(SIMD_ATTN_ERR_INVALID_VALUE),
        CODE(SIMD_ATTN_ERR_SHARE_OUT_OF_RANGE), CODE(SIMD_ATTN_ERR_SHARE_ALREADY_RUN),
        CODE(SIMD_ATTN_ERR_SHARES_NOT_FINISHED), CODE(SIMD_ATTN_ERR_WORKSPACE_TOO_SMALL),
        CODE(SIMD_ATTN_ERR_OUT_OF_MEMORY), CODE(SIMD_ATTN_ERR_ISA_UNAVAILABLE), CODE(SIMD_ATTN_ERR_UNKNOWN_ISA),
        CODE(SIMD_ATTN_ERR_INTERNAL),     CODE(SIMD_ATTN_ERR_INVALID_SCORE), CODE(SIMD_ATTN_ERR_UNKNOWN_SCORE),
        CODE(SIMD_ATTN_ERR_UNSUPPORTED),  CODE(SIMD_ATTN_ERR_RESERVED), CODE(SIMD_ATTN_ERR_INVALID_PAGE),
        CODE(SIMD_ATTN_ERR_INVALID_SEQLENS),
        CODE(SIMD_ATTN_ERR_INVALID_ROPE),
    };
    size_t n_codes = sizeof codes / sizeof codes[0];
    for (size_t i = 0; i < n_codes; i++) {
        const char *lib_name = simd_attn_status_name(codes[i].code);
        CHECK(lib_name && strcmp(lib_name, codes[i].name) == 0, "status %d is %s in the header, %s in the library",
              codes[i].code, codes[i].name, lib_name ? lib_name : "(none)");
        CHECK(strlen(simd_attn_status_string(codes[i].code)) > 0, "no message for %s", codes[i].name);
    }
    CHECK(simd_attn_status_name((int)n_codes) == NULL, "the library has a status %zu the header lacks", n_codes);
    CHECK(strcmp(simd_attn_status_string(-5), "unknown status code") == 0, "unknown code message");
#ifdef SIMD_ATTN_EXPECTED_VERSION
    CHECK(strcmp(simd_attn_version(), SIMD_ATTN_EXPECTED_VERSION) == 0, "version %s", simd_attn_version());
#endif
}

static void test_isa_queries(void) {
    int32_t best = simd_attn_isa_best();
    CHECK(simd_attn_isa_available(best) == 1, "best isa %d not available", best);
    CHECK(simd_attn_isa_name(best) != NULL, "no name for %d", best);
    CHECK(simd_attn_isa_name(99) == NULL, "a name for isa 99");
    for (int32_t i = SIMD_ATTN_ISA_PORTABLE; i <= SIMD_ATTN_ISA_AVX512BF16; i++)
        CHECK(simd_attn_isa_name(i) != NULL, "no name for isa %d", i);
    CHECK(strcmp(simd_attn_isa_name(SIMD_ATTN_ISA_AVX512BF16), "avx512bf16") == 0, "avx512bf16 is named %s", simd_attn_isa_name(SIMD_ATTN_ISA_AVX512BF16));
    CHECK(simd_attn_isa_available(99) == 0, "isa 99 available");
    CHECK(simd_attn_isa_available(SIMD_ATTN_ISA_PORTABLE) == 1, "portable must always run");
    EXPECT_STATUS(simd_attn_set_isa(99), SIMD_ATTN_ERR_UNKNOWN_ISA);
    EXPECT_STATUS(simd_attn_set_isa(SIMD_ATTN_ISA_SCALAR), SIMD_ATTN_OK);
    CHECK(simd_attn_isa_current() == SIMD_ATTN_ISA_SCALAR, "override not applied: %d", simd_attn_isa_current());
    problem p;
    case_prefill_f32(&p);
    simd_attn_run_info info;
    EXPECT_STATUS(simd_attn_forward(&p.d, 1, SIMD_ATTN_ISA_AUTO, &info), SIMD_ATTN_OK);
    CHECK(info.isa == SIMD_ATTN_ISA_SCALAR, "forward ignored the override: ran on %d", info.isa);
    release(&p);
    EXPECT_STATUS(simd_attn_set_isa(SIMD_ATTN_ISA_AUTO), SIMD_ATTN_OK);
    CHECK(simd_attn_isa_current() >= 0, "current isa %d", simd_attn_isa_current());
}

/* ---- host-driven plans from pthreads ---- */
typedef struct worker {
    simd_attn_plan *plan;
    size_t ith;
    int run_status, merge_status;
    int phase; /* 0: run, 1: merge */
} worker;

static void *work(void *arg) {
    worker *w = (worker *)arg;
    size_t len = simd_attn_plan_workspace_len(w->plan);
    float *ws = (float *)malloc((len + 1) * sizeof(float));
    for (size_t i = 0; i < len; i++) ws[i] = NAN; /* scratch contents must not matter */
    if (w->phase == 0) w->run_status = simd_attn_plan_run(w->plan, w->ith, ws, len, NULL);
    else w->merge_status = simd_attn_plan_merge(w->plan, w->ith, ws, len);
    free(ws);
    return NULL;
}

static void run_threads(simd_attn_plan *plan, size_t nth, int phase, worker *ws) {
    pthread_t t[8];
    for (size_t i = 0; i < nth; i++) {
        ws[i].plan = plan;
        ws[i].ith = i;
        ws[i].phase = phase;
        pthread_create(&t[i], NULL, work, &ws[i]);
    }
    for (size_t i = 0; i < nth; i++) pthread_join(t[i], NULL);
}

static void test_host_driven(const char *name, problem *p, int expect_merge) {
    void *fwd_out;
    float *fwd_lse;
    simd_attn_desc f = redirect(p, &fwd_out, &fwd_lse);
    EXPECT_STATUS(simd_attn_forward(&f, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    size_t nth = 3;
    simd_attn_plan *plan = NULL;
    EXPECT_STATUS(simd_attn_plan_create(&p->d, nth, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_OK);
    if (!plan) return;
    /* The portable path (the baseline) always plans prefill: nothing to merge there. */
    if (simd_attn_isa_current() == SIMD_ATTN_ISA_PORTABLE) expect_merge = 0;
    CHECK(simd_attn_plan_needs_merge(plan) == expect_merge, "%s: needs_merge %d", name, simd_attn_plan_needs_merge(plan));
    worker ws[8];
    memset(ws, 0, sizeof ws);
    run_threads(plan, nth, 0, ws);
    for (size_t i = 0; i < nth; i++) CHECK(ws[i].run_status == SIMD_ATTN_OK, "%s: run %zu: %s", name, i, name_of(ws[i].run_status));
    run_threads(plan, nth, 1, ws);
    for (size_t i = 0; i < nth; i++)
        CHECK(ws[i].merge_status == SIMD_ATTN_OK, "%s: merge %zu: %s", name, i, name_of(ws[i].merge_status));
    simd_attn_plan_destroy(plan);
    CHECK(memcmp(p->out, fwd_out, out_len(p) * esize(p->d.out.dtype)) == 0, "%s: host-driven output differs from forward", name);
    CHECK(memcmp(p->lse, fwd_lse, rows(p) * 4) == 0, "%s: host-driven lse differs from forward", name);
    free(fwd_out);
    free(fwd_lse);
}

/* ---- concurrent forward calls ---- */
typedef struct concurrent {
    simd_attn_desc d;
    int status;
} concurrent;

static void *forward_thread(void *arg) {
    concurrent *c = (concurrent *)arg;
    c->status = simd_attn_forward(&c->d, 2, SIMD_ATTN_ISA_AUTO, NULL);
    return NULL;
}

static void test_concurrent_forward(void) {
    problem p;
    case_decode_f16_kv(&p);
    EXPECT_STATUS(simd_attn_forward(&p.d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    concurrent c[4];
    void *outs[4];
    float *lses[4];
    pthread_t t[4];
    for (int i = 0; i < 4; i++) {
        c[i].d = redirect(&p, &outs[i], &lses[i]);
        pthread_create(&t[i], NULL, forward_thread, &c[i]);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(t[i], NULL);
        CHECK(c[i].status == SIMD_ATTN_OK, "concurrent forward %d: %s", i, name_of(c[i].status));
        CHECK(memcmp(outs[i], p.out, out_len(&p) * 4) == 0, "concurrent forward %d differs", i);
        free(outs[i]);
        free(lses[i]);
    }
    release(&p);
}

/* ---- merge of partial results over a split of the keys ---- */
static void test_merge(void) {
    problem p;
    make(&p, 2, 4, 2, 3, 300, 64, 64, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_forward(&p.d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    size_t split = 111, n = out_len(&p), r = rows(&p);
    simd_attn_desc a = p.d, b = p.d;
    float *out_a = calloc(n, 4), *out_b = calloc(n, 4), *lse_a = calloc(r, 4), *lse_b = calloc(r, 4);
    a.seq_kv = split;
    a.out.data = out_a;
    a.lse = lse_a;
    b.seq_kv = p.d.seq_kv - split; /* keys split.. : the same tensors, shifted by `split` rows */
    b.k.data = (const float *)p.k + split * 64;
    b.k.len -= split * 64;
    b.v.data = (const float *)p.v + split * 64;
    b.v.len -= split * 64;
    b.out.data = out_b;
    b.lse = lse_b;
    EXPECT_STATUS(simd_attn_forward(&a, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_forward(&b, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    simd_attn_partial parts[2];
    memset(parts, 0, sizeof parts);
    parts[0].out = tensor(out_a, 4, 3, 64, 2, SIMD_ATTN_F32);
    parts[0].lse = lse_a;
    parts[0].lse_len = r;
    parts[1].out = tensor(out_b, 4, 3, 64, 2, SIMD_ATTN_F32);
    parts[1].lse = lse_b;
    parts[1].lse_len = r;
    float *merged = calloc(n, 4), *merged_lse = calloc(r, 4);
    simd_attn_output mo = output(merged, 4, 3, 64, 2, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, parts, 2, &mo, merged_lse, r), SIMD_ATTN_OK);
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)merged[i] - ((float *)p.out)[i]);
        if (!(e <= worst)) worst = e;
    }
    CHECK(worst <= 1e-5, "merge: max error %g against the unsplit call", worst);
    for (size_t i = 0; i < r; i++) CHECK(fabs(merged_lse[i] - p.lse[i]) <= 1e-5 * (1 + fabs(p.lse[i])), "merge lse[%zu]", i);

    /* Error paths of the merge. */
    simd_attn_output bad = mo;
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, parts, 2, NULL, NULL, 0), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, NULL, 2, &mo, NULL, 0), SIMD_ATTN_ERR_NULL_POINTER);
    bad.data = out_a;
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, parts, 2, &bad, NULL, 0), SIMD_ATTN_ERR_ALIASING);
    simd_attn_partial mixed[2];
    memcpy(mixed, parts, sizeof parts);
    mixed[1].out.dtype = SIMD_ATTN_F16;
    mixed[1].out.len /= 2;
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, mixed, 2, &mo, NULL, 0), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
    mixed[1] = parts[1];
    mixed[1].lse_len = r - 1;
    EXPECT_STATUS(simd_attn_merge_partials(2, 4, 3, 64, mixed, 2, &mo, NULL, 0), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    free(out_a);
    free(out_b);
    free(lse_a);
    free(lse_b);
    free(merged);
    free(merged_lse);
    release(&p);
}

/* ---- every error path: the right status, a message, outputs untouched ---- */
static problem base;

static void reset_outputs(void) {
    memset(base.out, 0x5a, out_len(&base) * 4);
    memset(base.lse, 0x5a, rows(&base) * 4);
}

static int outputs_untouched(void) {
    const unsigned char *o = (const unsigned char *)base.out, *l = (const unsigned char *)base.lse;
    for (size_t i = 0; i < out_len(&base) * 4; i++)
        if (o[i] != 0x5a) return 0;
    for (size_t i = 0; i < rows(&base) * 4; i++)
        if (l[i] != 0x5a) return 0;
    return 1;
}

#define EXPECT_FORWARD_ERROR(desc_expr, want)                                                    \
    do {                                                                                         \
        simd_attn_desc d_ = base.d;                                                              \
        desc_expr;                                                                               \
        reset_outputs();                                                                         \
        EXPECT_STATUS(simd_attn_forward(&d_, 1, SIMD_ATTN_ISA_AUTO, NULL), want);                \
        CHECK(outputs_untouched(), "%s: outputs were written on error", #desc_expr);             \
    } while (0)

static void test_errors(void) {
    make(&base, 2, 4, 2, 5, 20, 64, 64, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    float slopes[4] = {0.1f, 0.2f, 0.3f, 0.4f}, bad_sinks[4] = {0, NAN, 0, 0};
    int64_t neg_len[2] = {-1, 20}, big_len[2] = {21, 20};

    EXPECT_STATUS(simd_attn_forward(NULL, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_STATUS(simd_attn_desc_init(NULL), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_FORWARD_ERROR(d_.q.data = NULL, SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_FORWARD_ERROR(d_.out.data = NULL, SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_FORWARD_ERROR(d_.k.data = (const char *)base.k + 1, SIMD_ATTN_ERR_MISALIGNED);
    EXPECT_FORWARD_ERROR(d_.struct_size = 16, SIMD_ATTN_ERR_DESC_SIZE);
    EXPECT_FORWARD_ERROR(d_.abi_version = 99, SIMD_ATTN_ERR_ABI_VERSION);
    EXPECT_FORWARD_ERROR(d_.q.dtype = 7, SIMD_ATTN_ERR_UNKNOWN_DTYPE);
    EXPECT_FORWARD_ERROR(d_.out.dtype = -1, SIMD_ATTN_ERR_UNKNOWN_DTYPE);
    EXPECT_FORWARD_ERROR((d_.v.dtype = SIMD_ATTN_F16, d_.v.len /= 2), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
    EXPECT_FORWARD_ERROR(d_.k.stride_seq = -64, SIMD_ATTN_ERR_NEGATIVE_STRIDE);
    EXPECT_FORWARD_ERROR((d_.bias = slopes, d_.bias_len = 4, d_.bias_stride_row = -1), SIMD_ATTN_ERR_NEGATIVE_STRIDE);
    EXPECT_FORWARD_ERROR((d_.bias = slopes, d_.bias_len = 4), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    EXPECT_FORWARD_ERROR(d_.q.reserved = 1, SIMD_ATTN_ERR_RESERVED);
    EXPECT_FORWARD_ERROR(d_.v.reserved = -7, SIMD_ATTN_ERR_RESERVED);
    EXPECT_FORWARD_ERROR(d_.out.reserved = 2, SIMD_ATTN_ERR_RESERVED);
    {
        /* Bias entries are finite or -inf: NaN and +inf are rejected, wherever they sit. */
        static float bias_row[20];
        for (int i = 0; i < 20; i++) bias_row[i] = (i % 3) ? 0.0f : -INFINITY;
        bias_row[13] = INFINITY;
        EXPECT_FORWARD_ERROR((d_.bias = bias_row, d_.bias_len = 20), SIMD_ATTN_ERR_INVALID_VALUE);
        bias_row[13] = NAN;
        EXPECT_FORWARD_ERROR((d_.bias = bias_row, d_.bias_len = 20), SIMD_ATTN_ERR_INVALID_VALUE);
    }
    EXPECT_FORWARD_ERROR(d_.head_dim = 0, SIMD_ATTN_ERR_ZERO_DIM);
    EXPECT_FORWARD_ERROR(d_.kv_heads = 0, SIMD_ATTN_ERR_ZERO_DIM);
    EXPECT_FORWARD_ERROR(d_.kv_heads = 3, SIMD_ATTN_ERR_HEADS_NOT_DIVISIBLE);
    EXPECT_FORWARD_ERROR(d_.q.len -= 1, SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    EXPECT_FORWARD_ERROR(d_.v.stride_seq = 65, SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    EXPECT_FORWARD_ERROR(d_.lse_len = 3, SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    EXPECT_FORWARD_ERROR((d_.batch = SIZE_MAX / 2, d_.q.stride_batch = INT64_MAX / 2), SIMD_ATTN_ERR_SIZE_OVERFLOW);
    EXPECT_FORWARD_ERROR(d_.q.len = SIZE_MAX / 2, SIMD_ATTN_ERR_SIZE_OVERFLOW);
    EXPECT_FORWARD_ERROR(d_.out.stride_head = 0, SIMD_ATTN_ERR_OVERLAPPING_OUTPUT);
    EXPECT_FORWARD_ERROR((d_.out.data = (void *)base.q), SIMD_ATTN_ERR_ALIASING);
    EXPECT_FORWARD_ERROR((d_.lse = (float *)base.out + 3), SIMD_ATTN_ERR_ALIASING);
    EXPECT_FORWARD_ERROR((d_.alibi_slopes = slopes, d_.alibi_slopes_len = 3), SIMD_ATTN_ERR_WRONG_LENGTH);
    EXPECT_FORWARD_ERROR((d_.kv_lens = neg_len, d_.kv_lens_len = 1), SIMD_ATTN_ERR_KV_LEN_OUT_OF_RANGE);
    EXPECT_FORWARD_ERROR((d_.kv_lens = big_len, d_.kv_lens_len = 2), SIMD_ATTN_ERR_KV_LEN_OUT_OF_RANGE);
    EXPECT_FORWARD_ERROR((d_.kv_lens = big_len, d_.kv_lens_len = 1), SIMD_ATTN_ERR_WRONG_LENGTH);
    EXPECT_FORWARD_ERROR((d_.use_scale = 1, d_.scale = NAN), SIMD_ATTN_ERR_NON_FINITE_SCALE);
    EXPECT_FORWARD_ERROR(d_.softcap = -1.0f, SIMD_ATTN_ERR_INVALID_SOFTCAP);
    EXPECT_FORWARD_ERROR(d_.softcap = INFINITY, SIMD_ATTN_ERR_INVALID_SOFTCAP);
    EXPECT_FORWARD_ERROR(d_.window_left = -2, SIMD_ATTN_ERR_INVALID_WINDOW);
    EXPECT_FORWARD_ERROR((d_.sinks = bad_sinks, d_.sinks_len = 4), SIMD_ATTN_ERR_INVALID_VALUE);
    {
        simd_attn_desc d_ = base.d;
        reset_outputs();
        EXPECT_STATUS(simd_attn_forward(&d_, 1, 42, NULL), SIMD_ATTN_ERR_UNKNOWN_ISA);
        int32_t missing = simd_attn_isa_available(SIMD_ATTN_ISA_NEON) ? SIMD_ATTN_ISA_AVX2 : SIMD_ATTN_ISA_NEON;
        EXPECT_STATUS(simd_attn_forward(&d_, 1, missing, NULL), SIMD_ATTN_ERR_ISA_UNAVAILABLE);
        CHECK(outputs_untouched(), "isa errors wrote outputs");
    }
    {
        /* A newer caller's larger descriptor: fine if the fields we do not know are zero. */
        unsigned char big[sizeof(simd_attn_desc) + 16];
        memset(big, 0, sizeof big);
        simd_attn_desc d_ = base.d;
        d_.struct_size = (uint32_t)sizeof big;
        memcpy(big, &d_, sizeof d_);
        EXPECT_STATUS(simd_attn_forward((const simd_attn_desc *)(void *)big, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
        big[sizeof(simd_attn_desc) + 3] = 1;
        reset_outputs();
        EXPECT_STATUS(simd_attn_forward((const simd_attn_desc *)(void *)big, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_DESC_SIZE);
        CHECK(outputs_untouched(), "a rejected descriptor wrote outputs");
    }

    /* Plans. */
    simd_attn_plan *plan = (simd_attn_plan *)&base; /* must be overwritten with NULL on error */
    EXPECT_STATUS(simd_attn_plan_create(&base.d, 0, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_ERR_ZERO_DIM);
    CHECK(plan == NULL, "plan_out not cleared on error");
    EXPECT_STATUS(simd_attn_plan_create(&base.d, 2, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_STATUS(simd_attn_plan_create(&base.d, SIZE_MAX / 2, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_ERR_OUT_OF_MEMORY);
    EXPECT_STATUS(simd_attn_plan_run(NULL, 0, NULL, 0, NULL), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_STATUS(simd_attn_plan_merge(NULL, 0, NULL, 0), SIMD_ATTN_ERR_NULL_POINTER);
    CHECK(simd_attn_plan_workspace_len(NULL) == 0, "workspace_len(NULL)");
    CHECK(simd_attn_plan_needs_merge(NULL) == 0, "needs_merge(NULL)");
    simd_attn_plan_destroy(NULL);
    EXPECT_STATUS(simd_attn_plan_create(&base.d, 2, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_OK);
    size_t len = simd_attn_plan_workspace_len(plan);
    float *ws = (float *)calloc(len + 1, sizeof(float));
    EXPECT_STATUS(simd_attn_plan_run(plan, 2, ws, len, NULL), SIMD_ATTN_ERR_SHARE_OUT_OF_RANGE);
    EXPECT_STATUS(simd_attn_plan_run(plan, 0, ws, len - 1, NULL), SIMD_ATTN_ERR_WORKSPACE_TOO_SMALL);
    EXPECT_STATUS(simd_attn_plan_run(plan, 0, NULL, len, NULL), SIMD_ATTN_ERR_NULL_POINTER);
    EXPECT_STATUS(simd_attn_plan_run(plan, 0, ws, len, NULL), SIMD_ATTN_OK);
    /* A plan without a merge (prefill): merge is a no-op whenever it is called. */
    CHECK(simd_attn_plan_needs_merge(plan) == 0, "a prefill plan has no merge");
    EXPECT_STATUS(simd_attn_plan_merge(plan, 0, ws, len), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_plan_run(plan, 0, ws, len, NULL), SIMD_ATTN_ERR_SHARE_ALREADY_RUN);
    EXPECT_STATUS(simd_attn_plan_run(plan, 1, ws, len, NULL), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_plan_merge(plan, 1, ws, len), SIMD_ATTN_OK);
    simd_attn_plan_destroy(plan);
    free(ws);
    /* A decode plan splits the keys: its merge waits for every run and runs once per share. */
    problem dp;
    make(&dp, 1, 8, 2, 1, 4096, 64, 64, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    /* (Forced onto the portable path, which plans decode shapes as prefill, use the best.) */
    int32_t merging = simd_attn_isa_current() == SIMD_ATTN_ISA_PORTABLE ? simd_attn_isa_best() : SIMD_ATTN_ISA_AUTO;
    EXPECT_STATUS(simd_attn_plan_create(&dp.d, 2, merging, &plan), SIMD_ATTN_OK);
    CHECK(simd_attn_plan_needs_merge(plan) == 1, "a decode plan over 4096 keys merges");
    len = simd_attn_plan_workspace_len(plan);
    ws = (float *)calloc(len + 1, sizeof(float));
    EXPECT_STATUS(simd_attn_plan_run(plan, 0, ws, len, NULL), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_plan_merge(plan, 0, ws, len), SIMD_ATTN_ERR_SHARES_NOT_FINISHED);
    EXPECT_STATUS(simd_attn_plan_run(plan, 1, ws, len, NULL), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_plan_merge(plan, 0, ws, len), SIMD_ATTN_OK);
    EXPECT_STATUS(simd_attn_plan_merge(plan, 0, ws, len), SIMD_ATTN_ERR_SHARE_ALREADY_RUN);
    CHECK(strlen(simd_attn_last_error()) > 0, "message after an error");
    EXPECT_STATUS(simd_attn_plan_merge(plan, 1, ws, len), SIMD_ATTN_OK);
    CHECK(strlen(simd_attn_last_error()) == 0, "the message is cleared by a success");
    simd_attn_plan_destroy(plan);
    free(ws);
    release(&dp);
    release(&base);
}

/* ---- the classic scores, with the alignment matrix and coverage ---- */
static float *weights(size_t n, float scale) {
    float *w = malloc((n + 1) * sizeof(float));
    for (size_t i = 0; i < n; i++) w[i] = scale * uniform();
    return w;
}

/* Q with q_dim columns instead of head_dim (general and projected additive scores). */
static void widen_q(problem *p, size_t q_dim) {
    free(p->q);
    p->q = alloc_filled(p->d.batch * p->d.q_heads * p->d.seq_q * q_dim, p->d.q.dtype);
    p->d.q = tensor(p->q, p->d.q_heads, p->d.seq_q, q_dim, p->d.batch, p->d.q.dtype);
    p->d.q_dim = q_dim;
}

/* Forward against simd_attn_reference: output, lse, alignment and coverage. */
static void check_scored(const char *name, problem *p, int32_t isa, size_t threads) {
    size_t na = rows(p) * p->d.seq_kv, nc = p->d.batch * p->d.q_heads * p->d.seq_kv;
    float *al = calloc(na + 1, 4), *cov = calloc(nc + 1, 4), *al_ref = calloc(na + 1, 4), *cov_ref = calloc(nc + 1, 4);
    void *ref_out;
    float *ref_lse;
    simd_attn_desc r = redirect(p, &ref_out, &ref_lse);
    r.alignment = al_ref;
    r.alignment_len = na;
    r.coverage = cov_ref;
    r.coverage_len = nc;
    EXPECT_STATUS(simd_attn_reference(&r), SIMD_ATTN_OK);
    simd_attn_desc f = p->d;
    f.alignment = al;
    f.alignment_len = na;
    f.coverage = cov;
    f.coverage_len = nc;
    simd_attn_run_info info;
    EXPECT_STATUS(simd_attn_forward(&f, threads, isa, &info), SIMD_ATTN_OK);
    int dout = p->d.out.dtype;
    double tol = dout == SIMD_ATTN_F16 ? 2e-3 : 1e-4, worst = 0;
    for (size_t i = 0; i < out_len(p); i++) {
        double e = get(ref_out, dout, i), err = fabs(get(p->out, dout, i) - e) / (1.0 + fabs(e));
        if (!(err <= worst)) worst = err;
    }
    CHECK(worst <= tol, "%s (isa %d, %zu threads): max out error %g", name, isa, threads, worst);
    for (size_t i = 0; i < rows(p); i++) {
        if (isinf(ref_lse[i])) CHECK(p->lse[i] == ref_lse[i], "%s: lse[%zu] = %g, want -inf", name, i, p->lse[i]);
        else CHECK(fabs(p->lse[i] - ref_lse[i]) <= 1e-4 * (1 + fabs(ref_lse[i])), "%s: lse[%zu] = %g, want %g", name, i, p->lse[i], ref_lse[i]);
    }
    worst = 0;
    for (size_t i = 0; i < na; i++) {
        double err = fabs((double)al[i] - al_ref[i]);
        if (!(err <= worst)) worst = err;
        if (al_ref[i] == 0.0f) CHECK(al[i] == 0.0f, "%s: alignment[%zu] = %g for a masked key", name, i, al[i]);
    }
    CHECK(worst <= 1e-4, "%s (isa %d): max alignment error %g", name, isa, worst);
    worst = 0;
    for (size_t i = 0; i < nc; i++) {
        double err = fabs((double)cov[i] - cov_ref[i]) / (1.0 + cov_ref[i]);
        if (!(err <= worst)) worst = err;
    }
    CHECK(worst <= 1e-4, "%s (isa %d): max coverage error %g", name, isa, worst);
    free(ref_out);
    free(ref_lse);
    free(al);
    free(cov);
    free(al_ref);
    free(cov_ref);
}

static void test_classic_scores(const int32_t *isas, size_t n_isas) {
    for (size_t i = 0; i < n_isas; i++) {
        for (size_t threads = 1; threads <= 2; threads++) {
            problem p;
            make(&p, 2, 4, 2, 5, 37, 64, 64, SIMD_ATTN_F16, SIMD_ATTN_F16, SIMD_ATTN_F16);
            p.d.score = SIMD_ATTN_SCORE_COSINE;
            p.d.temperature = 3.0f;
            p.d.causal = 1;
            check_scored("cosine f16", &p, isas[i], threads);
            release(&p);

            make(&p, 1, 2, 1, 6, 29, 32, 24, SIMD_ATTN_F32, SIMD_ATTN_F16, SIMD_ATTN_F32);
            widen_q(&p, 24);
            float *w = weights(24 * 32, 0.2f);
            p.d.score = SIMD_ATTN_SCORE_GENERAL;
            p.d.score_w = w;
            p.d.score_w_len = 24 * 32;
            check_scored("general, q_dim 24", &p, isas[i], threads);
            release(&p);
            free(w);

            make(&p, 2, 2, 1, 7, 31, 48, 16, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
            widen_q(&p, 20);
            float *av = weights(64, 1.0f), *wq = weights(64 * 20, 0.3f), *wk = weights(64 * 48, 0.2f);
            p.d.score = SIMD_ATTN_SCORE_ADDITIVE;
            p.d.additive_v = av;
            p.d.additive_v_len = 64;
            p.d.additive_w_q = wq;
            p.d.additive_w_q_len = 64 * 20;
            p.d.additive_w_k = wk;
            p.d.additive_w_k_len = 64 * 48;
            p.d.causal = 1;
            check_scored("additive projected, A 64", &p, isas[i], threads);
            release(&p);
            free(av);
            free(wq);
            free(wk);

            make(&p, 2, 1, 1, 4, 9, 10, 8, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F16);
            float *v10 = weights(10, 1.0f);
            p.kv_lens = malloc(2 * sizeof(int64_t));
            p.kv_lens[0] = 0; /* every row of batch 0 fully masked */
            p.kv_lens[1] = 9;
            p.d.kv_lens = p.kv_lens;
            p.d.kv_lens_len = 2;
            p.d.score = SIMD_ATTN_SCORE_ADDITIVE;
            p.d.additive_v = v10;
            p.d.additive_v_len = 10;
            check_scored("additive pre-projected, masked rows", &p, isas[i], threads);
            release(&p);
            free(v10);
        }
    }

    /* Errors. */
    problem p;
    make(&p, 1, 2, 1, 3, 11, 16, 16, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    simd_attn_desc d = p.d;
    d.score = 9;
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNKNOWN_SCORE);
    d.score = SIMD_ATTN_SCORE_DOT;
    d.use_scale = 1;
    d.scale = 0.5f;
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_SCORE);
    d = p.d;
    d.score = SIMD_ATTN_SCORE_ADDITIVE; /* no v */
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_ZERO_DIM);
    d = p.d;
    d.score = SIMD_ATTN_SCORE_COSINE;
    simd_attn_plan *plan = NULL;
    EXPECT_STATUS(simd_attn_plan_create(&d, 2, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_ERR_UNSUPPORTED);
    float *al = calloc(3 * 2 * 11 + 1, 4);
    d = p.d;
    d.alignment = al;
    d.alignment_len = 2 * 3 * 11;
    EXPECT_STATUS(simd_attn_plan_create(&d, 2, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_ERR_UNSUPPORTED);
    d.alignment_len = 2 * 3 * 11 - 1;
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    d.alignment = (float *)p.q; /* the alignment output on top of Q */
    d.alignment_len = 2 * 3 * 11;
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_ALIASING);
    /* A descriptor from the header before the score fields: accepted, scaled dot. */
    d = p.d;
    d.struct_size = (uint32_t)offsetof(simd_attn_desc, score);
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    d.struct_size = (uint32_t)offsetof(simd_attn_desc, score) + 4;
    EXPECT_STATUS(simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_DESC_SIZE);
    free(al);
    release(&p);
}

/* Calls with no output row: an engine step with no new tokens (decode shapes, every path),
 * an empty batch with dims near the integer limits, and their host plans. */
static void test_empty_calls(const int32_t *isas, size_t n_isas) {
    size_t skv = 4096, d = 128;
    float *kv = calloc(2 * skv * d, 4), coverage[8 * 4096];
    simd_attn_desc e;
    simd_attn_desc_init(&e);
    e.batch = 1, e.q_heads = 8, e.kv_heads = 2, e.seq_q = 0, e.seq_kv = skv, e.head_dim = d;
    e.k = tensor(kv, 2, skv, d, 1, SIMD_ATTN_F32), e.v = e.k;
    e.causal = 1;
    for (size_t i = 0; i < n_isas; i++) {
        for (size_t threads = 1; threads <= 2; threads++) {
            simd_attn_run_info info;
            EXPECT_STATUS(simd_attn_forward(&e, threads, isas[i], &info), SIMD_ATTN_OK);
            simd_attn_desc c = e;
            for (size_t j = 0; j < 8 * skv; j++) coverage[j] = NAN;
            c.coverage = coverage, c.coverage_len = 8 * skv;
            EXPECT_STATUS(simd_attn_forward(&c, threads, isas[i], NULL), SIMD_ATTN_OK);
            int zeros = 1;
            for (size_t j = 0; j < 8 * skv; j++) zeros &= coverage[j] == 0.0f;
            CHECK(zeros, "coverage of an empty call is all zeros (isa %d)", (int)isas[i]);
            EXPECT_STATUS(simd_attn_reference(&c), SIMD_ATTN_OK);
        }
    }
    /* B = 0 with a v_head_dim of 2^62: nothing reaches any buffer; nothing is allocated. */
    simd_attn_desc z = e;
    z.batch = 0, z.seq_q = 1, z.v_head_dim = (size_t)1 << 62, z.k.len = 0, z.k.data = NULL, z.v = z.k;
    EXPECT_STATUS(simd_attn_forward(&z, 2, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    simd_attn_plan *plan = NULL;
    EXPECT_STATUS(simd_attn_plan_create(&z, 2, SIMD_ATTN_ISA_AUTO, &plan), SIMD_ATTN_OK);
    CHECK(simd_attn_plan_workspace_len(plan) == 0, "an empty plan needs no workspace, not %zu", simd_attn_plan_workspace_len(plan));
    for (size_t ith = 0; ith < 2; ith++) {
        EXPECT_STATUS(simd_attn_plan_merge(plan, ith, NULL, 0), SIMD_ATTN_OK); /* before the runs: a no-op */
        EXPECT_STATUS(simd_attn_plan_run(plan, ith, NULL, 0, NULL), SIMD_ATTN_OK);
    }
    simd_attn_plan_destroy(plan);
    /* merge_partials with an empty batch and a huge row width: nothing to do. */
    simd_attn_output mo = {NULL, 0, SIMD_ATTN_F32, 0, 0, 0, 0};
    EXPECT_STATUS(simd_attn_merge_partials(0, 1, 1, (size_t)1 << 36, NULL, 0, &mo, NULL, 0), SIMD_ATTN_OK);
    free(kv);
}

/* ---- paged K/V ---- */
/* The same problem with its K/V rows scattered into a pool of token-major pages ([pages,
 * page_size, Hkv, D], in reverse order, one spare page of NaN, NaN past each sequence's keys,
 * -1 past each sequence's last page): the same bits as [B, Skv, Hkv, D] tensors of the same
 * rows (the layout whose plan token-major pages share), from forward and from a host plan; the reference of the paged descriptor agrees; a bad page index is an error that
 * leaves the output alone; a descriptor from the header before the paged fields still works. */
static void check_paged(const char *name, problem *p, size_t ps, const int32_t *isas, size_t n_isas) {
    size_t b = p->d.batch, hkv = p->d.kv_heads, skv = p->d.seq_kv, d = p->d.head_dim, dv = p->d.v_head_dim;
    int dkv = p->d.k.dtype;
    size_t es = esize(dkv), pps = (skv + ps - 1) / ps, pages = b * pps + 1;
    size_t kpage = ps * hkv * d, vpage = ps * hkv * dv;
    unsigned char *kp = (unsigned char *)malloc(pages * kpage * es), *vp = (unsigned char *)malloc(pages * vpage * es);
    for (size_t i = 0; i < pages * kpage * es; i++) kp[i] = 0xff; /* NaN in f32 and f16 */
    for (size_t i = 0; i < pages * vpage * es; i++) vp[i] = 0xff;
    int32_t *table = (int32_t *)malloc(b * pps * sizeof *table);
    for (size_t bi = 0; bi < b; bi++) {
        size_t len = p->kv_lens ? (size_t)p->kv_lens[bi] : skv;
        for (size_t pg = 0; pg < pps; pg++) table[bi * pps + pg] = pg * ps < len ? (int32_t)(pages - 2 - (bi * pps + pg)) : -1;
        for (size_t j = 0; j < len; j++) {
            size_t page = (size_t)table[bi * pps + j / ps];
            for (size_t h = 0; h < hkv; h++) {
                memcpy(kp + ((page * ps + j % ps) * hkv + h) * d * es, (unsigned char *)p->k + (((bi * hkv + h) * skv + j) * d) * es, d * es);
                memcpy(vp + ((page * ps + j % ps) * hkv + h) * dv * es, (unsigned char *)p->v + (((bi * hkv + h) * skv + j) * dv) * es, dv * es);
            }
        }
    }
    /* The rows as [B, Skv, Hkv, D] tensors: the twin whose bits the pages must give. */
    unsigned char *kt = (unsigned char *)malloc(b * skv * hkv * d * es), *vt = (unsigned char *)malloc(b * skv * hkv * dv * es);
    for (size_t bi = 0; bi < b; bi++)
        for (size_t j = 0; j < skv; j++)
            for (size_t h = 0; h < hkv; h++) {
                memcpy(kt + ((bi * skv + j) * hkv + h) * d * es, (unsigned char *)p->k + (((bi * hkv + h) * skv + j) * d) * es, d * es);
                memcpy(vt + ((bi * skv + j) * hkv + h) * dv * es, (unsigned char *)p->v + (((bi * hkv + h) * skv + j) * dv) * es, dv * es);
            }
    simd_attn_tensor k_bshd = p->d.k, v_bshd = p->d.v;
    k_bshd.data = kt, k_bshd.stride_batch = (int64_t)(skv * hkv * d), k_bshd.stride_head = (int64_t)d, k_bshd.stride_seq = (int64_t)(hkv * d);
    v_bshd.data = vt, v_bshd.stride_batch = (int64_t)(skv * hkv * dv), v_bshd.stride_head = (int64_t)dv, v_bshd.stride_seq = (int64_t)(hkv * dv);
    simd_attn_desc paged = p->d;
    paged.k.data = kp;
    paged.k.len = pages * kpage;
    paged.k.stride_batch = (int64_t)kpage, paged.k.stride_head = (int64_t)d, paged.k.stride_seq = (int64_t)(hkv * d);
    paged.v.data = vp;
    paged.v.len = pages * vpage;
    paged.v.stride_batch = (int64_t)vpage, paged.v.stride_head = (int64_t)dv, paged.v.stride_seq = (int64_t)(hkv * dv);
    paged.block_table = table, paged.block_table_len = b * pps;
    paged.pages_per_seq = pps, paged.page_size = ps, paged.num_pages = pages;
    for (size_t i = 0; i < n_isas; i++) {
        void *want_out, *got_out;
        float *want_lse, *got_lse;
        simd_attn_desc w = redirect(p, &want_out, &want_lse);
        simd_attn_desc g = redirect(p, &got_out, &got_lse);
        w.k = k_bshd, w.v = v_bshd;
        g.k = paged.k, g.v = paged.v, g.block_table = table, g.block_table_len = b * pps;
        g.pages_per_seq = pps, g.page_size = ps, g.num_pages = pages;
        EXPECT_STATUS(simd_attn_forward(&w, 2, isas[i], NULL), SIMD_ATTN_OK);
        EXPECT_STATUS(simd_attn_forward(&g, 2, isas[i], NULL), SIMD_ATTN_OK);
        CHECK(memcmp(want_out, got_out, out_len(p) * esize(p->d.out.dtype)) == 0, "%s (isa %d): paged output differs", name, isas[i]);
        CHECK(memcmp(want_lse, got_lse, rows(p) * 4) == 0, "%s (isa %d): paged lse differs", name, isas[i]);
        /* A host plan on the pages. */
        memset(got_out, 0, out_len(p) * 4);
        simd_attn_plan *plan = NULL;
        EXPECT_STATUS(simd_attn_plan_create(&g, 3, isas[i], &plan), SIMD_ATTN_OK);
        if (plan) {
            worker ws[8];
            memset(ws, 0, sizeof ws);
            run_threads(plan, 3, 0, ws);
            run_threads(plan, 3, 1, ws);
            simd_attn_plan_destroy(plan);
            CHECK(memcmp(want_out, got_out, out_len(p) * esize(p->d.out.dtype)) == 0, "%s (isa %d): paged host plan differs", name, isas[i]);
        }
        /* The reference of the paged descriptor. */
        EXPECT_STATUS(simd_attn_reference(&g), SIMD_ATTN_OK);
        double worst = 0;
        for (size_t e = 0; e < out_len(p); e++) {
            double err = fabs((double)get(want_out, p->d.out.dtype, e) - get(got_out, p->d.out.dtype, e));
            if (!(err <= worst)) worst = err;
        }
        CHECK(worst <= 2e-5 * (double)(d + 8), "%s (isa %d): paged reference differs by %g", name, isas[i], worst);
        free(want_out), free(want_lse), free(got_out), free(got_lse);
    }
    /* A page index out of the pool, where a key lies: rejected, output untouched. */
    void *o;
    float *l;
    simd_attn_desc bad = redirect(p, &o, &l);
    bad.k = paged.k, bad.v = paged.v, bad.block_table = table, bad.block_table_len = b * pps;
    bad.pages_per_seq = pps, bad.page_size = ps, bad.num_pages = pages;
    int32_t saved = table[0];
    table[0] = (int32_t)pages;
    memset(o, 0x5a, out_len(p) * 4);
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_PAGE);
    int untouched = 1;
    for (size_t e = 0; e < out_len(p) * 4; e++) untouched &= ((unsigned char *)o)[e] == 0x5a;
    CHECK(untouched, "%s: output written on a bad page index", name);
    table[0] = saved;
    bad.num_pages = 0;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_PAGE);
    bad.num_pages = pages;
    bad.page_size = 0;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_ZERO_DIM);
    /* The header before the paged fields: the struct ends at coverage_len, K/V are tensors. */
    simd_attn_desc old = p->d;
    old.struct_size = (uint32_t)offsetof(simd_attn_desc, block_table);
    old.block_table = table; /* past struct_size: never read */
    EXPECT_STATUS(simd_attn_forward(&old, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    free(o), free(l), free(kp), free(vp), free(kt), free(vt), free(table);
}

static void test_paged(const int32_t *isas, size_t n_isas) {
    problem p;
    make(&p, 2, 8, 2, 1, 700, 128, 128, SIMD_ATTN_F32, SIMD_ATTN_F16, SIMD_ATTN_F32);
    p.kv_lens = (int64_t *)malloc(2 * sizeof(int64_t));
    p.kv_lens[0] = 700, p.kv_lens[1] = 333;
    p.d.kv_lens = p.kv_lens, p.d.kv_lens_len = 2;
    check_paged("paged decode", &p, 16, isas, n_isas);
    release(&p);
    make(&p, 1, 8, 2, 1, 500, 128, 128, SIMD_ATTN_F32, SIMD_ATTN_BF16, SIMD_ATTN_F32);
    check_paged("paged decode bf16", &p, 16, isas, n_isas);
    release(&p);
    make(&p, 2, 4, 2, 37, 300, 64, 64, SIMD_ATTN_F32, SIMD_ATTN_F32, SIMD_ATTN_F32);
    p.d.causal = 1;
    check_paged("paged prefill", &p, 7, isas, n_isas);
    release(&p);
}

/* ---- packed variable-length sequences ---- */
/* Three packed sequences (q rows 5, 0, 3 against 9, 4, 0 keys: an empty query sequence and a
 * sequence with no keys) in token-major buffers with a lead token before the first: forward
 * on every path and with 1 and 2 threads agrees with the reference of the same descriptor,
 * a host plan writes the same bits as forward, nothing outside the packed rows is written,
 * a decreasing cu_seqlens is rejected with the output untouched, and a descriptor from the
 * header before these fields ignores them. */
static void test_varlen(const int32_t *isas, size_t n_isas) {
    enum { B = 3, HQ = 4, HKV = 2, D = 32 };
    const int32_t cu_q[B + 1] = {1, 6, 6, 9}, cu_k[B + 1] = {1, 10, 14, 14};
    size_t tq = 9, tk = 14, q_len = tq * HQ * D, kv_len = tk * HKV * D;
    float *q = (float *)alloc_filled(q_len, SIMD_ATTN_F32);
    float *k = (float *)alloc_filled(kv_len, SIMD_ATTN_F32), *v = (float *)alloc_filled(kv_len, SIMD_ATTN_F32);
    simd_attn_desc d;
    simd_attn_desc_init(&d);
    d.batch = B, d.q_heads = HQ, d.kv_heads = HKV, d.seq_q = 5, d.seq_kv = 9, d.head_dim = D;
    d.causal = 1;
    d.q.data = q, d.q.len = q_len, d.q.stride_head = D, d.q.stride_seq = HQ * D;
    d.k.data = k, d.k.len = kv_len, d.k.stride_head = D, d.k.stride_seq = HKV * D;
    d.v = d.k;
    d.v.data = v;
    d.out.len = q_len, d.out.stride_head = D, d.out.stride_seq = HQ * D;
    d.lse_len = HQ * tq;
    d.cu_seqlens_q = cu_q, d.cu_seqlens_q_len = B + 1;
    d.cu_seqlens_k = cu_k, d.cu_seqlens_k_len = B + 1;
    float *ref = (float *)malloc(q_len * 4), *ref_lse = (float *)malloc(HQ * tq * 4);
    float *out = (float *)malloc(q_len * 4), *lse = (float *)malloc(HQ * tq * 4);
    for (size_t e = 0; e < q_len; e++) ref[e] = 555.0f;
    simd_attn_desc r = d;
    r.out.data = ref, r.lse = ref_lse;
    EXPECT_STATUS(simd_attn_reference(&r), SIMD_ATTN_OK);
    for (size_t e = 0; e < HQ * D; e++) CHECK(ref[e] == 555.0f, "varlen reference wrote the lead token");
    for (size_t i = 0; i < n_isas; i++) {
        for (size_t threads = 1; threads <= 2; threads++) {
            for (size_t e = 0; e < q_len; e++) out[e] = 555.0f;
            simd_attn_desc g = d;
            g.out.data = out, g.lse = lse;
            EXPECT_STATUS(simd_attn_forward(&g, threads, isas[i], NULL), SIMD_ATTN_OK);
            double worst = 0;
            for (size_t e = 0; e < q_len; e++) {
                double err = e < HQ * D ? (out[e] == 555.0f ? 0 : 1) : fabs((double)out[e] - ref[e]);
                if (!(err <= worst)) worst = err;
            }
            CHECK(worst <= 2e-5 * (D + 8), "varlen (isa %d, %zu threads): max error %g", isas[i], threads, worst);
            for (size_t e = 0; e < HQ * tq; e++) {
                size_t t = e % tq;
                if (t == 0) continue; /* the lead token has no row */
                CHECK(isinf(ref_lse[e]) ? lse[e] == ref_lse[e] : fabs(lse[e] - ref_lse[e]) <= 1e-4 * (1 + fabs(ref_lse[e])), "varlen lse[%zu] = %g, want %g", e, lse[e], ref_lse[e]);
            }
            if (threads == 2) {
                float *plan_out = (float *)malloc(q_len * 4);
                for (size_t e = 0; e < q_len; e++) plan_out[e] = 555.0f;
                simd_attn_desc h = g;
                h.out.data = plan_out, h.lse = NULL, h.lse_len = 0;
                simd_attn_plan *plan = NULL;
                EXPECT_STATUS(simd_attn_plan_create(&h, 3, isas[i], &plan), SIMD_ATTN_OK);
                if (plan) {
                    worker ws[8];
                    memset(ws, 0, sizeof ws);
                    run_threads(plan, 3, 0, ws);
                    run_threads(plan, 3, 1, ws);
                    simd_attn_plan_destroy(plan);
                    CHECK(memcmp(plan_out, out, q_len * 4) == 0, "varlen host plan (isa %d) differs from forward", isas[i]);
                }
                free(plan_out);
            }
        }
    }
    /* A decreasing cu_seqlens_q: rejected before anything runs. */
    const int32_t bad_cu[B + 1] = {0, 5, 4, 9};
    simd_attn_desc bad = d;
    for (size_t e = 0; e < q_len; e++) out[e] = 555.0f;
    bad.out.data = out, bad.lse = lse;
    bad.cu_seqlens_q = bad_cu;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_SEQLENS);
    int untouched = 1;
    for (size_t e = 0; e < q_len; e++) untouched &= out[e] == 555.0f;
    CHECK(untouched, "varlen: output written on a bad cu_seqlens_q");
    /* Packed queries refuse a bias. */
    float bias[9] = {0};
    bad.cu_seqlens_q = cu_q, bad.bias = bias, bad.bias_len = 9;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED);
    /* The header before these fields: struct_size ends at num_pages, cu_seqlens never read
     * (the same buffers are then one padded batch of 1). */
    simd_attn_desc old = d;
    old.struct_size = (uint32_t)offsetof(simd_attn_desc, cu_seqlens_q);
    old.batch = 1, old.seq_q = 9, old.seq_kv = 14, old.lse = NULL, old.lse_len = 0;
    old.q.stride_batch = old.k.stride_batch = old.v.stride_batch = old.out.stride_batch = 0;
    old.out.data = out;
    EXPECT_STATUS(simd_attn_forward(&old, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    free(q), free(k), free(v), free(ref), free(ref_lse), free(out), free(lse);
}

/* ---- appending to the cache with RoPE ---- */
/* Chunked prefill on a [B, S, Hkv, D] cache holding 5 and 9 keys: sequence 0 appends 3 packed
 * rows, sequence 1 one, Q packed the same way, RoPE (half-split) on Q and the new keys. The
 * new V rows land at the cache lengths, the output matches the reference of the appended
 * cache with the same tables, simd_attn_forward refuses the append fields, and a call whose
 * rows would pass the capacity writes nothing. */
static void test_kvcache(const int32_t *isas, size_t n_isas) {
    enum { B = 2, HQ = 4, HKV = 2, D = 16, S = 32, HALF = D / 2 };
    const int32_t cu[B + 1] = {0, 3, 4};
    const int64_t cache_lens[B] = {5, 9};
    const int64_t kv_lens[B] = {8, 10};
    size_t tokens = 4, cache_len = B * S * HKV * D, new_len = tokens * HKV * D, q_len = tokens * HQ * D;
    float *k0 = (float *)alloc_filled(cache_len, SIMD_ATTN_F32), *v0 = (float *)alloc_filled(cache_len, SIMD_ATTN_F32);
    float *kn = (float *)alloc_filled(new_len, SIMD_ATTN_F32), *vn = (float *)alloc_filled(new_len, SIMD_ATTN_F32);
    float *q = (float *)alloc_filled(q_len, SIMD_ATTN_F32);
    float cos_t[S * HALF], sin_t[S * HALF];
    for (int p = 0; p < S; p++)
        for (int t = 0; t < HALF; t++) {
            double angle = p * pow(10000.0, -2.0 * t / D);
            cos_t[p * HALF + t] = (float)cos(angle), sin_t[p * HALF + t] = (float)sin(angle);
        }
    float *k = (float *)malloc(cache_len * 4), *v = (float *)malloc(cache_len * 4);
    float *out = (float *)malloc(q_len * 4), *ref = (float *)malloc(q_len * 4);
    simd_attn_desc d;
    simd_attn_desc_init(&d);
    d.batch = B, d.q_heads = HQ, d.kv_heads = HKV, d.seq_q = 3, d.seq_kv = S, d.head_dim = D;
    d.causal = 1;
    d.q.data = q, d.q.len = q_len, d.q.stride_head = D, d.q.stride_seq = HQ * D;
    d.k.data = k, d.k.len = cache_len, d.k.stride_batch = S * HKV * D, d.k.stride_head = D, d.k.stride_seq = HKV * D;
    d.v = d.k;
    d.v.data = v;
    d.out.data = out, d.out.len = q_len, d.out.stride_head = D, d.out.stride_seq = HQ * D;
    d.cu_seqlens_q = cu, d.cu_seqlens_q_len = B + 1;
    d.rope_cos = cos_t, d.rope_sin = sin_t, d.rope_len = S * HALF, d.rotary_dim = D;
    simd_attn_desc a = d;
    a.k_new.data = kn, a.k_new.len = new_len, a.k_new.stride_head = D, a.k_new.stride_seq = HKV * D;
    a.v_new = a.k_new;
    a.v_new.data = vn;
    a.seq_new = 3, a.cu_seqlens_new = cu, a.cu_seqlens_new_len = B + 1;
    a.cache_lens = cache_lens, a.cache_lens_len = B;
    for (size_t i = 0; i < n_isas; i++) {
        memcpy(k, k0, cache_len * 4), memcpy(v, v0, cache_len * 4);
        EXPECT_STATUS(simd_attn_forward_with_kvcache(&a, 2, isas[i], NULL), SIMD_ATTN_OK);
        int copied = 1;
        for (int b = 0; b < B; b++)
            for (int t = cu[b]; t < cu[b + 1]; t++)
                for (int h = 0; h < HKV; h++)
                    copied &= memcmp(v + b * S * HKV * D + (cache_lens[b] + t - cu[b]) * HKV * D + h * D, vn + t * HKV * D + h * D, D * 4) == 0;
        CHECK(copied, "kvcache (isa %d): new V rows not at the cache lengths", isas[i]);
        /* The reference on the appended cache: the same tables rotate Q; kv_lens say the keys. */
        simd_attn_desc r = d;
        r.out.data = ref, r.kv_lens = kv_lens, r.kv_lens_len = B;
        EXPECT_STATUS(simd_attn_reference(&r), SIMD_ATTN_OK);
        double worst = 0;
        for (size_t e = 0; e < q_len; e++) {
            double err = fabs((double)out[e] - ref[e]);
            if (!(err <= worst)) worst = err;
        }
        CHECK(worst <= 2e-5 * (D + 8), "kvcache (isa %d): max error %g", isas[i], worst);
    }
    /* The new K rows, rotated at their positions. */
    double worst_k = 0;
    for (int b = 0; b < B; b++)
        for (int t = cu[b]; t < cu[b + 1]; t++)
            for (int h = 0; h < HKV; h++) {
                int pos = (int)cache_lens[b] + t - cu[b];
                const float *x = kn + t * HKV * D + h * D, *y = k + b * S * HKV * D + pos * HKV * D + h * D;
                for (int c = 0; c < HALF; c++) {
                    double cs = cos_t[pos * HALF + c], sn = sin_t[pos * HALF + c];
                    double y0 = x[c] * cs - x[c + HALF] * sn, y1 = x[c + HALF] * cs + x[c] * sn;
                    worst_k = fmax(worst_k, fmax(fabs(y[c] - y0), fabs(y[c + HALF] - y1)));
                }
            }
    CHECK(worst_k <= 1e-6, "kvcache: new K rows off the rotation by %g", worst_k);
    /* simd_attn_forward does not read the append fields: it refuses them. */
    EXPECT_STATUS(simd_attn_forward(&a, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED);
    /* Rows past the capacity: nothing written, neither the cache nor the output. */
    const int64_t too_long[B] = {5, 32};
    simd_attn_desc bad = a;
    bad.cache_lens = too_long;
    memcpy(k, k0, cache_len * 4), memcpy(v, v0, cache_len * 4);
    for (size_t e = 0; e < q_len; e++) out[e] = 555.0f;
    CHECK(simd_attn_forward_with_kvcache(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL) != SIMD_ATTN_OK, "kvcache: rows past the capacity accepted");
    int untouched = memcmp(k, k0, cache_len * 4) == 0 && memcmp(v, v0, cache_len * 4) == 0;
    for (size_t e = 0; e < q_len; e++) untouched &= out[e] == 555.0f;
    CHECK(untouched, "kvcache: a rejected call wrote");
    /* Tables short of the last position: SIMD_ATTN_ERR_INVALID_ROPE, nothing written. */
    bad = a;
    bad.rope_len = 9 * HALF;
    EXPECT_STATUS(simd_attn_forward_with_kvcache(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_ROPE);
    CHECK(memcmp(k, k0, cache_len * 4) == 0, "kvcache: short tables wrote the cache");
    /* No cache_lens: refused. */
    bad = a;
    bad.cache_lens = NULL, bad.cache_lens_len = 0;
    EXPECT_STATUS(simd_attn_forward_with_kvcache(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_NULL_POINTER);
    /* The header before these fields: struct_size ends at cu_seqlens_k_len, the rope and
     * append fields are never read. */
    simd_attn_desc old = a;
    old.struct_size = (uint32_t)offsetof(simd_attn_desc, rope_cos);
    EXPECT_STATUS(simd_attn_forward(&old, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    free(k0), free(v0), free(kn), free(vn), free(q), free(k), free(v), free(out), free(ref);
}

/* The largest |got - want| over n floats (NaN counts as infinitely far). */
static double max_error(const float *got, const float *want, size_t n) {
    double worst = 0;
    for (size_t e = 0; e < n; e++) {
        double err = fabs((double)got[e] - want[e]);
        if (!(err <= worst)) worst = err;
    }
    return worst;
}

/* The descriptor a quantized-cache test starts from: causal f32 Q [b, hq, sq, d] and output
 * `want`, which it fills with the answer of the f32 cache `kd` / `vd` ([b, hkv, skv, d]) holding
 * the dequantized values; the test then sets its own k and v. */
static simd_attn_desc quantized_cache_desc(size_t b, size_t hq, size_t hkv, size_t sq, size_t skv, size_t d, const float *q, const float *kd, const float *vd, float *want) {
    simd_attn_desc base;
    simd_attn_desc_init(&base);
    base.batch = b, base.q_heads = hq, base.kv_heads = hkv, base.seq_q = sq, base.seq_kv = skv;
    base.head_dim = d, base.v_head_dim = d, base.causal = 1;
    base.q = tensor(q, hq, sq, d, b, SIMD_ATTN_F32);
    base.out = output(want, hq, sq, d, b, SIMD_ATTN_F32);
    simd_attn_desc f = base;
    f.k = tensor(kd, hkv, skv, d, b, SIMD_ATTN_F32);
    f.v = tensor(vd, hkv, skv, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_forward(&f, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    return base;
}

/* An int8 K/V cache with one factor per (token, KV head) for K and one per KV head for V: the
 * same answer as the f32 cache holding factor * code, on every path; and the reference agrees.
 * Then the descriptor errors the new fields can have. */
static void test_int8_kv(const int32_t *isas, size_t n_isas) {
    const size_t b = 2, hq = 8, hkv = 2, sq = 2, skv = 300, d = 128;
    size_t nkv = b * hkv * skv * d, nq = b * hq * sq * d;
    float *q = malloc(nq * 4), *kd = malloc(nkv * 4), *vd = malloc(nkv * 4);
    int8_t *kc = malloc(nkv), *vc = malloc(nkv);
    float *kf = malloc(b * hkv * skv * 4), vf[2] = {0.004f, 0.25f};
    float *out = calloc(nq + 1, 4), *want = calloc(nq + 1, 4), *ref = calloc(nq + 1, 4);
    for (size_t i = 0; i < nq; i++) q[i] = uniform();
    for (size_t t = 0; t < b * hkv * skv; t++) kf[t] = (float)(1 + t % 7) / 1024.0f; /* exact products */
    for (size_t i = 0; i < nkv; i++) {
        size_t tok = i / d, hk = (i / (skv * d)) % hkv;
        kc[i] = (int8_t)(int)(uniform() * 127.0f);
        vc[i] = (int8_t)(int)(uniform() * 127.0f);
        kd[i] = kf[tok] * (float)kc[i];
        vd[i] = vf[hk] * (float)vc[i];
    }
    simd_attn_desc base = quantized_cache_desc(b, hq, hkv, sq, skv, d, q, kd, vd, want);
    simd_attn_desc a = base;
    a.k = tensor(kc, hkv, skv, d, b, SIMD_ATTN_I8);
    a.v = tensor(vc, hkv, skv, d, b, SIMD_ATTN_I8);
    a.k_scale_kind = SIMD_ATTN_SCALE_TOKEN;
    a.k_scales = kf, a.k_scales_len = b * hkv * skv;
    a.k_scale_stride_batch = (int64_t)(hkv * skv), a.k_scale_stride_head = (int64_t)skv, a.k_scale_stride_seq = 1;
    a.v_scale_kind = SIMD_ATTN_SCALE_HEAD;
    a.v_scales = vf, a.v_scales_len = hkv;
    for (size_t i = 0; i < n_isas; i++) {
        for (size_t threads = 1; threads <= 2; threads++) {
            a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
            EXPECT_STATUS(simd_attn_forward(&a, threads, isas[i], NULL), SIMD_ATTN_OK);
            double worst = max_error(out, want, nq);
            CHECK(worst <= 1e-5, "int8 kv (isa %d, %zu threads): max error %g against the f32 cache", isas[i], threads, worst);
        }
    }
    a.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_reference(&a), SIMD_ATTN_OK);
    double worst = max_error(ref, want, nq);
    CHECK(worst <= 1e-5, "int8 kv reference: max error %g", worst);

    /* The same K factors stored as binary16 (k_scales_f16; each is exact in f16): the same
     * answer, bit for bit, on every path and in the reference. */
    uint16_t *kh = malloc(b * hkv * skv * 2);
    for (size_t t = 0; t < b * hkv * skv; t++) {
        kh[t] = f32_to_f16(kf[t]);
        CHECK(f16_to_f32(kh[t]) == kf[t], "f16 factor %zu is exact", t);
    }
    simd_attn_desc h = a;
    h.k_scales = NULL, h.k_scales_f16 = kh;
    for (size_t i = 0; i < n_isas; i++) {
        a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
        EXPECT_STATUS(simd_attn_forward(&a, 1, isas[i], NULL), SIMD_ATTN_OK);
        h.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
        EXPECT_STATUS(simd_attn_forward(&h, 1, isas[i], NULL), SIMD_ATTN_OK);
        CHECK(memcmp(out, ref, nq * 4) == 0, "int8 kv with f16 factors (isa %d) differs from f32 factors", isas[i]);
    }
    h.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_reference(&h), SIMD_ATTN_OK);
    worst = max_error(ref, want, nq);
    CHECK(worst <= 1e-5, "int8 kv reference with f16 factors: max error %g", worst);
    /* Both arrays set, an f16 array for a kind that reads none, a short one, a misaligned one. */
    memset(out, 0, nq * 4);
    simd_attn_desc hb = h;
    hb.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    hb.k_scales = kf;
    EXPECT_STATUS(simd_attn_forward(&hb, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_VALUE);
    hb = h, hb.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    hb.v_scales_f16 = kh;
    EXPECT_STATUS(simd_attn_forward(&hb, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_VALUE);
    hb = h, hb.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    hb.k_scales_len = 10;
    EXPECT_STATUS(simd_attn_forward(&hb, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    hb = h, hb.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    hb.k_scales_f16 = (const uint16_t *)((const char *)kh + 1), hb.k_scales_len -= 1;
    EXPECT_STATUS(simd_attn_forward(&hb, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_MISALIGNED);
    int untouched_f16 = 1;
    for (size_t i = 0; i < nq; i++) untouched_f16 &= out[i] == 0.0f;
    CHECK(untouched_f16, "a rejected call with f16 factors wrote its output");
    /* A descriptor from the header before the f16 arrays reads them as NULL. */
    simd_attn_desc pre = a;
    pre.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    pre.struct_size = (uint32_t)offsetof(simd_attn_desc, k_scales_f16);
    pre.k_scales_f16 = kh; /* past struct_size: never read */
    EXPECT_STATUS(simd_attn_forward(&pre, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    free(kh);

    /* Errors: int8 Q, mixed K/V dtypes, an unknown kind, a field the kind does not read, a
     * short factor array. The output stays untouched. */
    simd_attn_desc e = a;
    memset(out, 0, nq * 4);
    e.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    simd_attn_desc bad = e;
    bad.q = tensor(kc, hq, sq, d, 1, SIMD_ATTN_I8);
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNKNOWN_DTYPE);
    bad = e;
    bad.v = tensor(vd, hkv, skv, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
    bad = e;
    bad.k_scale_kind = 9;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_VALUE);
    bad = e;
    bad.v_scale = 2.0f;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_INVALID_VALUE);
    bad = e;
    bad.k_scales_len = 10;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    bad = e;
    bad.v_scales_len = 1;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_WRONG_LENGTH);
    int untouched = 1;
    for (size_t i = 0; i < nq; i++) untouched &= out[i] == 0.0f;
    CHECK(untouched, "a rejected int8 call wrote its output");
    /* A descriptor from the header before these fields reads no factors: int8 codes as is. */
    simd_attn_desc old = e;
    old.struct_size = (uint32_t)offsetof(simd_attn_desc, k_scale_kind);
    EXPECT_STATUS(simd_attn_forward(&old, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_OK);
    free(q), free(kd), free(vd), free(kc), free(vc), free(kf), free(out), free(want), free(ref);
}

/* An fp8 code's value from the OCP definition: e_bits exponent bits of bias `bias`, m_bits
 * mantissa bits, exponent 0 subnormal (finite codes only). */
static float fp8_value(uint8_t c, int e_bits, int m_bits, int bias) {
    int e = (c >> m_bits) & ((1 << e_bits) - 1), m = c & ((1 << m_bits) - 1);
    float frac = (float)m / (float)(1 << m_bits);
    float v = e == 0 ? ldexpf(frac, 1 - bias) : ldexpf(1.0f + frac, e - bias);
    return (c & 0x80) ? -v : v;
}

/* fp8 K/V caches as vLLM keeps them: E4M3 codes with one factor per tensor (k_scale, v_scale),
 * and E5M2 codes with no factors; each the same answer as the f32 cache holding the decoded
 * values on every path, the reference too. Then mixed and misplaced fp8 dtypes. */
static void test_fp8_kv(const int32_t *isas, size_t n_isas) {
    const size_t b = 1, hq = 8, hkv = 2, sq = 3, skv = 257, d = 64;
    size_t nkv = b * hkv * skv * d, nq = b * hq * sq * d;
    float *q = malloc(nq * 4), *kd = malloc(nkv * 4), *vd = malloc(nkv * 4);
    uint8_t *kc = malloc(nkv), *vc = malloc(nkv);
    float *out = calloc(nq + 1, 4), *want = calloc(nq + 1, 4), *ref = calloc(nq + 1, 4);
    for (size_t i = 0; i < nq; i++) q[i] = uniform();
    for (int fmt = 0; fmt < 2; fmt++) {
        /* E4M3: magnitudes 0..0x7e (0x7f is NaN); E5M2: 0..0x7b (exponent 31 is inf/NaN). */
        unsigned mags = fmt == 0 ? 0x7f : 0x7c;
        float kscale = fmt == 0 ? 0.0078125f : 1.0f, vscale = fmt == 0 ? 0.375f : 1.0f;
        for (size_t i = 0; i < nkv; i++) {
            unsigned rk = (unsigned)((uniform() + 1.0f) * 8388608.0f), rv = (unsigned)((uniform() + 1.0f) * 8388608.0f);
            kc[i] = (uint8_t)((rk % mags) | ((rk >> 12) & 1) << 7);
            vc[i] = (uint8_t)((rv % mags) | ((rv >> 12) & 1) << 7);
            kd[i] = kscale * (fmt == 0 ? fp8_value(kc[i], 4, 3, 7) : fp8_value(kc[i], 5, 2, 15));
            vd[i] = vscale * (fmt == 0 ? fp8_value(vc[i], 4, 3, 7) : fp8_value(vc[i], 5, 2, 15));
        }
        int32_t dt = fmt == 0 ? SIMD_ATTN_F8E4M3 : SIMD_ATTN_F8E5M2;
        simd_attn_desc base = quantized_cache_desc(b, hq, hkv, sq, skv, d, q, kd, vd, want);
        double vmax = 1.0;
        for (size_t e = 0; e < nq; e++) vmax = fabs(want[e]) > vmax ? fabs(want[e]) : vmax;
        simd_attn_desc a = base;
        a.k = tensor(kc, hkv, skv, d, b, dt);
        a.v = tensor(vc, hkv, skv, d, b, dt);
        if (fmt == 0) {
            a.k_scale_kind = SIMD_ATTN_SCALE_TENSOR, a.k_scale = kscale;
            a.v_scale_kind = SIMD_ATTN_SCALE_TENSOR, a.v_scale = vscale;
        }
        for (size_t i = 0; i < n_isas; i++) {
            a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
            EXPECT_STATUS(simd_attn_forward(&a, 2, isas[i], NULL), SIMD_ATTN_OK);
            double worst = max_error(out, want, nq);
            CHECK(worst <= 1e-5 * vmax, "fp8 %s kv (isa %d): max error %g against the f32 cache", fmt == 0 ? "e4m3" : "e5m2", isas[i], worst);
        }
        a.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
        EXPECT_STATUS(simd_attn_reference(&a), SIMD_ATTN_OK);
        double worst = max_error(ref, want, nq);
        CHECK(worst <= 1e-5 * vmax, "fp8 kv reference: max error %g", worst);
        /* Errors: E4M3 K with E5M2 V, fp8 Q, an fp8 output; nothing written. */
        memset(out, 0, nq * 4);
        simd_attn_desc bad = a;
        bad.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
        bad.v = tensor(vc, hkv, skv, d, b, fmt == 0 ? SIMD_ATTN_F8E5M2 : SIMD_ATTN_F8E4M3);
        EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
        bad = a;
        bad.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
        bad.q = tensor(kc, hq, sq, d, 1, dt);
        EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNKNOWN_DTYPE);
        bad = a;
        bad.out = output(kc, hq, sq, d, 1, dt);
        EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNKNOWN_DTYPE);
        int untouched = 1;
        for (size_t i = 0; i < nq; i++) untouched &= out[i] == 0.0f;
        CHECK(untouched, "a rejected fp8 call wrote its output");
    }
    free(q), free(kd), free(vd), free(kc), free(vc), free(out), free(want), free(ref);
}

/* ggml's block_q8_0: a binary16 scale, then 32 int8 codes (34 bytes, 2-byte aligned). */
typedef struct {
    uint16_t d;
    int8_t qs[32];
} ggml_block_q8_0;
typedef char ggml_block_q8_0_is_34_bytes[sizeof(ggml_block_q8_0) == 34 ? 1 : -1];

/* A ggml q8_0 K/V cache read in place: blocks quantized here as ggml's reference quantizer
 * does (d = amax / 127 as binary16, codes roundf(x / d)), the same answer as the f32 cache
 * holding d * q on every path, the reference too; strides count blocks. Then the errors:
 * head_dim not whole blocks, a misaligned pointer, mixed K/V dtypes, q8_0 Q. */
static void test_q8_0_kv(const int32_t *isas, size_t n_isas) {
    const size_t b = 2, hq = 8, hkv = 2, sq = 3, skv = 300, d = 96, nb = d / 32;
    size_t nkv = b * hkv * skv * d, nq = b * hq * sq * d, nblk = nkv / 32;
    float *q = malloc(nq * 4), *kd = malloc(nkv * 4), *vd = malloc(nkv * 4);
    ggml_block_q8_0 *kb = malloc(nblk * sizeof *kb), *vb = malloc(nblk * sizeof *vb);
    float *out = calloc(nq + 1, 4), *want = calloc(nq + 1, 4), *ref = calloc(nq + 1, 4);
    for (size_t i = 0; i < nq; i++) q[i] = uniform();
    for (int t = 0; t < 2; t++) {
        ggml_block_q8_0 *blk = t == 0 ? kb : vb;
        float *deq = t == 0 ? kd : vd;
        for (size_t n = 0; n < nblk; n++) {
            /* Small, moderate and (V only: large K values would make logits whose f32
             * rounding alone moves the output past this test's tolerance) large blocks. */
            float x[32], amax = 0.0f, mag = (n % 7 == 0) ? 1e-3f : (n % 5 == 0 && t == 1 ? 300.0f : 2.0f);
            for (int i = 0; i < 32; i++) {
                x[i] = mag * uniform();
                if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
            }
            float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            blk[n].d = f32_to_f16(dd);
            for (int i = 0; i < 32; i++) {
                blk[n].qs[i] = (int8_t)roundf(x[i] * id);
                deq[n * 32 + i] = f16_to_f32(blk[n].d) * (float)blk[n].qs[i];
            }
        }
    }
    simd_attn_desc base = quantized_cache_desc(b, hq, hkv, sq, skv, d, q, kd, vd, want);
    double vmax = 1.0;
    for (size_t e = 0; e < nkv; e++) vmax = fabs(vd[e]) > vmax ? fabs(vd[e]) : vmax;
    simd_attn_desc a = base;
    a.k = tensor(kb, hkv, skv, nb, b, SIMD_ATTN_Q8_0);
    a.v = tensor(vb, hkv, skv, nb, b, SIMD_ATTN_Q8_0);
    for (size_t i = 0; i < n_isas; i++) {
        for (size_t threads = 1; threads <= 2; threads++) {
            a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
            EXPECT_STATUS(simd_attn_forward(&a, threads, isas[i], NULL), SIMD_ATTN_OK);
            double worst = max_error(out, want, nq);
            CHECK(worst <= 1e-5 * vmax, "q8_0 kv (isa %d, %zu threads): max error %g against the f32 cache", isas[i], threads, worst);
        }
    }
    a.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_reference(&a), SIMD_ATTN_OK);
    CHECK(max_error(ref, want, nq) <= 1e-5 * vmax, "q8_0 kv reference: max error %g", max_error(ref, want, nq));
    memset(out, 0, nq * 4);
    a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
    simd_attn_desc bad = a;
    bad.head_dim = 80, bad.v_head_dim = 80;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED);
    bad = a;
    bad.k.data = (const char *)kb + 1, bad.k.len = nblk - 1;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_MISALIGNED);
    bad = a;
    bad.k.len = nblk - 1;
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_BUFFER_TOO_SMALL);
    bad = a;
    bad.v = tensor(vd, hkv, skv, d, b, SIMD_ATTN_F32);
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
    bad = a;
    bad.q = tensor(kb, hq, sq, nb, 1, SIMD_ATTN_Q8_0);
    EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNKNOWN_DTYPE);
    int untouched = 1;
    for (size_t i = 0; i < nq; i++) untouched &= out[i] == 0.0f;
    CHECK(untouched, "a rejected q8_0 call wrote its output");
    free(q), free(kd), free(vd), free(kb), free(vb), free(out), free(want), free(ref);
}

/* A [B, Hkv, Skv, W] tensor of W units of `size` bytes as a pool of token-major pages
 * [pages, ps, Hkv, W], sequence s's page p stored at pool page pages - 1 - (s * pps + p) (the
 * pool in reverse order), which `table` ([B, pps]) records. */
static void *to_pages(const void *src, size_t size, size_t w, size_t b, size_t hkv, size_t skv, size_t ps, int32_t *table) {
    size_t pps = skv / ps, pages = b * pps, row = w * size;
    char *pool = malloc(pages * ps * hkv * row);
    for (size_t s = 0; s < b; s++) {
        for (size_t p = 0; p < pps; p++) {
            size_t page = pages - 1 - (s * pps + p);
            table[s * pps + p] = (int32_t)page;
            for (size_t slot = 0; slot < ps; slot++)
                for (size_t h = 0; h < hkv; h++)
                    memcpy(pool + ((page * ps + slot) * hkv + h) * row, (const char *)src + ((s * hkv + h) * skv + p * ps + slot) * row, row);
        }
    }
    return pool;
}

/* K and V of different dtypes, llama.cpp's -ctk q8_0 -ctv f16 and the reverse: the q8_0 side
 * as ggml blocks, the other as binary16, read in place on every path (strided and paged), the
 * same answer as the f32 cache holding their values; the reference agrees. Pairs outside the
 * list (q8_0 with bf16, int8 with f16) are refused, output untouched. */
static void test_mixed_kv(const int32_t *isas, size_t n_isas) {
    const size_t b = 2, hq = 8, hkv = 2, sq = 1, skv = 260, d = 128, nb = d / 32;
    size_t nkv = b * hkv * skv * d, nq = b * hq * sq * d, nblk = nkv / 32;
    float *q = malloc(nq * 4), *kd = malloc(nkv * 4), *vd = malloc(nkv * 4);
    ggml_block_q8_0 *blocks = malloc(nblk * sizeof *blocks);
    uint16_t *halfs = malloc(nkv * 2);
    float *out = calloc(nq + 1, 4), *want = calloc(nq + 1, 4), *ref = calloc(nq + 1, 4);
    for (size_t i = 0; i < nq; i++) q[i] = uniform();
    for (int q8_k = 0; q8_k < 2; q8_k++) {
        /* The q8_0 side: ggml's quantizer; the f16 side: binary16 values. */
        float *qd = q8_k ? kd : vd, *hd = q8_k ? vd : kd;
        for (size_t n = 0; n < nblk; n++) {
            float x[32], amax = 0.0f, mag = n % 7 == 0 ? 1e-3f : 2.0f;
            for (int i = 0; i < 32; i++) {
                x[i] = mag * uniform();
                if (fabsf(x[i]) > amax) amax = fabsf(x[i]);
            }
            float dd = amax / 127.0f, id = dd != 0.0f ? 1.0f / dd : 0.0f;
            blocks[n].d = f32_to_f16(dd);
            for (int i = 0; i < 32; i++) {
                blocks[n].qs[i] = (int8_t)roundf(x[i] * id);
                qd[n * 32 + i] = f16_to_f32(blocks[n].d) * (float)blocks[n].qs[i];
            }
        }
        for (size_t e = 0; e < nkv; e++) {
            halfs[e] = f32_to_f16(2.0f * uniform());
            hd[e] = f16_to_f32(halfs[e]);
        }
        simd_attn_desc base = quantized_cache_desc(b, hq, hkv, sq, skv, d, q, kd, vd, want);
        double vmax = 1.0;
        for (size_t e = 0; e < nkv; e++) vmax = fabs(vd[e]) > vmax ? fabs(vd[e]) : vmax;
        simd_attn_tensor qt = tensor(blocks, hkv, skv, nb, b, SIMD_ATTN_Q8_0), ht = tensor(halfs, hkv, skv, d, b, SIMD_ATTN_F16);
        simd_attn_desc a = base;
        a.k = q8_k ? qt : ht;
        a.v = q8_k ? ht : qt;
        for (size_t i = 0; i < n_isas; i++) {
            for (size_t threads = 1; threads <= 2; threads++) {
                a.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
                EXPECT_STATUS(simd_attn_forward(&a, threads, isas[i], NULL), SIMD_ATTN_OK);
                double worst = max_error(out, want, nq);
                CHECK(worst <= 1e-5 * vmax, "mixed kv (q8_0 K: %d, isa %d, %zu threads): max error %g", q8_k, isas[i], threads, worst);
            }
        }
        a.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
        EXPECT_STATUS(simd_attn_reference(&a), SIMD_ATTN_OK);
        CHECK(max_error(ref, want, nq) <= 1e-5 * vmax, "mixed kv reference (q8_0 K: %d): max error %g", q8_k, max_error(ref, want, nq));
        /* Paged: both sides as token-major pools of 4-token pages in reverse order. */
        {
            const size_t ps = 4, pps = skv / ps, npages = b * pps;
            int32_t *table = malloc(npages * sizeof *table);
            void *kp = to_pages(a.k.data, a.k.dtype == SIMD_ATTN_Q8_0 ? 34 : 2, a.k.dtype == SIMD_ATTN_Q8_0 ? nb : d, b, hkv, skv, ps, table);
            void *vp = to_pages(a.v.data, a.v.dtype == SIMD_ATTN_Q8_0 ? 34 : 2, a.v.dtype == SIMD_ATTN_Q8_0 ? nb : d, b, hkv, skv, ps, table);
            simd_attn_desc pg = a;
            pg.block_table = table, pg.block_table_len = npages;
            pg.pages_per_seq = pps, pg.page_size = ps, pg.num_pages = npages;
            for (int t = 0; t < 2; t++) {
                simd_attn_tensor *x = t == 0 ? &pg.k : &pg.v;
                size_t w = x->dtype == SIMD_ATTN_Q8_0 ? nb : d;
                x->data = t == 0 ? kp : vp;
                x->len = npages * ps * hkv * w;
                x->stride_batch = (int64_t)(ps * hkv * w), x->stride_head = (int64_t)w, x->stride_seq = (int64_t)(hkv * w);
            }
            for (size_t i = 0; i < n_isas; i++) {
                pg.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
                EXPECT_STATUS(simd_attn_forward(&pg, 2, isas[i], NULL), SIMD_ATTN_OK);
                double worst = max_error(out, want, nq);
                CHECK(worst <= 1e-5 * vmax, "paged mixed kv (q8_0 K: %d, isa %d): max error %g", q8_k, isas[i], worst);
            }
            pg.out = output(ref, hq, sq, d, b, SIMD_ATTN_F32);
            EXPECT_STATUS(simd_attn_reference(&pg), SIMD_ATTN_OK);
            CHECK(max_error(ref, want, nq) <= 1e-5 * vmax, "paged mixed kv reference: max error %g", max_error(ref, want, nq));
            free(table), free(kp), free(vp);
        }
        /* Pairs outside the list: nothing written. */
        memset(out, 0, nq * 4);
        simd_attn_desc bad = a;
        bad.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
        (q8_k ? &bad.v : &bad.k)->dtype = SIMD_ATTN_BF16;
        EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
        bad = a;
        bad.out = output(out, hq, sq, d, b, SIMD_ATTN_F32);
        simd_attn_tensor *codes = q8_k ? &bad.k : &bad.v;
        *codes = tensor(blocks, hkv, skv, d, b, SIMD_ATTN_I8); /* int8 codes (in bounds: 34 bytes per 32) */
        EXPECT_STATUS(simd_attn_forward(&bad, 1, SIMD_ATTN_ISA_AUTO, NULL), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
        EXPECT_STATUS(simd_attn_reference(&bad), SIMD_ATTN_ERR_UNSUPPORTED_DTYPES);
        int untouched = 1;
        for (size_t i = 0; i < nq; i++) untouched &= out[i] == 0.0f;
        CHECK(untouched, "a rejected mixed K/V call wrote its output");
    }
    free(q), free(kd), free(vd), free(blocks), free(halfs), free(out), free(want), free(ref);
}

int main(void) {
    printf("simd-attn %s (ABI %u), best ISA %s\n", simd_attn_version(), simd_attn_abi_version(),
           simd_attn_isa_name(simd_attn_isa_best()));
    test_header_agrees_with_library();

    /* Under valgrind, SIMD_ATTN_ISA pins one path; otherwise every path this machine has. */
    int32_t isas[8];
    size_t n_isas = 0;
    isas[n_isas++] = SIMD_ATTN_ISA_AUTO;
    if (!getenv("SIMD_ATTN_ISA")) {
        test_isa_queries();
        for (int32_t i = SIMD_ATTN_ISA_PORTABLE; i <= SIMD_ATTN_ISA_AVX512BF16; i++)
            if (simd_attn_isa_available(i)) isas[n_isas++] = i;
    }
    for (size_t c = 0; c < N_CASES; c++) {
        for (size_t i = 0; i < n_isas; i++) {
            for (size_t threads = 1; threads <= 2; threads++) {
                problem p;
                cases[c].make(&p);
                check_against_reference(cases[c].name, &p, isas[i], threads);
                release(&p);
            }
        }
        problem p;
        cases[c].make(&p);
        test_host_driven(cases[c].name, &p, cases[c].make == case_decode_f16_kv || cases[c].make == case_decode_bf16_kv);
        release(&p);
    }
    test_classic_scores(isas, n_isas);
    test_concurrent_forward();
    test_merge();
    test_empty_calls(isas, n_isas);
    test_paged(isas, n_isas);
    test_varlen(isas, n_isas);
    test_kvcache(isas, n_isas);
    test_int8_kv(isas, n_isas);
    test_fp8_kv(isas, n_isas);
    test_q8_0_kv(isas, n_isas);
    test_mixed_kv(isas, n_isas);
    test_errors();

    printf("%d checks, %d failures\n", checks, failures);
    return failures == 0 ? 0 : 1;
}

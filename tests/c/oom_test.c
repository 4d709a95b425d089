/*
 * Memory pressure: every entry under a lowered address-space limit (RLIMIT_AS). Each call
 * below is valid but needs more working memory than the limit leaves (decode partials of a
 * broadcast cache, cosine key norms, kernel scratch for a huge head dim, the reference's
 * scores, the merge's row); each must return SIMD_ATTN_ERR_OUT_OF_MEMORY with a message and
 * its outputs untouched, never abort. The buffers are allocated before the limit is set.
 *
 * Built and run by tests/capi.rs as its own process (the limit is process-wide).
 * Exit status 0 means every check passed.
 */
#include "simd_attn.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

#include "check.h"

#define SENTINEL 0x5a

static void fill(void *p, size_t bytes) { memset(p, SENTINEL, bytes); }

static int untouched(const void *p, size_t bytes) {
    const unsigned char *c = p;
    for (size_t i = 0; i < bytes; i++)
        if (c[i] != SENTINEL) return 0;
    return 1;
}

static void expect_oom(const char *what, int status, const void *out, size_t out_bytes, const void *lse, size_t lse_bytes) {
    const char *name = simd_attn_status_name(status);
    CHECK(status == SIMD_ATTN_ERR_OUT_OF_MEMORY, "%s returned %s (%s), want OUT_OF_MEMORY", what, name ? name : "?",
          simd_attn_last_error());
    CHECK(strlen(simd_attn_last_error()) > 0, "%s: no message", what);
    CHECK(untouched(out, out_bytes), "%s: out written", what);
    if (lse) CHECK(untouched(lse, lse_bytes), "%s: lse written", what);
}

/* Virtual memory in use now (bytes), from /proc/self/statm. */
static size_t vm_now(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    unsigned long pages = 0;
    if (f) {
        if (fscanf(f, "%lu", &pages) != 1) pages = 0;
        fclose(f);
    }
    return (size_t)pages * 4096;
}

static simd_attn_tensor broadcast(const float *data, size_t len) {
    simd_attn_tensor t = {data, len, SIMD_ATTN_F32, 0, 0, 0, 0};
    return t;
}

int main(void) {
    const size_t MiB = 1 << 20;
    /* Huge head dim: Q, K, V, out of one row each (64 MiB apiece), scratch for a row tile of
     * them does not fit. */
    const size_t big_d = 16 * MiB;
    float *hq = malloc(big_d * 4), *hk = malloc(big_d * 4), *hv = malloc(big_d * 4), *hout = malloc(big_d * 4);
    /* The merge: one output row of 2^27 floats (512 MiB); its f64 accumulator needs 1 GiB. */
    const size_t merge_dv = (size_t)1 << 27;
    float *mout = malloc(merge_dv * 4);
    float q[64], kv[64], out[8 * 64], lse[8];
    if (!hq || !hk || !hv || !hout || !mout) {
        printf("oom_test: could not allocate the test's own buffers; skipped\n0 failures\n");
        return 0;
    }
    for (size_t i = 0; i < big_d; i++) hq[i] = hk[i] = hv[i] = 0.01f;
    for (int i = 0; i < 64; i++) q[i] = kv[i] = 0.5f;
    memset(mout, 0, merge_dv * 4); /* touch it, so it is really there */

    /* Warm the library (thread pool, per-thread workspaces) before the limit. */
    simd_attn_desc d;
    simd_attn_desc_init(&d);
    d.batch = 1, d.q_heads = 8, d.kv_heads = 1, d.seq_q = 1, d.seq_kv = 64, d.head_dim = 64;
    d.q = broadcast(q, 64), d.k = broadcast(kv, 64), d.v = broadcast(kv, 64);
    simd_attn_output o = {out, 8 * 64, SIMD_ATTN_F32, 0, 8 * 64, 64, 64};
    d.out = o, d.lse = lse, d.lse_len = 8;
    CHECK(simd_attn_forward(&d, 2, SIMD_ATTN_ISA_AUTO, NULL) == SIMD_ATTN_OK, "warm-up: %s", simd_attn_last_error());

    struct rlimit lim = {vm_now() + 384 * MiB, RLIM_INFINITY};
    lim.rlim_max = lim.rlim_cur;
    if (setrlimit(RLIMIT_AS, &lim) != 0) {
        printf("oom_test: setrlimit(RLIMIT_AS) failed: not run\n");
        return 77;
    }
    /* The limit must hold, or every "valid but too big" call below would really allocate
     * gigabytes. qemu-user, for one, does not apply a guest's RLIMIT_AS to itself. */
    void *probe = malloc(512 * MiB);
    if (probe != NULL) {
        free(probe);
        printf("oom_test: RLIMIT_AS is not enforced here (an emulator?): not run\n");
        return 77;
    }

    /* 1. Decode against 2^32 broadcast keys: the partials (4M partitions x 8 rows x 66 floats)
     *    do not fit. One thread and two; and as a host plan. */
    d.seq_kv = (size_t)1 << 32;
    for (size_t threads = 1; threads <= 2; threads++) {
        fill(out, sizeof out), fill(lse, sizeof lse);
        expect_oom("forward, decode partials", simd_attn_forward(&d, threads, SIMD_ATTN_ISA_AUTO, NULL), out, sizeof out, lse, sizeof lse);
    }
    simd_attn_plan *plan = (simd_attn_plan *)1;
    fill(out, sizeof out), fill(lse, sizeof lse);
    expect_oom("plan_create, decode partials", simd_attn_plan_create(&d, 2, SIMD_ATTN_ISA_AUTO, &plan), out, sizeof out, lse, sizeof lse);
    CHECK(plan == NULL, "plan_create failed but left a plan");

    /* 2. Cosine scores over 2^30 broadcast keys: the key norms (4 GiB) do not fit. */
    d.seq_kv = (size_t)1 << 30;
    d.score = SIMD_ATTN_SCORE_COSINE;
    fill(out, sizeof out), fill(lse, sizeof lse);
    expect_oom("forward, cosine key norms", simd_attn_forward(&d, 1, SIMD_ATTN_ISA_AUTO, NULL), out, sizeof out, lse, sizeof lse);
    d.score = SIMD_ATTN_SCORE_SCALED_DOT;

    /* 3. The reference over 2^28 broadcast keys: a row's scores (2 GiB of f64) do not fit. */
    d.seq_kv = (size_t)1 << 28;
    fill(out, sizeof out), fill(lse, sizeof lse);
    expect_oom("reference, scores", simd_attn_reference(&d), out, sizeof out, lse, sizeof lse);

    /* 4. A head dim of 16M: each path's scratch (a row tile of Q, a key block of K and V) does
     *    not fit; the portable path, the SIMD paths, one and two threads. */
    simd_attn_desc h;
    simd_attn_desc_init(&h);
    h.batch = 1, h.q_heads = 1, h.kv_heads = 1, h.seq_q = 1, h.seq_kv = 1, h.head_dim = big_d;
    h.q = broadcast(hq, big_d), h.k = broadcast(hk, big_d), h.v = broadcast(hv, big_d);
    simd_attn_output ho = {hout, big_d, SIMD_ATTN_F32, 0, 0, 0, 0};
    h.out = ho;
    for (int32_t isa = 0; isa <= 3; isa++) {
        if (!simd_attn_isa_available(isa)) continue;
        for (size_t threads = 1; threads <= 2; threads++) {
            fill(hout, 64);
            int s = simd_attn_forward(&h, threads, isa, NULL);
            /* The first 64 bytes stand for the whole row: a kernel writes a row from its start. */
            if (s == SIMD_ATTN_OK) {
                /* The scalar path's scratch for one lane may fit: then the call just works. */
                CHECK(!untouched(hout, 64), "isa %d: OK but nothing written", (int)isa);
            } else {
                expect_oom("forward, huge head dim", s, hout, 64, NULL, 0);
            }
        }
    }

    /* 5. merge_partials with a 2^27-wide row and no parts: the f64 row accumulator (1 GiB)
     *    does not fit. */
    simd_attn_output mo = {mout, merge_dv, SIMD_ATTN_F32, 0, 0, 0, 0};
    fill(mout, 64);
    expect_oom("merge_partials, row accumulator", simd_attn_merge_partials(1, 1, 1, merge_dv, NULL, 0, &mo, NULL, 0), mout, 64, NULL, 0);

    printf("oom_test: %d checks, %d failures\n", checks, failures);
    return failures != 0;
}

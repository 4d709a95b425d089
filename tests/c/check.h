/* The C tests' check counter: CHECK counts every check and reports each failure with its
 * place; a test program ends by printing "<checks> checks, <failures> failures". */
#ifndef SIMD_ATTN_TEST_CHECK_H
#define SIMD_ATTN_TEST_CHECK_H

#include <stdio.h>

static int failures = 0;
static int checks = 0;

#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        checks++;                                                         \
        if (!(cond)) {                                                    \
            failures++;                                                   \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);          \
            fprintf(stderr, __VA_ARGS__);                                 \
            fprintf(stderr, "\n");                                        \
        }                                                                 \
    } while (0)

#endif

/* Adam with a ChildTuning gradient mask, fused into one pass per element, for fp32 CPU tensors.
 *
 * The step of ATen's fused Adam kernel without bias correction (optimfx/reference/aten_fused.py maps
 * AdamW's and AdaX's steps onto it), preceded by the ChildTuning mask of the gradient:
 *
 *     g~ = g * keep * s          (F: keep from the counter-based hash, s = 2^16/T)
 *     g~ = g * M                 (D: the stored 0/1 mask)
 *     g~ = -g~                   (maximize)
 *     g~ = g~ + wd * p           (Adam mode: coupled L2)   |  p = p * (1 - lr*wd)   (AdamW mode)
 *                                (neither when wd = 0: ATen skips the term, so an inf parameter stays inf)
 *     m  = lerp(m, g~, 1 - b1)     (ATen's lerp, cpu_common.h)
 *     v  = b2 * v + (1 - b2) * g~ * g~
 *     p  = p - lr * m / (sqrt(v) + eps)
 *
 * The F mask is optimfx/reference/child_tuning.py's, bit for bit: pair q = e >> 1 of global element
 * e hashes to 32 bits; element e keeps r = (x >> 16*(e & 1)) & 0xFFFF when (r ^ 0x8000) < T. A task
 * is done SPAN elements at a time: the span's pair hashes first (uint32 lanes), then the update,
 * which reads the hashes as 16-bit halves (little-endian: the low half is the even element).
 *
 * Work arrives as tasks (tensor, first element, end), a thread's share of a group; the per-tensor
 * table holds pointers and keys. Every element is computed the same way wherever a task boundary
 * falls, so results do not depend on the number of threads. No fast-math: the compiler flags keep
 * IEEE semantics (inf/NaN propagate as in the reference) and forbid contracting a*b+c into an FMA,
 * so vectorised body and scalar tail round alike.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_common.h"

/* one row per tensor of the call, all int64 */
enum { T_PARAM, T_GRAD, T_EXP_AVG, T_EXP_AVG_SQ, T_MASK, T_OFFSET, T_KEY, T_COLUMNS };
/* one row per task */
enum { K_TENSOR, K_START, K_END, K_COLUMNS };
/* the doubles of `scalars` */
enum { S_LR, S_BETA1, S_BETA2, S_WEIGHT_DECAY, S_EPS, S_KEEP_SCALE, S_COUNT };
/* bits of `flags`, and the mask mode in bits 8..15, the keep threshold T in bits 16..47 */
enum { F_DECOUPLED = 1, F_MAXIMIZE = 2 };
enum { MASK_NONE = 0, MASK_BERNOULLI = 1, MASK_STORED = 2 };

#define BLOCK HASH_BLOCK
#define SPAN 64
#define PREFETCH 512

typedef struct {
    adam_scalars adam;
    float keep_scale, sign;
    uint32_t threshold;
} masked_adam_scalars;

/* n elements from p, g, m, v; `mode` and `decay` are constants in each caller, so every setting
 * gets its own loop (a branch on a run-time setting inside a loop stops vectorisation) */
static inline __attribute__((always_inline)) void update(
    float *restrict p, const float *restrict g, float *restrict m, float *restrict v, int64_t n,
    const masked_adam_scalars *sc, const int mode, const int decay_mode, const alias_u16 *restrict bits,
    const uint8_t *restrict stored) {
    const float scale = sc->keep_scale, sign = sc->sign;
    const uint32_t threshold = sc->threshold;
    const adam_scalars adam = sc->adam;
    for (int64_t i = 0; i < n; ++i) {
        float gi = g[i];
        if (mode == MASK_BERNOULLI) gi = gi * ((((uint32_t)bits[i] ^ 0x8000u) < threshold) ? scale : 0.0f);
        if (mode == MASK_STORED) gi = gi * (float)stored[i];
        gi = gi * sign;
        p[i] = adam_element(p[i], gi, m, v, i, &adam, decay_mode);
    }
}

/* the update of elements [s, e) of tensor row t, for one constant mask mode and decay mode: SPAN
 * elements at a time, each span's F hashes computed just before its update and the memory of the
 * span PREFETCH elements ahead requested first (software prefetch: the hardware prefetcher alone
 * left the update's loads waiting while the hashing ran) */
static inline __attribute__((always_inline)) void task(const int64_t *t, int64_t s, int64_t e,
                                                        const masked_adam_scalars *sc, const int mode,
                                                        const int decay_mode) {
    float *p = (float *)t[T_PARAM], *m = (float *)t[T_EXP_AVG], *v = (float *)t[T_EXP_AVG_SQ];
    const float *g = (const float *)t[T_GRAD];
    const uint8_t *stored = mode == MASK_STORED ? (const uint8_t *)t[T_MASK] : 0;
    uint32_t h[SPAN / 2 + 2];
    for (int64_t i = s; i < e; i += SPAN) {
        const int64_t n = e - i < SPAN ? e - i : SPAN;
        PREFETCH_SPAN(p, i + PREFETCH, SPAN, 1);
        PREFETCH_SPAN(g, i + PREFETCH, SPAN, 0);
        PREFETCH_SPAN(m, i + PREFETCH, SPAN, 1);
        PREFETCH_SPAN(v, i + PREFETCH, SPAN, 1);
        const alias_u16 *bits = 0;
        if (mode == MASK_STORED) PREFETCH_SPAN(stored, i + PREFETCH, SPAN, 0);
        if (mode == MASK_BERNOULLI) {
            const uint64_t first = (uint64_t)(t[T_OFFSET] + i);
            hash_elements(h, first, n, (uint64_t)t[T_KEY]);
            bits = (const alias_u16 *)h + (first & 1);
        }
        update(p + i, g + i, m + i, v + i, n, sc, mode, decay_mode, bits, stored ? stored + i : 0);
    }
}

#define TASK_FOR_DECAY(mode)                                                   \
    switch (sc.adam.decay_mode) {                                                   \
    case DECAY_DECOUPLED: task(t, start, end, &sc, mode, DECAY_DECOUPLED); break; \
    case DECAY_COUPLED: task(t, start, end, &sc, mode, DECAY_COUPLED); break;     \
    default: task(t, start, end, &sc, mode, DECAY_NONE);                        \
    }

/* Step the tasks tasks[0 .. n_tasks) of one share: see the top of this file. */
static void adam_share(const int64_t *tensors, const int64_t *tasks, int64_t n_tasks, const double *scalars,
                       int64_t flags) {
    const int mode = (int)((flags >> 8) & 0xFF);
    masked_adam_scalars sc;
    sc.adam = adam_unpack(scalars[S_LR], scalars[S_BETA1], scalars[S_BETA2], scalars[S_WEIGHT_DECAY], scalars[S_EPS],
                          (flags & F_DECOUPLED) != 0);
    sc.keep_scale = (float)scalars[S_KEEP_SCALE];
    sc.sign = (flags & F_MAXIMIZE) ? -1.0f : 1.0f;
    sc.threshold = (uint32_t)((flags >> 16) & 0x1FFFF);
    for (int64_t k = 0; k < n_tasks; ++k) {
        const int64_t *row = tasks + k * K_COLUMNS;
        const int64_t *t = tensors + row[K_TENSOR] * T_COLUMNS;
        const int64_t start = row[K_START], end = row[K_END];
        if (mode == MASK_BERNOULLI) {
            TASK_FOR_DECAY(MASK_BERNOULLI)
        } else if (mode == MASK_STORED && t[T_MASK] != 0) {
            TASK_FOR_DECAY(MASK_STORED)
        } else {
            TASK_FOR_DECAY(MASK_NONE)
        }
    }
}

/* Every share (rows of `shares`: task table pointer, task count), one per thread. */
void optimfx_adam_tasks(const int64_t *tensors, const int64_t *shares, int64_t n_shares, const double *scalars,
                        int64_t flags) {
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        adam_share(tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], scalars, flags);
}

/* ---- the masked gradient alone, for optimizers that mask outside their update (AdaFactor's steps,
 * the torch.optim adapter) ---- */

/* The F-masked gradient alone, out = 0 + (keep ? scale : 0) * g, of the n elements of one tensor
 * whose first element has global index `offset`: the reference's bernoulli_grad bit for bit (its
 * addcmul onto +0 gives +0 where an element is dropped). Blocks run on `threads` OpenMP threads. */
void optimfx_bernoulli_grad(const float *g, float *out, int64_t n, int64_t offset, int64_t key, int64_t threshold,
                            double keep_scale, int64_t threads) {
    const float scale = (float)keep_scale;
    const uint32_t t = (uint32_t)threshold;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        uint32_t h[BLOCK / 2 + 2];
        int64_t s = b * BLOCK;
        const int64_t e = s + BLOCK < n ? s + BLOCK : n;
        while (s < e) {
            const uint64_t first = (uint64_t)(offset + s);
            const int64_t m = hash_block(h, first, e - s, (uint64_t)key);
            const alias_u16 *restrict bits = (const alias_u16 *)h + (first & 1);
            const float *restrict src = g + s;
            float *restrict dst = out + s;
            for (int64_t i = 0; i < m; ++i)
                dst[i] = 0.0f + ((((uint32_t)bits[i] ^ 0x8000u) < t) ? scale : 0.0f) * src[i];
            s += m;
        }
    }
}

/* The D-masked gradient alone, out = g * M (M one byte, 0 or 1, per element): the reference's
 * apply_mask bit for bit. Blocks run on `threads` OpenMP threads. */
void optimfx_stored_mask_grad(const float *g, const uint8_t *mask, float *out, int64_t n, int64_t threads) {
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for num_threads((int)threads) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        const int64_t s = b * BLOCK, e = s + BLOCK < n ? s + BLOCK : n;
        const float *restrict src = g + s;
        const uint8_t *restrict keep = mask + s;
        float *restrict dst = out + s;
        for (int64_t i = 0; i < e - s; ++i) dst[i] = src[i] * (float)keep[i];
    }
}

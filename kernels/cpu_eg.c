/* Exponentiated-gradient step-size adaptation (optimfx/reference/eg.py), three passes per element
 * for fp32 CPU tensors.
 *
 *   sums   (read nu, g, m)         per fixed chunk of a tensor: <nu, g>, |nu|^2, |g|^2, |m|^2
 *   adapt  (before the base step)   z = clip((c*m)*g);  p = clamp(p * exp(z));  m = lerp(m, g, 1 - beta)
 *                                   and either  saved = theta             (the base then proposes theta - d)
 *                                   or, a plain SGD base ("direct"):  d = (g + wd*theta)*lr,
 *                                       nu = nu*mu + (eta*p)*d,  theta = theta + (-nu)*s
 *   apply  (after the base step)    d = saved - theta;  nu = nu*mu + (eta*p)*d;  theta = theta + (d + (-nu)*s)
 *   adam   (adapt, base step and apply in one pass, for an Adam-family base whose step is ATen's
 *           fused Adam without bias correction, as optimfx/reference/aten_fused.py maps it):
 *                                   z, p and m as in adapt;  then the base's proposal, as kernels/cpu_adam.c
 *                                   forms it (adam_element, cpu_common.h):
 *                                   q = theta*(1 - lr*wd) (decoupled) | ga = g + wd*theta (coupled),
 *                                   ma = lerp(ma, ga, 1 - b1),  va = b2*va + (1 - b2)*ga*ga,
 *                                   q = q - lr*ma/(sqrt(va) + eps);  then apply with saved = theta:
 *                                   d = theta - q;  nu = nu*mu + (eta*p)*d;  theta = q + (d + (-nu)*s)
 *
 * Each line is the reference's ATen ops in their order of evaluation; `c` (the gain coefficient)
 * and `s` (the scale) are per tensor. A sum is taken over CHUNK-element chunks, each chunk's
 * partial sums in 16 lanes combined in a fixed order, so the sums do not depend on the number of
 * threads; the host adds a tensor's chunk sums in order, in double. No fast-math (IEEE semantics, no FMA
 * contraction); exp is a Cody-Waite reduction and a degree-6 polynomial (Cephes' expf, within 1
 * ulp of the correctly rounded result over the normal range), written so that it vectorises.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_common.h"

enum { T_PARAM, T_GRAD, T_GAINS, T_VELOCITY, T_AVG_GRAD, T_SAVED, T_SCALE, T_CHUNK_BASE, T_EXP_AVG, T_EXP_AVG_SQ,
       T_COLUMNS };
enum { K_TENSOR, K_START, K_END, K_COLUMNS };
enum { S_BETA, S_EXP_CLIP, S_GAIN_MIN, S_GAIN_MAX, S_MOMENTUM, S_ETA, S_SGD_LR, S_SGD_DECAY, S_COUNT };
/* the base's Adam scalars (the adam pass) */
enum { A_LR, A_BETA1, A_BETA2, A_WEIGHT_DECAY, A_EPS, A_DECOUPLED, A_COUNT };
enum { F_DIRECT = 1, F_FRESH_VELOCITY = 2, F_SGD_DECAY = 4 };

#define CHUNK 16384
#define LANES 8
/* The loops work SPAN elements at a time and before each span request the memory of the span
 * PREFETCH elements ahead (software prefetch): with the hardware prefetcher alone the passes took
 * 10-20 % longer on 16 M parameters. */
#define SPAN 64
#define PREFETCH 512

/* request the SPAN floats from base[index] (to be written: `write`) */
#define prefetch_span(base, index, write) PREFETCH_SPAN(base, index, SPAN, write)

/* a*b + c: fused where the target has FMA (one rounding, half the instructions) */
#ifdef __FMA__
#define MADD(a, b, c) fmaf(a, b, c)
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif

/* Cephes expf's core: e^x = 2^n e^r with n = round(x / ln2), |r| <= ln2/2 (Cody-Waite reduction,
 * degree-6 polynomial); returns e^r and sets n. NaN stays NaN. */
static inline float exp_reduced(float x, float *n_out) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const float n = (x * 1.44269504088896341f + magic) - magic;
    float r = MADD(n, -0.693359375f, x);
    r = MADD(n, 2.12194440e-4f, r);
    float q = 1.9875691500e-4f;
    q = MADD(q, r, 1.3981999507e-3f);
    q = MADD(q, r, 8.3334519073e-3f);
    q = MADD(q, r, 4.1665795894e-2f);
    q = MADD(q, r, 1.6666665459e-1f);
    q = MADD(q, r, 5.0000001201e-1f);
    *n_out = n;
    return MADD(q, r * r, r) + 1.0f;
}

/* 2^n for an integer n in [-126, 127], from its bits (other n, as from a NaN, give bits the callers
 * discard; unsigned, the shift is defined for them too) */
static inline float pow2i(int32_t n) {
    const uint32_t bits = (uint32_t)(n + 127) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* e^x for |x| <= 87 (an exponent already clipped): no range checks. */
static inline float exp_small(float x) {
    float n;
    const float e = exp_reduced(x, &n);
    return e * pow2i((int32_t)n);
}

/* e^x over the whole range: overflow gives inf, deep underflow 0, and 2^n is applied in two
 * factors so that subnormal results come out. */
static inline float exp_f32(float x) {
    const float hi = 88.72283935546875f, lo = -103.972084045410f;
    float xc = x > hi ? hi : x;
    xc = xc < lo ? lo : xc;
    float n;
    float e = exp_reduced(xc, &n);
    const int32_t ni = (int32_t)n, n1 = ni >> 1;
    e = e * pow2i(n1) * pow2i(ni - n1);
    e = x > hi ? INFINITY : e;
    return x < lo ? 0.0f : e;
}

typedef struct {
    float beta_weight, weight_minus_one, exp_clip, gain_min, gain_max, momentum, eta, sgd_lr, sgd_decay;
    int direct, fresh_velocity, decay, small_weight;
} eg_scalars;

static eg_scalars unpack(const double *s, int64_t flags) {
    eg_scalars e;
    e.beta_weight = (float)(1.0 - s[S_BETA]);
    e.weight_minus_one = e.beta_weight - 1.0f;
    e.small_weight = fabsf(e.beta_weight) < 0.5f;
    e.exp_clip = (float)s[S_EXP_CLIP];
    e.gain_min = (float)s[S_GAIN_MIN];
    e.gain_max = (float)s[S_GAIN_MAX];
    e.momentum = (float)s[S_MOMENTUM];
    e.eta = (float)s[S_ETA];
    e.sgd_lr = (float)s[S_SGD_LR];
    e.sgd_decay = (float)s[S_SGD_DECAY];
    e.direct = (flags & F_DIRECT) != 0;
    e.fresh_velocity = (flags & F_FRESH_VELOCITY) != 0;
    e.decay = (flags & F_SGD_DECAY) != 0;
    return e;
}

/* ---- sums ---- */

/* A chunk's sums run in 16 fp32 lanes (two f32x8 accumulators), 1024 terms each, and the lanes
 * are added in double: closer than the reference's fp32 BLAS sums, which accumulate a whole tensor
 * in fp32 lanes. */
static void chunk_sums(const float *restrict nu, const float *restrict g, const float *restrict m, int64_t n,
                       double *restrict out) {
    f32x8 acc[4][2] = {{{0}}};
    int64_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        if (i % SPAN == 0) {
            prefetch_span(nu, i + PREFETCH, 0);
            prefetch_span(g, i + PREFETCH, 0);
            prefetch_span(m, i + PREFETCH, 0);
        }
        for (int h = 0; h < 2; ++h) {
            const f32x8 a = load_f32x8(nu + i + LANES * h), b = load_f32x8(g + i + LANES * h);
            const f32x8 c = load_f32x8(m + i + LANES * h);
            acc[0][h] += a * b;
            acc[1][h] += a * a;
            acc[2][h] += b * b;
            acc[3][h] += c * c;
        }
    }
    /* the lanes in order, then the tail, in double */
    float lanes[4][2 * LANES];
    double sums[4] = {0, 0, 0, 0};
    memcpy(lanes, acc, sizeof lanes);
    for (int k = 0; k < 4; ++k)
        for (int l = 0; l < 2 * LANES; ++l) sums[k] += lanes[k][l];
    for (; i < n; ++i) {
        const double a = nu[i], b = g[i], c = m[i];
        sums[0] += a * b;
        sums[1] += a * a;
        sums[2] += b * b;
        sums[3] += c * c;
    }
    memcpy(out, sums, sizeof sums);
}

/* out[chunk_base + k] for every chunk k of each task (tasks start at chunk boundaries) */
static void sums_share(const int64_t *tensors, const int64_t *tasks, int64_t n_tasks, double *out) {
    for (int64_t k = 0; k < n_tasks; ++k) {
        const int64_t *task = tasks + k * K_COLUMNS;
        const int64_t *t = tensors + task[K_TENSOR] * T_COLUMNS;
        const float *nu = (const float *)t[T_VELOCITY], *g = (const float *)t[T_GRAD];
        const float *m = (const float *)t[T_AVG_GRAD];
        for (int64_t s = task[K_START]; s < task[K_END]; s += CHUNK) {
            const int64_t n = task[K_END] - s < CHUNK ? task[K_END] - s : CHUNK;
            chunk_sums(nu + s, g + s, m + s, n, out + 4 * (t[T_CHUNK_BASE] + s / CHUNK));
        }
    }
}

/* ---- adapt (and, for a plain SGD base, the whole step) ---- */

/* EG's gains and average gradient at element i: p = clamp(p * exp(clip((c*m)*g))), m = lerp(m, g,
 * 1 - beta) (with no clip, clip = inf); returns the new gain. No `restrict` (see adam_element). */
static inline __attribute__((always_inline)) float gains_and_average(float *p, float *m, int64_t i,
                                                                     float gi, float coef, const eg_scalars *e,
                                                                     const int bounded) {
    const float mi = m[i], clip = e->exp_clip;
    float z = (coef * mi) * gi;
    z = z < -clip ? -clip : z;
    z = z > clip ? clip : z;
    float pi = p[i] * (bounded ? exp_small(z) : exp_f32(z));
    pi = pi < e->gain_min ? e->gain_min : pi;
    pi = pi > e->gain_max ? e->gain_max : pi;
    p[i] = pi;
    m[i] = lerp_f32(mi, gi, e->beta_weight, e->weight_minus_one, e->small_weight);
    return pi;
}

static inline __attribute__((always_inline)) void adapt_span(
    float *restrict theta, const float *restrict g, float *restrict p, float *restrict nu, float *restrict m,
    float *restrict saved, int64_t n, float coef, float scale, const eg_scalars *e, const int direct,
    const int fresh, const int decay, const int bounded) {
    /* local copies: a store through a float pointer cannot alias them (the loop vectorises) */
    const eg_scalars es = *e;
    const float mu = es.momentum, eta = es.eta, lr = es.sgd_lr, wd = es.sgd_decay;
    for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i];
        const float pi = gains_and_average(p, m, i, gi, coef, &es, bounded);
        if (!direct) {
            saved[i] = theta[i];
        } else {
            /* torch.add(g, theta, alpha=wd) fuses its multiply-add */
            const float d = (decay ? MADD(wd, theta[i], gi) : gi) * lr;
            const float v = fresh ? pi * d : nu[i] * mu + (eta * pi) * d;
            nu[i] = v;
            theta[i] = theta[i] + (-v) * scale;
        }
    }
}

/* one loop per setting: a branch on a run-time setting inside the loop stops vectorisation */
static void adapt_setting(float *theta, const float *g, float *p, float *nu, float *m, float *saved, int64_t n,
                          float coef, float scale, const eg_scalars *e, int bounded) {
#define ADAPT(direct, fresh, decay, bounded) \
    adapt_span(theta, g, p, nu, m, saved, n, coef, scale, e, direct, fresh, decay, bounded)
    if (!e->direct)
        bounded ? ADAPT(0, 0, 0, 1) : ADAPT(0, 0, 0, 0);
    else if (e->fresh_velocity && e->decay)
        bounded ? ADAPT(1, 1, 1, 1) : ADAPT(1, 1, 1, 0);
    else if (e->fresh_velocity)
        bounded ? ADAPT(1, 1, 0, 1) : ADAPT(1, 1, 0, 0);
    else if (e->decay)
        bounded ? ADAPT(1, 0, 1, 1) : ADAPT(1, 0, 1, 0);
    else
        bounded ? ADAPT(1, 0, 0, 1) : ADAPT(1, 0, 0, 0);
#undef ADAPT
}

/* ---- apply (after the base step) ---- */

static void apply_span(float *restrict theta, float *restrict nu, const float *restrict p,
                       const float *restrict saved, int64_t n, float scale, float mu, float eta, int fresh) {
    if (fresh) {
        for (int64_t i = 0; i < n; ++i) {
            const float d = saved[i] - theta[i], v = p[i] * d;
            nu[i] = v;
            theta[i] = theta[i] + (d + (-v) * scale);
        }
    } else {
        for (int64_t i = 0; i < n; ++i) {
            const float d = saved[i] - theta[i], v = nu[i] * mu + (eta * p[i]) * d;
            nu[i] = v;
            theta[i] = theta[i] + (d + (-v) * scale);
        }
    }
}

static void apply_share(const int64_t *tensors, const int64_t *tasks, int64_t n_tasks, const double *scalars,
                      int64_t flags) {
    const eg_scalars e = unpack(scalars, flags);
    const float mu = e.momentum, eta = e.eta;
    for (int64_t k = 0; k < n_tasks; ++k) {
        const int64_t *task = tasks + k * K_COLUMNS;
        const int64_t *t = tensors + task[K_TENSOR] * T_COLUMNS;
        const int64_t s = task[K_START], n = task[K_END] - s;
        const float scale = *(const float *)t[T_SCALE];
        float *theta = (float *)t[T_PARAM] + s, *nu = (float *)t[T_VELOCITY] + s;
        const float *p = (const float *)t[T_GAINS] + s, *saved = (const float *)t[T_SAVED] + s;
        for (int64_t i = 0; i < n; i += SPAN) {
            const int64_t a = i + PREFETCH;
            prefetch_span(theta, a, 1);
            prefetch_span(nu, a, 1);
            prefetch_span(p, a, 0);
            prefetch_span(saved, a, 0);
            apply_span(theta + i, nu + i, p + i, saved + i, n - i < SPAN ? n - i : SPAN, scale, mu, eta,
                       e.fresh_velocity);
        }
    }
}

/* ---- adam: gains, average, the base's Adam step and the velocity and parameter, in one pass ---- */

/* The adam pass over n elements: EG's gains and average, the base's proposal q (cpu_adam.c's
 * adam_element, the gradient's sign already EG's), then apply_span's lines with saved = theta. */
static inline __attribute__((always_inline)) void adam_span(
    float *restrict theta, const float *restrict g, float *restrict p, float *restrict nu, float *restrict m,
    float *restrict ma, float *restrict va, int64_t n, float coef, float scale, const eg_scalars *e,
    const adam_scalars *a, const int fresh, const int decay_mode, const int bounded) {
    const eg_scalars es = *e;  /* local copies, as in adapt_span */
    const adam_scalars as = *a;
    const float mu = es.momentum, eta = es.eta;
    for (int64_t i = 0; i < n; ++i) {
        const float gi = g[i], th = theta[i];
        const float pi = gains_and_average(p, m, i, gi, coef, &es, bounded);
        const float q = adam_element(th, gi, ma, va, i, &as, decay_mode);
        const float d = th - q;
        const float v = fresh ? pi * d : nu[i] * mu + (eta * pi) * d;
        nu[i] = v;
        theta[i] = q + (d + (-v) * scale);
    }
}

/* one loop per setting, as adapt_setting */
static void adam_setting(float *theta, const float *g, float *p, float *nu, float *m, float *ma, float *va,
                         int64_t n, float coef, float scale, const eg_scalars *e, const adam_scalars *a,
                         int bounded) {
#define ADAM(fresh, decay_mode, bounded) \
    adam_span(theta, g, p, nu, m, ma, va, n, coef, scale, e, a, fresh, decay_mode, bounded)
#define ADAM_DECAY(fresh, bounded)                                        \
    switch (a->decay_mode) {                                              \
    case DECAY_DECOUPLED: ADAM(fresh, DECAY_DECOUPLED, bounded); break;   \
    case DECAY_COUPLED: ADAM(fresh, DECAY_COUPLED, bounded); break;       \
    default: ADAM(fresh, DECAY_NONE, bounded);                            \
    }
    if (e->fresh_velocity) {
        if (bounded) { ADAM_DECAY(1, 1) } else { ADAM_DECAY(1, 0) }
    } else {
        if (bounded) { ADAM_DECAY(0, 1) } else { ADAM_DECAY(0, 0) }
    }
#undef ADAM_DECAY
#undef ADAM
}

/* The adapt pass (`adam` NULL) or the adam pass (`adam`: the base's scalars, A_*) over one share. */
static void adapt_share(const int64_t *tensors, const int64_t *tasks, int64_t n_tasks, const double *coefs,
                        const double *scalars, const double *adam, int64_t flags) {
    const eg_scalars e = unpack(scalars, flags);
    const adam_scalars a = adam ? adam_unpack(adam[A_LR], adam[A_BETA1], adam[A_BETA2], adam[A_WEIGHT_DECAY],
                                              adam[A_EPS], adam[A_DECOUPLED] != 0.0)
                                : adam_unpack(0, 0, 0, 0, 0, 0);
    /* a clipped exponent needs no range checks in exp */
    const int bounded = e.exp_clip <= 87.0f;
    for (int64_t k = 0; k < n_tasks; ++k) {
        const int64_t *task = tasks + k * K_COLUMNS;
        const int64_t *t = tensors + task[K_TENSOR] * T_COLUMNS;
        const int64_t s = task[K_START], n = task[K_END] - s;
        const float coef = (float)coefs[task[K_TENSOR]], scale = *(const float *)t[T_SCALE];
        float *theta = (float *)t[T_PARAM] + s, *p = (float *)t[T_GAINS] + s, *nu = (float *)t[T_VELOCITY] + s;
        float *m = (float *)t[T_AVG_GRAD] + s, *saved = (float *)t[T_SAVED] + s;
        float *ma = (float *)t[T_EXP_AVG] + s, *va = (float *)t[T_EXP_AVG_SQ] + s;
        const float *g = (const float *)t[T_GRAD] + s;
        for (int64_t i = 0; i < n; i += SPAN) {
            const int64_t span = n - i < SPAN ? n - i : SPAN, ahead = i + PREFETCH;
            prefetch_span(theta, ahead, 1);
            prefetch_span(g, ahead, 0);
            prefetch_span(p, ahead, 1);
            prefetch_span(m, ahead, 1);
            if (adam) {
                prefetch_span(nu, ahead, 1);
                prefetch_span(ma, ahead, 1);
                prefetch_span(va, ahead, 1);
                adam_setting(theta + i, g + i, p + i, nu + i, m + i, ma + i, va + i, span, coef, scale, &e, &a,
                             bounded);
            } else {
                prefetch_span(e.direct ? nu : saved, ahead, 1);
                adapt_setting(theta + i, g + i, p + i, nu + i, m + i, saved + i, span, coef, scale, &e, bounded);
            }
        }
    }
}

/* ---- entry points: every share (rows of `shares`: task table pointer, task count), one per thread ---- */

void optimfx_eg_sums(const int64_t *tensors, const int64_t *shares, int64_t n_shares, double *out) {
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        sums_share(tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], out);
}

void optimfx_eg_adapt(const int64_t *tensors, const int64_t *shares, int64_t n_shares, const double *coefs,
                      const double *scalars, int64_t flags) {
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        adapt_share(tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], coefs, scalars, 0, flags);
}

void optimfx_eg_apply(const int64_t *tensors, const int64_t *shares, int64_t n_shares, const double *scalars,
                      int64_t flags) {
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        apply_share(tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], scalars, flags);
}

void optimfx_eg_adam(const int64_t *tensors, const int64_t *shares, int64_t n_shares, const double *coefs,
                     const double *scalars, const double *adam, int64_t flags) {
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        adapt_share(tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], coefs, scalars, adam, flags);
}

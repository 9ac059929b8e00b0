/* Shared by the CPU kernels (kernels/cpu_*.c). */
#ifndef OPTIMFX_CPU_COMMON_H
#define OPTIMFX_CPU_COMMON_H

#include <math.h>
#include <stdint.h>
#include <string.h>

/* ATen's vectorised lerp, start + w*(end - start), bit for bit: one fused multiply-add from the
 * start for a weight below 0.5, from the end otherwise (exact at w = 1; accurate where start nearly
 * cancels end). `small` (|w| < 0.5) and `w_minus_one` (w - 1, in float) are set once per call. */
static inline float lerp_f32(float start, float end, float w, float w_minus_one, int small) {
    return small ? fmaf(w, end - start, start) : fmaf(w_minus_one, end - start, end);
}

/* ---- one element of ATen's fused Adam step without bias correction (optimfx/reference/aten_fused.py
 * maps AdamW's and AdaX's steps onto it), shared by cpu_adam.c and cpu_eg.c's adam pass ---- */

enum { DECAY_NONE = 0, DECAY_DECOUPLED = 1, DECAY_COUPLED = 2 };

typedef struct {
    float lr, one_minus_beta1, weight_minus_one, beta2, one_minus_beta2, weight_decay, eps, decay;
    int decay_mode, small_weight;
} adam_scalars;

static inline adam_scalars adam_unpack(double lr, double beta1, double beta2, double weight_decay, double eps,
                                       int decoupled) {
    adam_scalars s;
    s.lr = (float)lr;
    s.one_minus_beta1 = (float)(1.0 - beta1);
    s.weight_minus_one = s.one_minus_beta1 - 1.0f;
    s.small_weight = fabsf(s.one_minus_beta1) < 0.5f;
    s.beta2 = (float)beta2;
    s.one_minus_beta2 = (float)(1.0 - beta2);
    s.weight_decay = (float)weight_decay;
    s.eps = (float)eps;
    s.decay = (float)(1.0 - lr * weight_decay);
    /* ATen skips the decay term when it is 0 (an inf parameter stays inf) */
    s.decay_mode = weight_decay == 0.0 ? DECAY_NONE : decoupled ? DECAY_DECOUPLED : DECAY_COUPLED;
    return s;
}

/* The new parameter from p and the (masked, signed) gradient g of element i; writes the moments
 * m[i] and v[i]:
 *     p = p * (1 - lr*wd)  (decoupled)   |   g = g + wd * p  (coupled)
 *     m = lerp(m, g, 1 - b1),  v = b2 * v + (1 - b2) * g * g,  p = p - lr * m / (sqrt(v) + eps)
 * `decay_mode` is a constant in each caller's loop. The pointers are not `restrict` here: GCC 12
 * stops vectorising a caller's loop (restrict pointers of its own) when an inlined helper's are. */
static inline __attribute__((always_inline)) float adam_element(float p, float g, float *m, float *v, int64_t i,
                                                                const adam_scalars *sc, const int decay_mode) {
    if (decay_mode == DECAY_DECOUPLED) p = p * sc->decay;
    if (decay_mode == DECAY_COUPLED) g = g + sc->weight_decay * p;
    const float mi = lerp_f32(m[i], g, sc->one_minus_beta1, sc->weight_minus_one, sc->small_weight);
    const float vi = sc->beta2 * v[i] + sc->one_minus_beta2 * g * g;
    m[i] = mi;
    v[i] = vi;
    return p - sc->lr * mi / (sqrtf(vi) + sc->eps);
}

/* 1 when built with OpenMP (the runtime torch has loaded: the kernels then run their shares on
 * torch's own threads), 0 when the caller runs each share on a thread of its own. */
int optimfx_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ChildTuning's F mask (optimfx/reference/child_tuning.py), bit for bit: pair q = e >> 1 of global
 * element e hashes to 32 bits; element e keeps r = (x >> 16*(e & 1)) & 0xFFFF when (r ^ 0x8000) < T.
 * A span is hashed HASH_BLOCK elements at a time (uint32 lanes), and read as 16-bit halves
 * (little-endian: the low half is the even element). */
#define HASH_BLOCK 2048
#define PAIR_MUL_A 0x85EBCA6Bu
#define PAIR_MUL_B 0xC2B2AE35u
#define PAIR_MUL_C 0x7FEB352Du
#define GOLDEN 0x9E3779B9u

static inline uint32_t xorshift16(uint32_t x) { return x ^ (x >> 16); }

/* hashes of pairs q0 .. q0 + n - 1 (all sharing the high word hi) into h */
static void pair_hashes(uint32_t *restrict h, uint64_t q0, int64_t n, uint32_t k0, uint32_t k1) {
    const uint32_t base = (uint32_t)q0 + k0;
    const uint32_t k1h = k1 ^ ((uint32_t)(q0 >> 32) * GOLDEN);
    for (int64_t j = 0; j < n; ++j) {
        uint32_t x = xorshift16((base + (uint32_t)j) * PAIR_MUL_A);
        x = xorshift16((x + k1h) * PAIR_MUL_B);
        h[j] = xorshift16(x * PAIR_MUL_C);
    }
}

/* The hashes of the pairs of up to n elements from global index `first` into h (HASH_BLOCK / 2 + 2
 * words); returns how many elements they cover: n, or fewer where the pairs' high word changes
 * (a block's pairs share it). Element first + i keeps its half ((const uint16_t *)h)[(first & 1) + i]. */
static inline int64_t hash_block(uint32_t *restrict h, uint64_t first, int64_t n, uint64_t key) {
    const uint64_t q0 = first >> 1, word_end = ((q0 >> 32) + 1) << 32;
    if (((first + (uint64_t)n + 1) >> 1) > word_end) n = (int64_t)(2 * word_end - first);
    pair_hashes(h, q0, (int64_t)(((first + (uint64_t)n + 1) >> 1) - q0), (uint32_t)key, (uint32_t)(key >> 32));
    return n;
}

/* The hashes of elements [first, first + n) into h (n <= HASH_BLOCK; HASH_BLOCK / 2 + 2 words):
 * element first + i keeps its half ((const alias_u16 *)h)[(first & 1) + i]. A span whose pairs
 * change high word restarts at an even element, its pairs following on in h. */
static inline void hash_elements(uint32_t *restrict h, uint64_t first, int64_t n, uint64_t key) {
    for (int64_t done = 0; done < n;) done += hash_block(h + ((first & 1) + done) / 2, first + done, n - done, key);
}

/* The 64-bit key (k1 << 32) | k0 of a tensor's F mask at a step (child_tuning.mask_key): from the
 * tensor's stream number, the seed's low word s0 and the step's word b = mix32(step ^ s1). */
#define MIX_A 0x7FEB352Du
#define MIX_B 0x846CA68Bu

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= MIX_A;
    x ^= x >> 15;
    x *= MIX_B;
    return x ^ (x >> 16);
}

static inline uint64_t f_mask_key(int64_t stream, uint32_t s0, uint32_t b) {
    const uint32_t a = mix32((uint32_t)stream ^ s0);
    return ((uint64_t)mix32((a + b) ^ GOLDEN) << 32) | mix32(a ^ b);
}

/* Request the cache line of base[index] (write: 1 when it will be written). The address is formed
 * in integer arithmetic: it may lie past the end of base's array (a request there reads nothing and
 * cannot fault), where pointer arithmetic would be undefined. */
#define PREFETCH_AT(base, index, write) \
    __builtin_prefetch((const void *)((uintptr_t)(base) + (uintptr_t)(index) * sizeof *(base)), (write))

/* Request the cache lines of base[index .. index + span) (one request per 64-byte line) */
#define PREFETCH_SPAN(base, index, span, write)                                                      \
    do {                                                                                             \
        for (int64_t j_ = 0; j_ < (span); j_ += 64 / (int64_t)sizeof *(base))                        \
            PREFETCH_AT(base, (index) + j_, write);                                                  \
    } while (0)

/* a hash's 16-bit halves, read from (and written into) its uint32 words */
typedef uint16_t alias_u16 __attribute__((may_alias));

/* 8-lane float vectors (GCC/Clang vector extensions, lowered to the target's vector instructions;
 * the compiler keeps a scalar reduction in source order otherwise). */
typedef float f32x8 __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) f32x8 load_f32x8(const float *src) {
    f32x8 v;
    memcpy(&v, src, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void store_f32x8(float *dst, f32x8 v) { memcpy(dst, &v, sizeof v); }

#endif

/* AdaFactor (optimfx/reference/adafactor.py, the paper's eps form) in two or three passes per element,
 * for fp32 or bf16 CPU parameters and gradients (fp32 maths and state; a bf16 parameter is rounded
 * once, to nearest even, as the reference writes it back; NaN as another quiet NaN). Per tensor, with G the gradient (ChildTuning-masked where it is loaded):
 *
 *   pass 1    (reads G, theta)    per block: sum theta^2, the non-finite probe sum (g - g) of the
 *                                 gradient before its mask; for a factored tensor, per row i: its
 *                                 new statistic
 *                                 R'_i = lerp(R_i, sum_j G_ij^2 / n_c + eps1, w), and per block the
 *                                 column sums of G^2 and of G^2 / R'_i (the row again, from cache)
 *   finish 1  (per tensor)        s = max(eps2, RMS(theta));  R <- R',  C <- lerp(C, colsum/n_r + eps1, w);
 *                                 a2_i = min(mean(R)/R_i, 1/tiny),  b2_j = 1/C_j;
 *                                 sum U^2 = sum_i a2_i sum_j G_ij^2 b2_j = mean(R) sum_j b2_j sum_i G_ij^2/R_i
 *                                 (where no a2_i reaches the cap: else pass 2 sums it as written)
 *   pass 2    (reads G)           unfactored: V <- lerp(V, G^2 + eps1, w), sum U^2 = sum (G/sqrt(V))^2;
 *                                 factored, only where a row's a2 is capped: the sum as written above
 *   finish 2  (per tensor)        k = 1/max(1, RMS(U)/d);  a_i = sqrt(a2_i),  b_j = sqrt(b2_j)*k*s
 *   pass 3    (reads G, theta, M) U' = (G*a_i)*b_j  (unfactored: (G/sqrt(V))*k*s);
 *                                 theta <- theta*decay - rho*U',  or with momentum
 *                                 M <- beta1*M + ((1 - beta1)*rho)*U',  theta <- theta*decay - M
 *
 * A ChildTuning mask is applied where the gradient is read (F: the pair hash computed a span
 * ahead of its use, D: the stored bytes); pass 1 keeps a row's masked copy for its second look.
 * A factored tensor's F mask of step t+1 is drawn by pass 3 of step t, whose loads leave the hash
 * its time, and kept as one bit per element (T_KEEPS): pass 1, where the hash's arithmetic was the
 * masked step's extra cost, then reads the bits.
 *
 * A factored tensor [B, n_r, n_c] (leading axes flattened into B) is cut into blocks of whole rows
 * of one slice; an unfactored one into blocks of CHUNK elements. Every sum is taken per block (per
 * row), in fp32 lanes added in double, and the blocks' sums are added in order in the finishes:
 * results do not depend on how the blocks are shared between threads. Work arrives as tasks
 * (tensor, first element, end) that start at block boundaries. Nothing but scratch is written until
 * finish 1 has seen every probe: a step with an inf/NaN gradient changes nothing.
 *
 * No fast-math (IEEE semantics: inf/NaN propagate as in the reference) and no FMA contraction;
 * the only fmaf is ATen's lerp (cpu_common.h). The update equals the reference's ATen ops to
 * rounding: its sums are BLAS/ATen reductions in another order and precision.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "cpu_common.h"

/* one row per tensor of the call, all int64 (pointers as integers) */
enum {
    T_PARAM, T_GRAD,
    T_ROW,      /* R [B, n_r] (factored), or V (unfactored) */
    T_COL,      /* C [B, n_c] (factored), 0 */
    T_EXP_AVG,  /* M, or 0 without momentum */
    T_MASK,     /* ChildTuning-D byte mask, or 0 */
    T_OFFSET, T_KEY, /* ChildTuning-F: global index of the first element, 64-bit key */
    T_NUMEL,
    T_ROWS, T_COLS, /* n_r, n_c of a factored tensor; 0, 0 for an unfactored one */
    T_BLOCK,    /* elements per block: whole rows (factored) or CHUNK */
    T_A,        /* float [B*n_r]: the rows' new statistics R', then a2, then a */
    T_B,        /* float [B*n_c]: column sums, then b2, then b (k*s folded in) */
    T_COLPART,  /* float [n_blocks * 2*n_c]: each block's column sums of G^2 and of G^2/R' (factored) */
    T_PARTS,    /* double [n_blocks * P_COUNT]: each block's partial sums */
    T_SCALARS,  /* double [X_COUNT]: the tensor's scalars from the finishes */
    T_PARAM_BF16, T_GRAD_BF16, /* 1 where the parameter / gradient is bfloat16 (else float32) */
    T_KEEPS,    /* ChildTuning-F, factored: uint64 keep bits of a step's mask (KEEPS_HEADER words, then
                   per row (n_c + 63) / 64 words; bit j of word w: element 64*w + j of the row), or 0 */
    T_NEXT_KEY, /* ChildTuning-F: the key of the next step's mask */
    T_COLUMNS
};
enum { K_TENSOR, K_START, K_END, K_COLUMNS };
enum { P_PARAM_SQ, P_PROBE, P_UPDATE_SQ, P_COUNT };
enum { X_PARAM_SCALE, X_UPDATE_SCALE, X_DECAY, X_UPDATE_SQ, X_SUMMED_IN_PASS_2, X_KEEPS_VALID, X_COUNT };
/* the doubles of `scalars` */
enum { S_WEIGHT, S_EPS1, S_EPS2, S_CLIP, S_STEP, S_LR, S_WEIGHT_DECAY, S_BETA1, S_KEEP_SCALE, S_COUNT };
/* bits of `flags`; the mask mode in bits 8..15, the keep threshold T in bits 16..47 */
enum { F_SCALE_PARAMETER = 1, F_MOMENTUM = 2, F_DECAY_TORCH = 4, F_MAXIMIZE = 8 };
enum { MASK_NONE = 0, MASK_BERNOULLI = 1, MASK_STORED = 2 };
/* the F mask read from its keep bits (passes 1 and 2 of a tensor whose bits are this step's) */
enum { MASK_BITS = 3 };

#define CHUNK 16384
#define PIECE HASH_BLOCK /* elements of a row loaded (and masked) at a time */
#define APPLY_PIECE 512 /* the same in pass 3, which needs no whole row: a bf16 piece converted stays in L1 */
#define LANES 8

/* The F mask's keep bits (T_KEEPS): pass 3 of step t hashes step t+1's mask where it reads memory
 * anyway and stores one bit per element; passes 1, 2 and 3 of step t+1 read the bits instead of
 * hashing. The header holds the key, threshold and first element's global index the bits were drawn
 * for: other bits (a first step, a step skipped or repeated, another seed or reserve_p) are not
 * used, and the mask is hashed. Finish 2 marks the bits as being drawn (KEEPS_UNDRAWN); the host
 * writes the threshold back once pass 3 has returned, so bits a pass 3 left unfinished are never
 * read. */
#define KEEPS_HEADER 3
enum { KEEPS_KEY, KEEPS_THRESHOLD, KEEPS_OFFSET };
#define KEEPS_UNDRAWN (~(uint64_t)0)

typedef struct {
    float weight, weight_minus_one, eps1, neg_step, momentum_coef, beta1, keep_scale;
    float inv_cols; /* of the tensor at hand (pass 1) */
    int small_weight, mask_mode, momentum;
    uint32_t threshold;
} af_scalars;

static af_scalars unpack(const double *s, int64_t flags) {
    af_scalars a;
    a.weight = (float)s[S_WEIGHT];
    a.weight_minus_one = a.weight - 1.0f;
    a.small_weight = fabsf(a.weight) < 0.5f;
    a.eps1 = (float)s[S_EPS1];
    /* maximize negates G: (-G*a)*b is -(G*a*b) exactly, so the sign rides on the step's coefficients */
    const float sign = (flags & F_MAXIMIZE) ? -1.0f : 1.0f;
    a.neg_step = -(float)s[S_STEP] * sign;
    a.momentum_coef = (float)((1.0 - s[S_BETA1]) * s[S_STEP]) * sign;
    a.beta1 = (float)s[S_BETA1];
    a.momentum = (flags & F_MOMENTUM) != 0;
    a.keep_scale = (float)s[S_KEEP_SCALE];
    a.mask_mode = (int)((flags >> 8) & 0xFF);
    a.threshold = (uint32_t)((flags >> 16) & 0x1FFFF);
    return a;
}

/* ---- loading G and theta ---- */

/* a thread's buffers for one piece: the gradient as given (bf16 converted), the parameter (bf16
 * converted, and written back rounded once), the masked gradient (where a pass needs it as an
 * array), and the F mask's hashes (16-bit halves, HASH_BLOCK / 2 + 2 words) */
typedef struct {
    float grad[PIECE], raw[PIECE], param[PIECE];
    uint32_t hashes[HASH_BLOCK / 2 + 2];
} piece_buffers;

/* The ChildTuning mask of one piece (elements [s, s + n) of tensor row t), applied where its
 * gradient is read: F keeps element i when (halves[i] ^ 0x8000) < threshold, scaled by 1/p (or
 * where its keep bit is set); D multiplies by keep[i] (0 or 1). F's hashes are computed a span at a
 * time (hash_span) just before the span is read: the hashing's arithmetic then overlaps the loads
 * of the memory-bound loops. */
typedef struct {
    const alias_u16 *halves;
    const uint8_t *keep;
    uint32_t threshold;
    float scale;
    uint64_t first, key; /* F: the global index of element 0 of the piece, the tensor's key */
    uint32_t *hashes;
    uint64_t *keeps;     /* F: the keep bits of element 0 of the piece (a row's word), or 0 */
    int keeps_valid;     /* F, pass 3: the bits are this step's mask (else it is hashed) */
    uint64_t next_key;   /* F: the next step's key (pass 3 stores that mask's bits) */
} piece_mask;

/* The loops over a row that read memory work HASH_SPAN elements at a time: before each span they
 * request the span PREFETCH elements ahead (gradient, parameter, momentum, D mask) and compute the
 * span's F hashes. Left to the hardware prefetcher alone, the loads waited while the hashing ran:
 * the F-masked step took 1.4-1.6x the unmasked one on 50M parameters, 1.02x with these requests. */
#define HASH_SPAN 64
#define PREFETCH 512

typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef uint8_t u8x8 __attribute__((vector_size(8)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* round to nearest even (c10::BFloat16's rounding, which the reference's write-back applies); a NaN
 * is written as the quiet NaN 0x7FC0 (ATen's vectorised copy writes another NaN pattern) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return f != f ? (uint16_t)0x7FC0 : (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* the gradient of elements [s, s + n) of tensor row t (n <= PIECE) as given, in fp32 */
static inline const float *load_raw(const int64_t *t, int64_t s, int64_t n, piece_buffers *buf) {
    if (!t[T_GRAD_BF16]) return (const float *)t[T_GRAD] + s;
    const uint16_t *restrict h = (const uint16_t *)t[T_GRAD] + s;
    for (int64_t i = 0; i < n; ++i) buf->raw[i] = bf16_to_f32(h[i]);
    return buf->raw;
}

/* the mask of elements [s, s + n) (n <= PIECE): D's bytes, or F's key and where its hashes go */
static inline piece_mask mask_of(const int64_t *t, int64_t s, piece_buffers *buf, const af_scalars *a) {
    piece_mask m = {0, 0, a->threshold, a->keep_scale, 0, 0, 0, 0, 0, 0};
    if (a->mask_mode == MASK_BERNOULLI) {
        m.first = (uint64_t)(t[T_OFFSET] + s);
        m.key = (uint64_t)t[T_KEY];
        m.hashes = buf->hashes;
        m.halves = (const alias_u16 *)buf->hashes + (m.first & 1);
        if (t[T_KEEPS] != 0) {
            const int64_t cols = t[T_COLS], words = (cols + 63) / 64;
            m.keeps = (uint64_t *)t[T_KEEPS] + KEEPS_HEADER + (s / cols) * words + (s % cols) / 64;
            m.next_key = (uint64_t)t[T_NEXT_KEY];
        }
    } else if (a->mask_mode == MASK_STORED && t[T_MASK] != 0) {
        m.keep = (const uint8_t *)t[T_MASK] + s;
    }
    return m;
}

/* F: whether the tensor's keep bits are this step's mask (until finish 2 marks the next's) */
static inline int keeps_drawn_for(const int64_t *t, const af_scalars *a) {
    const uint64_t *keeps = (const uint64_t *)t[T_KEEPS];
    return keeps[KEEPS_KEY] == (uint64_t)t[T_KEY] && keeps[KEEPS_THRESHOLD] == a->threshold &&
           keeps[KEEPS_OFFSET] == (uint64_t)t[T_OFFSET];
}

/* F: the hashes of elements [i, i + n) of the piece into m->hashes (i even: every span starts at a
 * multiple of HASH_SPAN, so its halves follow on from those before it) */
static inline void hash_span(const piece_mask *m, int64_t i, int64_t n) {
    hash_elements(m->hashes + i / 2, m->first + (uint64_t)i, n, m->key);
}

/* F: the keep halves of elements [i, i + n) of the piece (i a multiple of 64, n <= 64), as
 * hash_span leaves them: from the step's keep bits where they are valid, else hashed. A kept
 * element's half is 0x8000 (0 < T), a dropped one's 0x7FFF (0xFFFF >= T unless every element is
 * kept, T = 2^16, when no bit is 0). */
static inline void span_keeps(const piece_mask *m, int64_t i, int64_t n) {
    if (!m->keeps_valid) {
        hash_span(m, i, n);
        return;
    }
    alias_u16 *h = (alias_u16 *)m->halves + i;
    const uint64_t word = m->keeps[i / 64];
    const u16x16 lane_bit = {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768};
    const u16x16 zero = {0};
    for (int64_t j = 0; j < n; j += 16) { /* up to 15 halves past n: the buffer has room */
        const u16x16 bits = zero + (uint16_t)(word >> j);
        /* a set bit's lane compares as all ones: 0x7FFF - 0xFFFF = 0x8000 (mod 2^16) */
        const u16x16 halves = (zero + 0x7FFF) - (u16x16)((bits & lane_bit) == lane_bit);
        memcpy(h + j, &halves, sizeof halves);
    }
}

/* bit j: whether element j of n (<= 64) is kept, from its half */
static inline uint64_t pack_keeps(const alias_u16 *halves, int64_t n, uint32_t threshold) {
    if (threshold > 0xFFFFu) return n == 64 ? ~(uint64_t)0 : ((uint64_t)1 << n) - 1; /* all kept */
    uint64_t word = 0;
    int64_t j = 0;
#if defined(__AVX2__)
    /* (h ^ 0x8000) < T unsigned is (int16)h < (int16)(T ^ 0x8000) signed */
    const __m256i bound = _mm256_set1_epi16((short)(threshold ^ 0x8000u));
    for (; j + 32 <= n; j += 32) {
        const __m256i a = _mm256_cmpgt_epi16(bound, _mm256_loadu_si256((const __m256i *)(halves + j)));
        const __m256i b = _mm256_cmpgt_epi16(bound, _mm256_loadu_si256((const __m256i *)(halves + j + 16)));
        const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packs_epi16(a, b), 0xD8); /* in order */
        word |= (uint64_t)(uint32_t)_mm256_movemask_epi8(bytes) << j;
    }
#else
    /* eight 0/1 bytes to eight bits: the product's top byte gathers byte k's bit at bit k (byte k
     * is bits 8k.. of v on a little-endian machine, the only kind cpu_adafactor.available() takes) */
    for (; j + 8 <= n; j += 8) {
        uint8_t kept[8];
        for (int l = 0; l < 8; ++l) kept[l] = ((uint32_t)halves[j + l] ^ 0x8000u) < threshold;
        uint64_t v;
        memcpy(&v, kept, sizeof v);
        word |= ((v * 0x0102040810204080ull) >> 56) << j;
    }
#endif
    for (; j < n; ++j) word |= (uint64_t)(((uint32_t)halves[j] ^ 0x8000u) < threshold) << j;
    return word;
}

/* F, pass 3: the next step's keep bits of elements [i, i + n) of the piece, into their word */
static inline void store_next_keeps(const piece_mask *m, int64_t i, int64_t n) {
    uint32_t h[HASH_SPAN / 2 + 2];
    const uint64_t first = m->first + (uint64_t)i;
    hash_elements(h, first, n, m->next_key);
    m->keeps[i / 64] = pack_keeps((const alias_u16 *)h + (first & 1), n, m->threshold);
}

/* The masked G of element i (F: 0 + (keep ? 1/p : 0)*g, D: g*M, as the reference's masks bit for
 * bit), `mode` a constant of the caller: MASK_NONE, MASK_BERNOULLI (F from the hashes), MASK_BITS
 * (F from the keep bits) or MASK_STORED (D with a mask). */
static inline __attribute__((always_inline)) float masked(const float *g, const piece_mask *m, int64_t i,
                                                           const int mode) {
    if (mode == MASK_BERNOULLI) return 0.0f + ((((uint32_t)m->halves[i] ^ 0x8000u) < m->threshold) ? m->scale : 0.0f) * g[i];
    if (mode == MASK_BITS) return 0.0f + (((m->keeps[i / 64] >> (i % 64)) & 1) ? m->scale : 0.0f) * g[i];
    if (mode == MASK_STORED) return g[i] * (float)m->keep[i];
    return g[i];
}

/* the same for elements i .. i + 7 */
static inline __attribute__((always_inline)) f32x8 masked_f32x8(const float *g, const piece_mask *m, int64_t i,
                                                                 const int mode) {
    const f32x8 gv = load_f32x8(g + i);
    if (mode == MASK_BERNOULLI) {
        u16x8 h;
        memcpy(&h, m->halves + i, sizeof h);
        const u32x8 threshold = {0}, r = __builtin_convertvector(h, u32x8) ^ 0x8000u;
        const i32x8 keep = r < threshold + m->threshold;
        const f32x8 zero = {0}, scale = zero + m->scale;
        return zero + (f32x8)(keep & (i32x8)scale) * gv;
    }
    if (mode == MASK_BITS) { /* i is a multiple of 8: its byte of the word */
        const i32x8 zero_i = {0}, lane_bit = {1, 2, 4, 8, 16, 32, 64, 128};
        const i32x8 keep = ((zero_i + (int32_t)((m->keeps[i / 64] >> (i % 64)) & 0xFF)) & lane_bit) != 0;
        const f32x8 zero = {0}, scale = zero + m->scale;
        return zero + (f32x8)(keep & (i32x8)scale) * gv;
    }
    if (mode == MASK_STORED) {
        u8x8 k;
        memcpy(&k, m->keep + i, sizeof k);
        /* widened through 16 and 32 bits: GCC converts a u8x8 straight to floats one lane at a time */
        return gv * __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(k, u16x8), i32x8), f32x8);
    }
    return gv;
}

/* the mode `masked` takes for this tensor */
static inline int mask_mode_of(const int64_t *t, const af_scalars *a) {
    return a->mask_mode == MASK_STORED && t[T_MASK] == 0 ? MASK_NONE : a->mask_mode;
}

/* G of elements [s, s + n) as an array: the gradient itself, or its masked copy in buf->grad
 * (the loops that are not on the hot path: vectors, pass 2, a second look at a row longer than a
 * piece) */
static inline const float *load_grad(const int64_t *t, int64_t s, int64_t n, piece_buffers *buf,
                                     const af_scalars *a) {
    const float *raw = load_raw(t, s, n, buf);
    const int mode = mask_mode_of(t, a);
    if (mode == MASK_NONE) return raw;
    const piece_mask m = mask_of(t, s, buf, a);
    float *restrict out = buf->grad;
    if (mode == MASK_BERNOULLI && m.keeps != 0 && keeps_drawn_for(t, a)) { /* passes 1 and 2 */
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) store_f32x8(out + i, masked_f32x8(raw, &m, i, MASK_BITS));
        for (; i < n; ++i) out[i] = masked(raw, &m, i, MASK_BITS);
    } else if (mode == MASK_BERNOULLI) {
        hash_span(&m, 0, n);
        for (int64_t i = 0; i < n; ++i) out[i] = masked(raw, &m, i, MASK_BERNOULLI);
    } else
        for (int64_t i = 0; i < n; ++i) out[i] = masked(raw, &m, i, MASK_STORED);
    return out;
}

/* theta of elements [s, s + n) in fp32: the parameter itself, or its bf16 values converted */
static inline float *load_param(const int64_t *t, int64_t s, int64_t n, piece_buffers *buf) {
    if (!t[T_PARAM_BF16]) return (float *)t[T_PARAM] + s;
    const uint16_t *restrict h = (const uint16_t *)t[T_PARAM] + s;
    for (int64_t i = 0; i < n; ++i) buf->param[i] = bf16_to_f32(h[i]);
    return buf->param;
}

/* a bf16 parameter's updated piece, rounded once into its storage (an fp32 one was written in place) */
static inline void store_param(const int64_t *t, int64_t s, int64_t n, const piece_buffers *buf) {
    if (!t[T_PARAM_BF16]) return;
    uint16_t *restrict h = (uint16_t *)t[T_PARAM] + s;
    for (int64_t i = 0; i < n; ++i) h[i] = f32_to_bf16(buf->param[i]);
}

static inline double lane_total(f32x8 v) {
    float lanes[LANES];
    store_f32x8(lanes, v);
    double total = 0.0;
    for (int l = 0; l < LANES; ++l) total += lanes[l];
    return total;
}

static inline int64_t n_blocks(const int64_t *t) { return (t[T_NUMEL] + t[T_BLOCK] - 1) / t[T_BLOCK]; }

/* ---- pass 1 ---- */

/* sums of one piece of raw gradient g (masked as it is read, and then stored in `out` when a mask is
 * on): G^2 into *row (and into colpart when given), theta^2 into *param_sq, and the probe g - g of
 * the gradient as the user gave it (the reference checks it before any mask: a finite gradient
 * that a mask's 1/p scales past the float range is stepped, as there) into *probe */
static inline __attribute__((always_inline)) void piece_sums(
    const float *restrict g, const piece_mask *m, const float *restrict p, float *restrict colpart,
    float *restrict out, int64_t n, double *row, double *param_sq, double *probe, const int mode) {
    f32x8 acc_g = {0}, acc_p = {0}, acc_probe = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) {
        if (i % HASH_SPAN == 0) {
            PREFETCH_SPAN(g, i + PREFETCH, HASH_SPAN, 0);
            PREFETCH_SPAN(p, i + PREFETCH, HASH_SPAN, 0);
            if (mode == MASK_BERNOULLI) span_keeps(m, i, n - i < HASH_SPAN ? n - i : HASH_SPAN);
            if (mode == MASK_STORED) PREFETCH_SPAN(m->keep, i + PREFETCH, HASH_SPAN, 0);
        }
        const f32x8 rv = load_f32x8(g + i), gv = masked_f32x8(g, m, i, mode), pv = load_f32x8(p + i), g2 = gv * gv;
        if (mode != MASK_NONE) store_f32x8(out + i, gv);
        acc_g += g2;
        acc_p += pv * pv;
        acc_probe += rv - rv;
        if (colpart) store_f32x8(colpart + i, load_f32x8(colpart + i) + g2);
    }
    double sg = lane_total(acc_g), sp = lane_total(acc_p), sprobe = lane_total(acc_probe);
    if (mode == MASK_BERNOULLI && i % HASH_SPAN == 0 && i < n) span_keeps(m, i, n - i);
    for (; i < n; ++i) {
        const float gi = masked(g, m, i, mode), g2 = gi * gi;
        if (mode != MASK_NONE) out[i] = gi;
        sg += g2;
        sp += p[i] * p[i];
        sprobe += g[i] - g[i];
        if (colpart) colpart[i] += g2;
    }
    *row += sg;
    *param_sq += sp;
    *probe += sprobe;
}

/* the new statistic of row r and its share of the block's column sums of G^2 / R' */
static inline __attribute__((always_inline)) void pass1_row(
    const int64_t *t, int64_t r, const af_scalars *a, piece_buffers *buf, float *colpart, double *param_sq,
    double *probe, const int mode) {
    const int64_t cols = t[T_COLS];
    double row = 0.0;
    const float *g = 0;
    for (int64_t c = 0; c < cols; c += PIECE) {
        const int64_t n = cols - c < PIECE ? cols - c : PIECE, s = r * cols + c;
        const piece_mask m = mask_of(t, s, buf, a);
        g = load_raw(t, s, n, buf);
        piece_sums(g, &m, load_param(t, s, n, buf), colpart + c, buf->grad, n, &row, param_sq, probe, mode);
    }
    const float stat = lerp_f32(((const float *)t[T_ROW])[r], (float)row * a->inv_cols + a->eps1, a->weight,
                                a->weight_minus_one, a->small_weight);
    ((float *)t[T_A])[r] = stat;
    const float inv = 1.0f / stat;
    float *restrict scaled = colpart + cols;
    /* the row again: a row of one piece from cache (its masked copy), a longer one loaded again */
    const float *restrict gm = mode == MASK_NONE ? g : buf->grad;
    for (int64_t c = 0; c < cols; c += PIECE) {
        const int64_t n = cols - c < PIECE ? cols - c : PIECE;
        if (cols > PIECE) gm = load_grad(t, r * cols + c, n, buf, a);
        for (int64_t i = 0; i < n; ++i) scaled[c + i] += (gm[i] * gm[i]) * inv;
    }
}

static void pass1_rows(const int64_t *t, int64_t r0, int64_t r1, const af_scalars *a, piece_buffers *buf,
                       float *colpart, double *param_sq, double *probe) {
#define ROWS(mode) for (int64_t r = r0; r < r1; ++r) pass1_row(t, r, a, buf, colpart, param_sq, probe, mode)
    switch (mask_mode_of(t, a)) {
    case MASK_BERNOULLI:
        if (t[T_KEEPS] != 0 && keeps_drawn_for(t, a)) ROWS(MASK_BITS);
        else ROWS(MASK_BERNOULLI);
        break;
    case MASK_STORED: ROWS(MASK_STORED); break;
    default: ROWS(MASK_NONE);
    }
#undef ROWS
}

static void pass1_block(const int64_t *t, int64_t block, const af_scalars *a, piece_buffers *buf) {
    const int64_t size = t[T_BLOCK], s0 = block * size;
    const int64_t e0 = s0 + size < t[T_NUMEL] ? s0 + size : t[T_NUMEL];
    double *parts = (double *)t[T_PARTS] + block * P_COUNT;
    double param_sq = 0.0, probe = 0.0;
    const int64_t cols = t[T_COLS];
    if (cols == 0) {
        double unused = 0.0;
        const piece_mask none = {0};
        for (int64_t s = s0; s < e0; s += PIECE) {
            const int64_t n = e0 - s < PIECE ? e0 - s : PIECE;
            const float *g = load_raw(t, s, n, buf), *p = load_param(t, s, n, buf);
            /* Σθ² and the probe (a vector's G^2 is summed in pass 2, masked there) */
            piece_sums(g, &none, p, 0, 0, n, &unused, &param_sq, &probe, MASK_NONE);
        }
    } else {
        af_scalars row_scalars = *a;
        row_scalars.inv_cols = (float)(1.0 / (double)cols);
        float *colpart = (float *)t[T_COLPART] + block * 2 * cols;
        memset(colpart, 0, (size_t)(2 * cols) * sizeof(float));
        pass1_rows(t, s0 / cols, e0 / cols, &row_scalars, buf, colpart, &param_sq, &probe);
    }
    parts[P_PARAM_SQ] = param_sq;
    parts[P_PROBE] = probe;
}

/* ---- pass 2 ---- */

static void pass2_block(const int64_t *t, int64_t block, const af_scalars *a, piece_buffers *buf) {
    const int64_t size = t[T_BLOCK], s0 = block * size;
    const int64_t e0 = s0 + size < t[T_NUMEL] ? s0 + size : t[T_NUMEL];
    const int64_t cols = t[T_COLS];
    if (cols != 0 && ((const double *)t[T_SCALARS])[X_SUMMED_IN_PASS_2] == 0.0) return;
    double total = 0.0;
    if (cols == 0) {
        float *restrict v = (float *)t[T_ROW];
        const float w = a->weight, wm1 = a->weight_minus_one, eps1 = a->eps1;
        const int small = a->small_weight;
        for (int64_t s = s0; s < e0; s += PIECE) {
            const int64_t n = e0 - s < PIECE ? e0 - s : PIECE;
            const float *restrict g = load_grad(t, s, n, buf, a);
            float *restrict vs = v + s;
            float u2[PIECE];
            for (int64_t i = 0; i < n; ++i) {
                const float vi = lerp_f32(vs[i], g[i] * g[i] + eps1, w, wm1, small);
                const float u = (1.0f / sqrtf(vi)) * g[i];
                vs[i] = vi;
                u2[i] = u * u;
            }
            f32x8 acc = {0};
            int64_t i = 0;
            for (; i + LANES <= n; i += LANES) acc += load_f32x8(u2 + i);
            double piece = lane_total(acc);
            for (; i < n; ++i) piece += u2[i];
            total += piece;
        }
    } else {
        const float *restrict a2 = (const float *)t[T_A], *restrict b2_all = (const float *)t[T_B];
        const int64_t rows = t[T_ROWS];
        for (int64_t r = s0 / cols; r < e0 / cols; ++r) {
            const float *restrict b2 = b2_all + (r / rows) * cols;
            double row = 0.0;
            for (int64_t c = 0; c < cols; c += PIECE) {
                const int64_t n = cols - c < PIECE ? cols - c : PIECE;
                const float *restrict g = load_grad(t, r * cols + c, n, buf, a);
                f32x8 acc = {0};
                int64_t i = 0;
                for (; i + LANES <= n; i += LANES) {
                    const f32x8 gv = load_f32x8(g + i);
                    acc += (gv * gv) * load_f32x8(b2 + c + i);
                }
                double piece = lane_total(acc);
                for (; i < n; ++i) piece += (g[i] * g[i]) * b2[c + i];
                row += piece;
            }
            total += (double)a2[r] * (double)(float)row;
        }
    }
    ((double *)t[T_PARTS])[block * P_COUNT + P_UPDATE_SQ] = total;
}

/* ---- pass 3 ---- */

static inline __attribute__((always_inline)) void apply_piece(
    float *restrict p, float *restrict m, const float *restrict g, const piece_mask *mk, const float *restrict b,
    float a_i, float b_all, int64_t n, float decay, const af_scalars *a, const int momentum, const int decayed,
    const int per_column, const int mode) {
    const float neg_step = a->neg_step, coef = a->momentum_coef, beta1 = a->beta1;
    /* ATen's addcmul(x, u, v, value=c) is x + (c*u)*v, with u = G*a_i (or U) and v = b_j (or k*s) */
    for (int64_t i = 0; i < n; ++i) {
        const float u = masked(g, mk, i, mode) * a_i, v = per_column ? b[i] : b_all;
        float pi = p[i];
        if (decayed) pi = pi * decay;
        if (momentum) {
            const float mi = m[i] * beta1 + (coef * u) * v;
            m[i] = mi;
            p[i] = pi - mi;
        } else {
            p[i] = pi + (neg_step * u) * v;
        }
    }
}

/* one loop per setting: a branch on a run-time setting inside a loop stops vectorisation */
#define APPLY(mo, de, pc, mode) apply_piece(p, m, g, mk, b, a_i, b_all, n, decay, a, mo, de, pc, mode)
#define BY_SETTINGS(pc, mode)                                                                          \
    (a->momentum ? (decayed ? APPLY(1, 1, pc, mode) : APPLY(1, 0, pc, mode))                          \
                 : (decayed ? APPLY(0, 1, pc, mode) : APPLY(0, 0, pc, mode)))

/* a piece of a row of a factored tensor: U' = (G*a_i)*b_j, G masked as it is read */
static void apply_row_piece(float *p, float *m, const float *g, const piece_mask *mk, const float *b, float a_i,
                            int64_t n, float decay, const af_scalars *a, int decayed, int mode) {
    const float b_all = 1.0f;
    if (mode == MASK_BERNOULLI) BY_SETTINGS(1, MASK_BERNOULLI);
    else if (mode == MASK_STORED) BY_SETTINGS(1, MASK_STORED);
    else BY_SETTINGS(1, MASK_NONE);
}

/* the same a span at a time: the span PREFETCH elements ahead requested, this span's F hashes
 * computed just before it is read */
static void apply_row(float *p, float *m, const float *g, const piece_mask *mk, const float *b, float a_i, int64_t n,
                      float decay, const af_scalars *a, int decayed, int mode) {
    if (mode == MASK_NONE) {
        apply_row_piece(p, m, g, mk, b, a_i, n, decay, a, decayed, mode);
        return;
    }
    for (int64_t i = 0; i < n; i += HASH_SPAN) {
        const int64_t k = n - i < HASH_SPAN ? n - i : HASH_SPAN;
        PREFETCH_SPAN(g, i + PREFETCH, HASH_SPAN, 0);
        PREFETCH_SPAN(p, i + PREFETCH, HASH_SPAN, 1);
        if (m) PREFETCH_SPAN(m, i + PREFETCH, HASH_SPAN, 1);
        if (mode == MASK_STORED) PREFETCH_SPAN(mk->keep, i + PREFETCH, HASH_SPAN, 0);
        piece_mask span = *mk;
        if (mode == MASK_BERNOULLI) {
            span_keeps(mk, i, k);
            span.halves += i;
            if (mk->keeps) store_next_keeps(mk, i, k); /* this span's bits were read just before */
        } else if (mode == MASK_STORED) {
            span.keep += i;
        }
        apply_row_piece(p + i, m ? m + i : 0, g + i, &span, b + i, a_i, k, decay, a, decayed, mode);
    }
}

/* a piece of an unfactored tensor, whose U = G/sqrt(V) is given: U' = U*(k*s) */
static void apply_scaled_piece(float *p, float *m, const float *g, float b_all, int64_t n, float decay,
                               const af_scalars *a, int decayed) {
    const piece_mask *mk = 0;
    const float *b = 0, a_i = 1.0f;
    BY_SETTINGS(0, MASK_NONE);
}
#undef BY_SETTINGS
#undef APPLY

static void pass3_block(const int64_t *t, int64_t block, const af_scalars *a, piece_buffers *buf) {
    const int64_t size = t[T_BLOCK], s0 = block * size;
    const int64_t e0 = s0 + size < t[T_NUMEL] ? s0 + size : t[T_NUMEL];
    const int64_t cols = t[T_COLS];
    const double *x = (const double *)t[T_SCALARS];
    const float decay = (float)x[X_DECAY];
    const int decayed = decay != 1.0f;
    float *m = (float *)t[T_EXP_AVG];
    if (cols == 0) {
        const float *restrict v = (const float *)t[T_ROW];
        const float scale = (float)x[X_UPDATE_SCALE];
        float u[PIECE];
        for (int64_t s = s0; s < e0; s += PIECE) {
            const int64_t n = e0 - s < PIECE ? e0 - s : PIECE;
            const float *restrict g = load_grad(t, s, n, buf, a);
            for (int64_t i = 0; i < n; ++i) u[i] = (1.0f / sqrtf(v[s + i])) * g[i];
            apply_scaled_piece(load_param(t, s, n, buf), m ? m + s : 0, u, scale, n, decay, a, decayed);
            store_param(t, s, n, buf);
        }
        return;
    }
    const float *a_all = (const float *)t[T_A], *b_all = (const float *)t[T_B];
    const int64_t rows = t[T_ROWS];
    const int mode = mask_mode_of(t, a);
    for (int64_t r = s0 / cols; r < e0 / cols; ++r) {
        const float *b = b_all + (r / rows) * cols;
        for (int64_t c = 0; c < cols; c += APPLY_PIECE) {
            const int64_t n = cols - c < APPLY_PIECE ? cols - c : APPLY_PIECE, s = r * cols + c;
            piece_mask mk = mask_of(t, s, buf, a);
            mk.keeps_valid = mk.keeps != 0 && x[X_KEEPS_VALID] != 0.0;
            apply_row(load_param(t, s, n, buf), m ? m + s : 0, load_raw(t, s, n, buf), &mk, b + c, a_all[r], n,
                      decay, a, decayed, mode);
            store_param(t, s, n, buf);
        }
    }
}

/* ---- finishes (per tensor) ---- */

/* the parameter scale; for a factored tensor the statistics' update, a2, b2 and sum U^2 (or the
 * mark that pass 2 sums it); returns whether the tensor takes pass 2 */
static int finish1(const int64_t *t, const double *s, int64_t flags) {
    const int64_t blocks = n_blocks(t), numel = t[T_NUMEL], cols = t[T_COLS], rows = t[T_ROWS];
    const double *parts = (const double *)t[T_PARTS];
    double *x = (double *)t[T_SCALARS];
    double param_sq = 0.0;
    for (int64_t k = 0; k < blocks; ++k) param_sq += parts[k * P_COUNT + P_PARAM_SQ];
    const float rms = (float)sqrt(param_sq / (double)numel);
    const float eps2 = (float)s[S_EPS2];
    /* the comparisons keep a NaN, as the reference's clamps do */
    x[X_PARAM_SCALE] = (flags & F_SCALE_PARAMETER) ? (rms < eps2 ? eps2 : rms) : 1.0f;
    x[X_SUMMED_IN_PASS_2] = 1.0;
    if (cols == 0) return 1;
    const float w = (float)s[S_WEIGHT], wm1 = w - 1.0f, eps1 = (float)s[S_EPS1];
    const int small = fabsf(w) < 0.5f;
    const float inv_rows = (float)(1.0 / (double)rows);
    const float cap = 1.0f / 1.17549435e-38f; /* 1/tiny: mean(R)/R_i stays finite for a zero row */
    const int64_t slices = numel / (rows * cols), per_slice = blocks / slices;
    const float *colpart = (const float *)t[T_COLPART];
    float *row_stat = (float *)t[T_ROW], *col_stat = (float *)t[T_COL];
    float *a2 = (float *)t[T_A], *b2 = (float *)t[T_B];
    double update_sq = 0.0;
    int capped = 0;
    for (int64_t sl = 0; sl < slices; ++sl) {
        float *bs = b2 + sl * cols, *cs = col_stat + sl * cols;
        const float *first = colpart + sl * per_slice * 2 * cols;
        double slice_sq = 0.0;
        /* the blocks' column sums in order, PIECE columns at a time */
        for (int64_t c0 = 0; c0 < cols; c0 += PIECE) {
            const int64_t n = cols - c0 < PIECE ? cols - c0 : PIECE;
            float scaled[PIECE];
            memcpy(bs + c0, first + c0, (size_t)n * sizeof(float));
            memcpy(scaled, first + cols + c0, (size_t)n * sizeof(float));
            for (int64_t k = 1; k < per_slice; ++k) {
                const float *part = first + k * 2 * cols;
                for (int64_t j = 0; j < n; ++j) {
                    bs[c0 + j] += part[c0 + j];
                    scaled[j] += part[cols + c0 + j];
                }
            }
            for (int64_t j = 0; j < n; ++j) {
                const float c = lerp_f32(cs[c0 + j], bs[c0 + j] * inv_rows + eps1, w, wm1, small);
                cs[c0 + j] = c;
                bs[c0 + j] = 1.0f / c;
                slice_sq += (double)(bs[c0 + j] * scaled[j]);
            }
        }
        float *as = a2 + sl * rows, *rs = row_stat + sl * rows;
        double total = 0.0;
        for (int64_t i = 0; i < rows; ++i) {
            rs[i] = as[i];
            total += as[i];
        }
        const float mean = (float)(total / (double)rows);
        for (int64_t i = 0; i < rows; ++i) {
            const float q = mean / rs[i];
            capped |= q > cap;
            as[i] = q > cap ? cap : q;
        }
        update_sq += (double)mean * slice_sq;
    }
    x[X_UPDATE_SQ] = update_sq;
    x[X_SUMMED_IN_PASS_2] = capped;
    return capped;
}

/* the clip, and the per-row / per-column factors of the update */
static void finish2(const int64_t *t, const double *s, int64_t flags) {
    const int64_t blocks = n_blocks(t), numel = t[T_NUMEL], cols = t[T_COLS], rows = t[T_ROWS];
    const double *parts = (const double *)t[T_PARTS];
    double *x = (double *)t[T_SCALARS];
    double total = x[X_UPDATE_SQ];
    if (x[X_SUMMED_IN_PASS_2] != 0.0) {
        total = 0.0;
        for (int64_t k = 0; k < blocks; ++k) total += parts[k * P_COUNT + P_UPDATE_SQ];
    }
    const float clip = (float)(total / ((double)numel * s[S_CLIP] * s[S_CLIP]));
    const float inv_clip = 1.0f / sqrtf(clip < 1.0f ? 1.0f : clip);
    const float pscale = (float)x[X_PARAM_SCALE], scale = inv_clip * pscale;
    x[X_UPDATE_SCALE] = scale;
    const af_scalars sc = unpack(s, flags);
    if (sc.mask_mode == MASK_BERNOULLI && t[T_KEEPS] != 0) {
        /* the step is taken: pass 3 reads this step's bits, if they are, and draws the next's */
        uint64_t *keeps = (uint64_t *)t[T_KEEPS];
        x[X_KEEPS_VALID] = keeps_drawn_for(t, &sc);
        keeps[KEEPS_KEY] = (uint64_t)t[T_NEXT_KEY];
        keeps[KEEPS_THRESHOLD] = KEEPS_UNDRAWN; /* the host writes the threshold after pass 3 */
        keeps[KEEPS_OFFSET] = (uint64_t)t[T_OFFSET];
    }
    /* HF/fairseq: theta -= lambda*alpha_t*theta with alpha_t = rho*s; torch: theta *= 1 - lr*lambda */
    const double wd = s[S_WEIGHT_DECAY];
    x[X_DECAY] = wd == 0.0 ? 1.0
                 : (flags & F_DECAY_TORCH) ? (double)(float)(1.0 - wd * s[S_LR])
                                           : (double)(1.0f - (float)wd * (pscale * (float)s[S_STEP]));
    if (cols == 0) return;
    const int64_t slices = numel / (rows * cols);
    float *a = (float *)t[T_A], *b = (float *)t[T_B];
    for (int64_t i = 0; i < slices * rows; ++i) a[i] = sqrtf(a[i]);
    for (int64_t j = 0; j < slices * cols; ++j) b[j] = sqrtf(b[j]) * scale;
}

/* ---- entry points ---- */

static void pass_share(int pass, const int64_t *tensors, const int64_t *tasks, int64_t n_tasks, const af_scalars *a) {
    piece_buffers buf;
    for (int64_t k = 0; k < n_tasks; ++k) {
        const int64_t *task = tasks + k * K_COLUMNS;
        const int64_t *t = tensors + task[K_TENSOR] * T_COLUMNS;
        const int64_t size = t[T_BLOCK];
        for (int64_t block = task[K_START] / size; block * size < task[K_END]; ++block) {
            if (pass == 1) pass1_block(t, block, a, &buf);
            else if (pass == 2) pass2_block(t, block, a, &buf);
            else pass3_block(t, block, a, &buf);
        }
    }
}

/* Pass 1, 2 or 3 of every share (rows of `shares`: task table pointer, task count), one per thread. */
void optimfx_adafactor_pass(const int64_t *tensors, const int64_t *shares, int64_t n_shares, int64_t pass,
                            const double *scalars, int64_t flags) {
    const af_scalars a = unpack(scalars, flags);
#pragma omp parallel for num_threads((int)n_shares) schedule(static, 1)
    for (int64_t k = 0; k < n_shares; ++k)
        pass_share((int)pass, tensors, (const int64_t *)shares[2 * k], shares[2 * k + 1], &a);
}

/* Finish 1 or 2 of tensors [0, n_tensors), on up to `threads` threads. Finish 1 first checks every
 * probe when `check` is set, and returns -1, having written nothing, when a gradient holds inf/NaN;
 * else the number of tensors that take pass 2. Finish 2 returns 0. */
int64_t optimfx_adafactor_finish(const int64_t *tensors, int64_t n_tensors, int64_t finish, const double *scalars,
                                 int64_t flags, int64_t check, int64_t threads) {
    if (finish == 1 && check) {
        double probe = 0.0;
        for (int64_t k = 0; k < n_tensors; ++k) {
            const int64_t *t = tensors + k * T_COLUMNS;
            const double *parts = (const double *)t[T_PARTS];
            for (int64_t b = 0; b < n_blocks(t); ++b) probe += parts[b * P_COUNT + P_PROBE];
        }
        if (probe != 0.0) return -1; /* NaN: some G - G was not 0 */
    }
    int64_t second_pass = 0;
#pragma omp parallel for num_threads((int)threads) schedule(dynamic, 1) reduction(+ : second_pass)
    for (int64_t k = 0; k < n_tensors; ++k) {
        if (finish == 1) second_pass += finish1(tensors + k * T_COLUMNS, scalars, flags);
        else finish2(tensors + k * T_COLUMNS, scalars, flags);
    }
    return second_pass;
}

/* The F-mask keys of n tensors into keys[k * stride] (a column of the tensor table), from their
 * stream numbers and the step's words (f_mask_key). */
void optimfx_adafactor_mask_keys(const int64_t *streams, int64_t n, int64_t s0, int64_t b, int64_t *keys,
                                 int64_t stride) {
    for (int64_t k = 0; k < n; ++k) keys[k * stride] = (int64_t)f_mask_key(streams[k], (uint32_t)s0, (uint32_t)b);
}

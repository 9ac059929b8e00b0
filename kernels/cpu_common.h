/* Shared by the CPU kernels (kernels/cpu_*.c). */
#ifndef OPTIMFX_CPU_COMMON_H
#define OPTIMFX_CPU_COMMON_H

#include <math.h>

/* ATen's vectorised lerp, start + w*(end - start), bit for bit: one fused multiply-add from the
 * start for a weight below 0.5, from the end otherwise (exact at w = 1; accurate where start nearly
 * cancels end). `small` (|w| < 0.5) and `w_minus_one` (w - 1, in float) are set once per call. */
static inline float lerp_f32(float start, float end, float w, float w_minus_one, int small) {
    return small ? fmaf(w, end - start, start) : fmaf(w_minus_one, end - start, end);
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

#endif

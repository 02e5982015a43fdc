/* Kernels of the fast supernet for channels_last tensors, viewed as (M, C) row-major matrices
 * (M = N * H * W values per channel): training-mode batch norm with an optional ReLU after
 * it, forward and backward, and the backward of a per-channel scaled add; and depthwise
 * convolution, forward and both gradients (channels_last_kernels_depthwise.h); and both, for
 * several tensors in one call (channels_last_kernels_blocks.h).
 *
 * Compiled and loaded by nbutils/accel/channels_last_kernels.py; see there for why.
 * Per-channel sums are accumulated in SCALAR over blocks of rows and in double over blocks
 * (batch-norm statistics shifted by the first row, so a large mean does not cancel), one
 * partial sum per OpenMP thread, added in thread order (deterministic for a thread count).
 * The same source compiles once for float (suffix _f32) and once for double (_f64).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define CONCAT_(a, b) a##b
#define CONCAT(a, b) CONCAT_(a, b)
#define BLOCK 16              /* rows summed in SCALAR before the sums go to double */
#define MIN_ROWS_PER_THREAD 256
#define INLINE static inline __attribute__((always_inline))

/* Runs `call` with the channel count c a compile-time constant for 32 and 64 channels, so
 * that the compiler unrolls the loops over a row and keeps its per-channel sums in registers,
 * which makes forward and backward faster. Not for 16 channels: there gcc's fully unrolled
 * code is slower than the generic loops. Timings: benchmarks/README.md. */
#define WITH_CONSTANT_C(call)                                  \
    do {                                                       \
        switch (c) {                                           \
        case 32: { const int64_t c = 32; call; } break;        \
        case 64: { const int64_t c = 64; call; } break;        \
        default: call;                                         \
        }                                                      \
    } while (0)

/* The same for the depthwise convolutions, whose inner loops run over a pixel's channels:
 * a constant count lets the compiler keep a pixel's channels in vector registers. */
#define WITH_CONSTANT_C_DW(call) do { call; } while (0)

#define SCALAR float
#define SUFFIX _f32
#include "channels_last_kernels.h"
#include "channels_last_kernels_depthwise.h"
#include "channels_last_kernels_blocks.h"
#undef SCALAR
#undef SUFFIX

#define SCALAR double
#define SUFFIX _f64
#include "channels_last_kernels.h"
#include "channels_last_kernels_depthwise.h"
#include "channels_last_kernels_blocks.h"
#undef SCALAR
#undef SUFFIX

/* Training-mode batch norm on channels_last tensors, viewed as an (M, C) row-major matrix
 * (M = N * H * W values per channel), with an optional ReLU after it.
 *
 * Compiled and loaded by nbutils/channels_last_batch_norm.py; see there for why.
 * Per-channel sums are accumulated in double, shifted by the first row (so a large mean does
 * not cancel), one partial sum per OpenMP thread, added in thread order (deterministic).
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

#define SCALAR float
#define SUFFIX _f32
#include "batch_norm_kernels.h"
#undef SCALAR
#undef SUFFIX

#define SCALAR double
#define SUFFIX _f64
#include "batch_norm_kernels.h"
#undef SCALAR
#undef SUFFIX

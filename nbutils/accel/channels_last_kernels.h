/* Included by channels_last_kernels.c once per SCALAR type (float, double). */

/* Rows [begin, end) of thread `t` among `nt` threads, in contiguous blocks. */
static inline void CONCAT(rows_of, SUFFIX)(int64_t m, int t, int nt, int64_t *begin, int64_t *end) {
    int64_t per = m / nt, extra = m % nt;
    *begin = t * per + (t < extra ? t : extra);
    *end = *begin + per + (t < extra ? 1 : 0);
}

/* Adds the per-channel sums of (x - shift) and (x - shift)^2 over rows [begin, end) to s1,
 * s2: in SCALAR over blocks of BLOCK rows, each block's sums then added in double. */
INLINE void CONCAT(moments, SUFFIX)(const SCALAR *restrict x, int64_t begin, int64_t end, int64_t c,
                                           const SCALAR *restrict shift, double *restrict s1, double *restrict s2) {
    SCALAR f1[c], f2[c];
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int64_t i1 = i0 + BLOCK < end ? i0 + BLOCK : end;
        for (int64_t j = 0; j < c; ++j) f1[j] = f2[j] = 0;
        for (int64_t i = i0; i < i1; ++i) {
            const SCALAR *restrict row = x + i * c;
            for (int64_t j = 0; j < c; ++j) {
                SCALAR d = row[j] - shift[j];
                f1[j] += d;
                f2[j] += d * d;
            }
        }
        for (int64_t j = 0; j < c; ++j) { s1[j] += f1[j]; s2[j] += f2[j]; }
    }
}

/* out = (x - mean) * a + b per channel, then max(out, 0) if relu; rows [begin, end). */
INLINE void CONCAT(affine, SUFFIX)(const SCALAR *restrict x, int64_t begin, int64_t end, int64_t c,
                                          const SCALAR *restrict mean, const SCALAR *restrict a,
                                          const SCALAR *restrict b, int relu, SCALAR *restrict out) {
    if (relu) {
        for (int64_t i = begin; i < end; ++i)
            for (int64_t j = 0; j < c; ++j) {
                SCALAR v = (x[i * c + j] - mean[j]) * a[j] + b[j];
                out[i * c + j] = v > 0 ? v : 0;
            }
    } else {
        for (int64_t i = begin; i < end; ++i)
            for (int64_t j = 0; j < c; ++j) out[i * c + j] = (x[i * c + j] - mean[j]) * a[j] + b[j];
    }
}

/* The gradient below the forward's ReLU (its mask recomputed from x exactly as the forward
 * computed the output), or the gradient itself. */
#define GRAD_BELOW(g, xv, mean, a, b) (((xv) - (mean)) * (a) + (b) > 0 ? (g) : (SCALAR)0)

/* Adds the per-channel sums of g' and g' * (x - mean) over rows [begin, end) to s1, s2. */
INLINE void CONCAT(grad_sums, SUFFIX)(const SCALAR *restrict grad, const SCALAR *restrict x, int64_t begin,
                                             int64_t end, int64_t c, const SCALAR *restrict mean,
                                             const SCALAR *restrict a, const SCALAR *restrict b, const int relu,
                                             double *restrict s1, double *restrict s2) {
    SCALAR f1[c], f2[c];
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int64_t i1 = i0 + BLOCK < end ? i0 + BLOCK : end;
        for (int64_t j = 0; j < c; ++j) f1[j] = f2[j] = 0;
        if (relu) {
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = 0; j < c; ++j) {
                    SCALAR g = GRAD_BELOW(grad[i * c + j], x[i * c + j], mean[j], a[j], b[j]);
                    f1[j] += g;
                    f2[j] += g * (x[i * c + j] - mean[j]);
                }
        } else {
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = 0; j < c; ++j) {
                    SCALAR g = grad[i * c + j];
                    f1[j] += g;
                    f2[j] += g * (x[i * c + j] - mean[j]);
                }
        }
        for (int64_t j = 0; j < c; ++j) { s1[j] += f1[j]; s2[j] += f2[j]; }
    }
}

/* grad_input = k_g * (g' - k_mean - (x - mean) * k_x) over rows [begin, end). */
INLINE void CONCAT(grad_input, SUFFIX)(const SCALAR *restrict grad, const SCALAR *restrict x, int64_t begin,
                                              int64_t end, int64_t c, const SCALAR *restrict mean,
                                              const SCALAR *restrict a, const SCALAR *restrict b, const int relu,
                                              const SCALAR *restrict k_g, const SCALAR *restrict k_mean,
                                              const SCALAR *restrict k_x, SCALAR *restrict out) {
    if (relu) {
        for (int64_t i = begin; i < end; ++i)
            for (int64_t j = 0; j < c; ++j) {
                SCALAR g = GRAD_BELOW(grad[i * c + j], x[i * c + j], mean[j], a[j], b[j]);
                out[i * c + j] = k_g[j] * (g - k_mean[j] - (x[i * c + j] - mean[j]) * k_x[j]);
            }
    } else {
        for (int64_t i = begin; i < end; ++i)
            for (int64_t j = 0; j < c; ++j)
                out[i * c + j] = k_g[j] * (grad[i * c + j] - k_mean[j] - (x[i * c + j] - mean[j]) * k_x[j]);
    }
}

/* Adds up the threads' partial sums (nt blocks of 2c doubles) in thread order into t1, t2. */
static inline void CONCAT(reduce, SUFFIX)(const double *partial, int nt, int64_t c, double *t1, double *t2) {
    for (int64_t j = 0; j < c; ++j) {
        t1[j] = t2[j] = 0.0;
        for (int k = 0; k < nt; ++k) {
            t1[j] += partial[(size_t)k * 2 * c + j];
            t2[j] += partial[(size_t)k * 2 * c + c + j];
        }
    }
}

static inline int CONCAT(threads_for, SUFFIX)(int64_t m) {
    int nt = omp_get_max_threads();
    int64_t most = m / MIN_ROWS_PER_THREAD;
    if (nt > most) nt = most > 1 ? (int)most : 1;
    return nt;
}

/* Training-mode batch norm: out = (x - mean) * a + b per channel, where a = weight * invstd
 * and b = bias, then max(out, 0) if relu. Writes the batch mean and
 * invstd = 1 / sqrt(biased variance + eps). weight and bias may be NULL (1 and 0). */
void CONCAT(bn_forward, SUFFIX)(const SCALAR *x, int64_t m, int64_t c, const SCALAR *weight, const SCALAR *bias,
                                double eps, int relu, SCALAR *out, SCALAR *mean_out, SCALAR *invstd_out) {
    int nt = CONCAT(threads_for, SUFFIX)(m);
    double *partial = calloc((size_t)nt * 2 * c + 2 * c, sizeof(double));
    double *t1 = partial + (size_t)nt * 2 * c, *t2 = t1 + c;
    SCALAR *a = malloc((size_t)2 * c * sizeof(SCALAR)), *b = a + c;
    const SCALAR *shift = x;   /* the first row: sums of x - shift do not cancel for a large mean */
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t begin, end;
        CONCAT(rows_of, SUFFIX)(m, t, nt, &begin, &end);
        WITH_CONSTANT_C(CONCAT(moments, SUFFIX)(x, begin, end, c, shift, partial + (size_t)t * 2 * c,
                                                partial + (size_t)t * 2 * c + c));
#pragma omp barrier
#pragma omp single
        {
            CONCAT(reduce, SUFFIX)(partial, nt, c, t1, t2);
            for (int64_t j = 0; j < c; ++j) {
                double mean_shifted = t1[j] / (double)m;
                double var = t2[j] / (double)m - mean_shifted * mean_shifted;
                mean_out[j] = (SCALAR)(mean_shifted + (double)shift[j]);
                invstd_out[j] = (SCALAR)(1.0 / sqrt((var > 0.0 ? var : 0.0) + eps));
                a[j] = (weight ? weight[j] : (SCALAR)1) * invstd_out[j];
                b[j] = bias ? bias[j] : (SCALAR)0;
            }
        }
        WITH_CONSTANT_C(CONCAT(affine, SUFFIX)(x, begin, end, c, mean_out, a, b, relu, out));
    }
    free(partial);
    free(a);
}

/* The backward of bn_forward (same arguments; relu recomputes the forward's mask from x).
 * grad_weight = sum g' * xhat, grad_bias = sum g', where g' is the gradient below the ReLU;
 * grad_input = weight * invstd * (g' - mean(g') - xhat * mean(g' * xhat)).
 * Any of the three outputs may be NULL (not needed). */
void CONCAT(bn_backward, SUFFIX)(const SCALAR *grad, const SCALAR *x, int64_t m, int64_t c, const SCALAR *weight,
                                 const SCALAR *bias, const SCALAR *mean, const SCALAR *invstd, int relu,
                                 SCALAR *grad_input, SCALAR *grad_weight, SCALAR *grad_bias) {
    int nt = CONCAT(threads_for, SUFFIX)(m);
    double *partial = calloc((size_t)nt * 2 * c + 2 * c, sizeof(double));
    double *t1 = partial + (size_t)nt * 2 * c, *t2 = t1 + c;
    SCALAR *a = malloc((size_t)5 * c * sizeof(SCALAR)), *b = a + c, *k_g = b + c, *k_mean = k_g + c, *k_x = k_mean + c;
    for (int64_t j = 0; j < c; ++j) {   /* exactly as bn_forward computed them: the same mask */
        a[j] = (weight ? weight[j] : (SCALAR)1) * invstd[j];
        b[j] = bias ? bias[j] : (SCALAR)0;
    }
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t begin, end;
        CONCAT(rows_of, SUFFIX)(m, t, nt, &begin, &end);
        WITH_CONSTANT_C(CONCAT(grad_sums, SUFFIX)(grad, x, begin, end, c, mean, a, b, relu, partial + (size_t)t * 2 * c,
                                                  partial + (size_t)t * 2 * c + c));
#pragma omp barrier
#pragma omp single
        {
            CONCAT(reduce, SUFFIX)(partial, nt, c, t1, t2);
            for (int64_t j = 0; j < c; ++j) {
                if (grad_weight) grad_weight[j] = (SCALAR)(t2[j] * (double)invstd[j]);
                if (grad_bias) grad_bias[j] = (SCALAR)t1[j];
                k_g[j] = (weight ? weight[j] : (SCALAR)1) * invstd[j];
                k_mean[j] = (SCALAR)(t1[j] / (double)m);
                k_x[j] = (SCALAR)(t2[j] / (double)m * (double)invstd[j] * (double)invstd[j]);
            }
        }
        if (grad_input)
            WITH_CONSTANT_C(CONCAT(grad_input, SUFFIX)(grad, x, begin, end, c, mean, a, b, relu, k_g, k_mean, k_x,
                                                       grad_input));
    }
    free(partial);
    free(a);
}

/* grad_value = grad * scale (if not NULL) and the per-channel sums of grad * value added to s
 * (if not NULL), over rows [begin, end). */
INLINE void CONCAT(scaled_sums, SUFFIX)(const SCALAR *restrict grad, const SCALAR *restrict value, int64_t begin,
                                        int64_t end, int64_t c, const SCALAR *restrict scale,
                                        SCALAR *restrict grad_value, double *restrict s) {
    SCALAR f[c];
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int64_t i1 = i0 + BLOCK < end ? i0 + BLOCK : end;
        if (grad_value)
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = 0; j < c; ++j) grad_value[i * c + j] = grad[i * c + j] * scale[j];
        if (s) {
            for (int64_t j = 0; j < c; ++j) f[j] = 0;
            for (int64_t i = i0; i < i1; ++i)
                for (int64_t j = 0; j < c; ++j) f[j] += grad[i * c + j] * value[i * c + j];
            for (int64_t j = 0; j < c; ++j) s[j] += f[j];
        }
    }
}

/* The backward of out = total + value * scale, scale per channel, in one pass:
 * grad_value = grad * scale and grad_scale = sum over rows of grad * value (either may be NULL). */
void CONCAT(scaled_add_backward, SUFFIX)(const SCALAR *restrict grad, const SCALAR *restrict value, int64_t m,
                                         int64_t c, const SCALAR *restrict scale, SCALAR *restrict grad_value,
                                         SCALAR *restrict grad_scale) {
    int nt = CONCAT(threads_for, SUFFIX)(m);
    double *partial = calloc((size_t)nt * c, sizeof(double));
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t begin, end;
        CONCAT(rows_of, SUFFIX)(m, t, nt, &begin, &end);
        WITH_CONSTANT_C(CONCAT(scaled_sums, SUFFIX)(grad, value, begin, end, c, scale, grad_value,
                                                    grad_scale ? partial + (size_t)t * c : NULL));
    }
    if (grad_scale)
        for (int64_t j = 0; j < c; ++j) {
            double total = 0.0;
            for (int k = 0; k < nt; ++k) total += partial[(size_t)k * c + j];
            grad_scale[j] = (SCALAR)total;
        }
    free(partial);
}

/* The running-statistics updates of many batch-norm modules in one call. Module i has
 * channels[i] channels, its batch statistics batch_mean[i] and batch_invstd[i] (pointers,
 * as bn_forward writes them: invstd = 1 / sqrt(biased variance + eps[i])) and its buffers
 * running_mean[i], running_var[i] and tracked[i] (int64): running = (1 - momentum[i]) *
 * running + momentum[i] * batch, with the variance made unbiased by unbias[i] = n / (n - 1)
 * and clamped at 0 (rounding near var = 0); tracked += 1. In double, rounded once. */
void CONCAT(running_stats_update, SUFFIX)(int64_t count, const int64_t *channels, SCALAR *const *running_mean,
                                          SCALAR *const *running_var, int64_t *const *tracked,
                                          const SCALAR *const *batch_mean, const SCALAR *const *batch_invstd,
                                          const double *momentum, const double *eps, const double *unbias) {
    for (int64_t i = 0; i < count; ++i) {
        double m = momentum[i];
        for (int64_t j = 0; j < channels[i]; ++j) {
            double invstd = (double)batch_invstd[i][j];
            double var = (1.0 / (invstd * invstd) - eps[i]) * unbias[i];
            if (var < 0.0) var = 0.0;
            running_mean[i][j] = (SCALAR)((1.0 - m) * (double)running_mean[i][j] + m * (double)batch_mean[i][j]);
            running_var[i][j] = (SCALAR)((1.0 - m) * (double)running_var[i][j] + m * var);
        }
        if (tracked[i]) *tracked[i] += 1;
    }
}

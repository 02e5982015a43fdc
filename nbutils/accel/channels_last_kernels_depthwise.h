/* Depthwise 2-D convolution of channels_last tensors, forward and both gradients; included by
 * channels_last_kernels.c once per SCALAR type (float, double).
 *
 * x is (N, H, W, C) in memory, the weight PyTorch's (C, 1, K, K), the output (N, OH, OW, C);
 * any stride, zero padding and dilation (square). Every loop runs over the channels innermost,
 * contiguous in channels_last, so the compiler vectorises it; the weight is first transposed
 * to (K * K, C) for that. Each loops over the kernel taps outside and over a row's pixels
 * inside, the pixels a tap reaches computed once (no bounds test per pixel). Images (or
 * output rows) are split between the OpenMP threads.
 * The weight gradient sums each image in SCALAR and the images in double, one partial sum per
 * thread, added in thread order (deterministic for a thread count).
 */

/* w (C, K*K) -> wt (K*K, C) */
static inline void CONCAT(dw_transpose, SUFFIX)(const SCALAR *w, int64_t c, int64_t kk, SCALAR *wt) {
    for (int64_t j = 0; j < c; ++j)
        for (int64_t t = 0; t < kk; ++t) wt[t * c + j] = w[j * kk + t];
}

/* Each tap's weights repeated for every pixel of an output row, (K*K, OW, C): at stride 1 a
 * tap's products over a row are then one contiguous span, x's row against this one. */
static inline SCALAR *CONCAT(dw_replicate, SUFFIX)(const SCALAR *wt, int64_t kk, int64_t c, int64_t ow) {
    SCALAR *wrep = malloc(sizeof(SCALAR) * kk * ow * c);
    for (int64_t t = 0; t < kk; ++t)
        for (int64_t ox = 0; ox < ow; ++ox)
            for (int64_t j = 0; j < c; ++j) wrep[(t * ow + ox) * c + j] = wt[t * c + j];
    return wrep;
}

/* The output columns ox with 0 <= ox * stride + off < size: [*lo, *hi). */
static inline void CONCAT(dw_columns, SUFFIX)(int64_t off, int64_t stride, int64_t size, int64_t ow, int64_t *lo,
                                                int64_t *hi) {
    int64_t a = off >= 0 ? 0 : (-off + stride - 1) / stride;
    int64_t b = size - 1 - off < 0 ? 0 : (size - 1 - off) / stride + 1;
    *lo = a;
    *hi = b < ow ? b : ow;
}

/* One output row at a time, one kernel tap at a time over the row's pixels (the loop over a
 * row's pixels and channels is long and branch-free). */
INLINE void CONCAT(dw_forward_impl, SUFFIX)(const SCALAR *restrict x, int64_t n, int64_t h, int64_t wd, int64_t c,
                                              const SCALAR *restrict wt, const SCALAR *restrict wrep, int64_t k,
                                              int64_t stride, int64_t pad, int64_t dil, SCALAR *restrict out,
                                              int64_t oh, int64_t ow) {
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b)
        for (int64_t oy = 0; oy < oh; ++oy) {
            SCALAR *restrict o = out + (b * oh + oy) * ow * c;
            for (int64_t q = 0; q < ow * c; ++q) o[q] = 0;
            for (int64_t i = 0; i < k; ++i) {
                int64_t iy = oy * stride - pad + i * dil;
                if (iy < 0 || iy >= h) continue;
                const SCALAR *restrict xrow = x + (b * h + iy) * wd * c;
                for (int64_t l = 0; l < k; ++l) {
                    int64_t off = l * dil - pad, lo, hi;
                    CONCAT(dw_columns, SUFFIX)(off, stride, wd, ow, &lo, &hi);
                    if (stride == 1) {   /* one contiguous span of the row: pixels and channels */
                        const SCALAR *restrict wr = wrep + (i * k + l) * ow * c;
                        const SCALAR *restrict xr = xrow + off * c;
                        for (int64_t q = lo * c; q < hi * c; ++q) o[q] += wr[q] * xr[q];
                        continue;
                    }
                    const SCALAR *restrict wr = wt + (i * k + l) * c;
                    for (int64_t ox = lo; ox < hi; ++ox) {
                        const SCALAR *restrict xr = xrow + (ox * stride + off) * c;
                        SCALAR *restrict orow = o + ox * c;
                        for (int64_t j = 0; j < c; ++j) orow[j] += wr[j] * xr[j];
                    }
                }
            }
        }
}

/* out = depthwise_conv(x, w) */
void CONCAT(dw_forward, SUFFIX)(const SCALAR *x, int64_t n, int64_t h, int64_t wd, int64_t c, const SCALAR *w,
                                int64_t k, int64_t stride, int64_t pad, int64_t dil, SCALAR *out, int64_t oh,
                                int64_t ow) {
    SCALAR wt[k * k * c];
    CONCAT(dw_transpose, SUFFIX)(w, c, k * k, wt);
    SCALAR *wrep = CONCAT(dw_replicate, SUFFIX)(wt, k * k, c, ow);
    WITH_CONSTANT_C_DW(CONCAT(dw_forward_impl, SUFFIX)(x, n, h, wd, c, wt, wrep, k, stride, pad, dil, out, oh, ow));
    free(wrep);
}

/* The forward's products scattered back: each image by one thread (images do not overlap). */
INLINE void CONCAT(dw_input_grad_impl, SUFFIX)(const SCALAR *restrict grad, int64_t n, int64_t h, int64_t wd,
                                                 int64_t c, const SCALAR *restrict wt, const SCALAR *restrict wrep,
                                                 int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t oh,
                                                 int64_t ow, int accumulate, SCALAR *restrict gx) {
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < n; ++b) {
        SCALAR *restrict image = gx + b * h * wd * c;
        if (!accumulate)
            for (int64_t q = 0; q < h * wd * c; ++q) image[q] = 0;
        for (int64_t oy = 0; oy < oh; ++oy) {
            const SCALAR *restrict grow = grad + (b * oh + oy) * ow * c;
            for (int64_t i = 0; i < k; ++i) {
                int64_t iy = oy * stride - pad + i * dil;
                if (iy < 0 || iy >= h) continue;
                SCALAR *restrict xrow = image + iy * wd * c;
                for (int64_t l = 0; l < k; ++l) {
                    int64_t off = l * dil - pad, lo, hi;
                    CONCAT(dw_columns, SUFFIX)(off, stride, wd, ow, &lo, &hi);
                    if (stride == 1) {
                        const SCALAR *restrict wr = wrep + (i * k + l) * ow * c;
                        SCALAR *restrict xr = xrow + off * c;
                        for (int64_t q = lo * c; q < hi * c; ++q) xr[q] += wr[q] * grow[q];
                        continue;
                    }
                    const SCALAR *restrict wr = wt + (i * k + l) * c;
                    for (int64_t ox = lo; ox < hi; ++ox) {
                        SCALAR *restrict xr = xrow + (ox * stride + off) * c;
                        const SCALAR *restrict gr = grow + ox * c;
                        for (int64_t j = 0; j < c; ++j) xr[j] += wr[j] * gr[j];
                    }
                }
            }
        }
    }
}

/* gx = d loss / d x of depthwise_conv(x, w) given grad = d loss / d out (gx += it if accumulate) */
void CONCAT(dw_input_grad, SUFFIX)(const SCALAR *grad, int64_t n, int64_t h, int64_t wd, int64_t c, const SCALAR *w,
                                   int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t oh, int64_t ow,
                                   int accumulate, SCALAR *gx) {
    SCALAR wt[k * k * c];
    CONCAT(dw_transpose, SUFFIX)(w, c, k * k, wt);
    SCALAR *wrep = CONCAT(dw_replicate, SUFFIX)(wt, k * k, c, ow);
    WITH_CONSTANT_C_DW(CONCAT(dw_input_grad_impl, SUFFIX)(grad, n, h, wd, c, wt, wrep, k, stride, pad, dil, oh, ow,
                                                          accumulate, gx));
    free(wrep);
}

INLINE void CONCAT(dw_weight_grad_impl, SUFFIX)(const SCALAR *restrict x, int64_t n, int64_t h, int64_t wd,
                                                  int64_t c, const SCALAR *restrict grad, int64_t k, int64_t stride,
                                                  int64_t pad, int64_t dil, int64_t oh, int64_t ow,
                                                  double *restrict partial, int nt) {
    const int64_t kkc = k * k * c;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num();
        int64_t begin, end;
        CONCAT(rows_of, SUFFIX)(n, t, nt, &begin, &end);
        double *restrict mine = partial + t * kkc;
        SCALAR acc[kkc];
        for (int64_t q = 0; q < kkc; ++q) mine[q] = 0;
        SCALAR *spans = stride == 1 ? malloc(sizeof(SCALAR) * kkc * ow) : NULL;
        for (int64_t b = begin; b < end; ++b) {
            for (int64_t q = 0; q < kkc; ++q) acc[q] = 0;
            if (spans)
                for (int64_t q = 0; q < kkc * ow; ++q) spans[q] = 0;
            for (int64_t oy = 0; oy < oh; ++oy) {
                const SCALAR *restrict grow = grad + (b * oh + oy) * ow * c;
                for (int64_t i = 0; i < k; ++i) {
                    int64_t iy = oy * stride - pad + i * dil;
                    if (iy < 0 || iy >= h) continue;
                    const SCALAR *restrict xrow = x + (b * h + iy) * wd * c;
                    for (int64_t l = 0; l < k; ++l) {
                        int64_t off = l * dil - pad, lo, hi;
                        CONCAT(dw_columns, SUFFIX)(off, stride, wd, ow, &lo, &hi);
                        if (stride == 1) {   /* per pixel and channel, folded per channel below */
                            SCALAR *restrict a = spans + (i * k + l) * ow * c;
                            const SCALAR *restrict xr = xrow + off * c;
                            for (int64_t q = lo * c; q < hi * c; ++q) a[q] += grow[q] * xr[q];
                            continue;
                        }
                        SCALAR *restrict a = acc + (i * k + l) * c;
                        for (int64_t ox = lo; ox < hi; ++ox) {
                            const SCALAR *restrict xr = xrow + (ox * stride + off) * c;
                            const SCALAR *restrict gr = grow + ox * c;
                            for (int64_t j = 0; j < c; ++j) a[j] += gr[j] * xr[j];
                        }
                    }
                }
            }
            if (spans)
                for (int64_t t = 0; t < k * k; ++t)
                    for (int64_t ox = 0; ox < ow; ++ox)
                        for (int64_t j = 0; j < c; ++j) acc[t * c + j] += spans[(t * ow + ox) * c + j];
            for (int64_t q = 0; q < kkc; ++q) mine[q] += acc[q];
        }
        free(spans);
    }
}

/* gw (C, 1, K, K) = d loss / d w of depthwise_conv(x, w) given grad = d loss / d out */
void CONCAT(dw_weight_grad, SUFFIX)(const SCALAR *x, int64_t n, int64_t h, int64_t wd, int64_t c, const SCALAR *grad,
                                    int64_t k, int64_t stride, int64_t pad, int64_t dil, int64_t oh, int64_t ow,
                                    SCALAR *gw) {
    int nt = omp_get_max_threads();
    if (nt > n) nt = (int)n;
    if (nt < 1) nt = 1;
    const int64_t kk = k * k, kkc = kk * c;
    double *partial = malloc(sizeof(double) * nt * kkc);
    WITH_CONSTANT_C_DW(CONCAT(dw_weight_grad_impl, SUFFIX)(x, n, h, wd, c, grad, k, stride, pad, dil, oh, ow,
                                                           partial, nt));
    for (int64_t j = 0; j < c; ++j)
        for (int64_t q = 0; q < kk; ++q) {
            double s = 0;
            for (int t = 0; t < nt; ++t) s += partial[t * kkc + q * c + j];
            gw[j * kk + q] = (SCALAR)s;
        }
    free(partial);
}

/* The batch norms and depthwise convolutions of several tensors ("blocks") in one call, for the
 * convolutions of the mixed operations that read one state (nbutils/accel/mixed_convs.py);
 * included by channels_last_kernels.c once per SCALAR type, after the kernels it calls.
 *
 * Each block is one tensor of the same (M, C) or (N, H, W, C) shape as the single-tensor
 * kernels take; its pointers come in int64 arrays (0 for NULL, where the single kernel takes
 * NULL), so the blocks need not lie in one buffer. One call per group of blocks instead of one
 * per tensor: from Python each call costs a few microseconds of argument conversion. */

/* bn_forward of every block; weight[k] may be 0 (no affine weight), bias is NULL. */
void CONCAT(bn_forward_blocks, SUFFIX)(int64_t blocks, const int64_t *x, int64_t m, int64_t c, const int64_t *weight,
                                       double eps, const int32_t *relu, const int64_t *out, SCALAR *mean,
                                       SCALAR *invstd) {
    for (int64_t k = 0; k < blocks; ++k)
        CONCAT(bn_forward, SUFFIX)((const SCALAR *)x[k], m, c, (const SCALAR *)weight[k], NULL, eps, relu[k],
                                   (SCALAR *)out[k], mean + k * c, invstd + k * c);
}

/* bn_backward of every block; grad_input[k] and grad_weight[k] may be 0 (not needed). */
void CONCAT(bn_backward_blocks, SUFFIX)(int64_t blocks, const int64_t *grad, const int64_t *x, int64_t m, int64_t c,
                                        const int64_t *weight, const SCALAR *mean, const SCALAR *invstd,
                                        const int32_t *relu, const int64_t *grad_input, const int64_t *grad_weight) {
    for (int64_t k = 0; k < blocks; ++k)
        CONCAT(bn_backward, SUFFIX)((const SCALAR *)grad[k], (const SCALAR *)x[k], m, c, (const SCALAR *)weight[k],
                                    NULL, mean + k * c, invstd + k * c, relu[k], (SCALAR *)grad_input[k],
                                    (SCALAR *)grad_weight[k], NULL);
}

/* conf: per block the input's height and width, the kernel size, stride, padding and dilation
 * (six int64); every block's output is (n, oh, ow, c). */
void CONCAT(dw_forward_blocks, SUFFIX)(int64_t blocks, int64_t n, int64_t c, const int64_t *conf, const int64_t *x,
                                       const int64_t *w, int64_t oh, int64_t ow, const int64_t *out) {
    for (int64_t k = 0; k < blocks; ++k) {
        const int64_t *f = conf + 6 * k;
        CONCAT(dw_forward, SUFFIX)((const SCALAR *)x[k], n, f[0], f[1], c, (const SCALAR *)w[k], f[2], f[3], f[4], f[5],
                                   (SCALAR *)out[k], oh, ow);
    }
}

/* dw_input_grad of every block, added into gx[k] where accumulate[k]. */
void CONCAT(dw_input_grad_blocks, SUFFIX)(int64_t blocks, int64_t n, int64_t c, const int64_t *conf,
                                          const int64_t *grad, const int64_t *w, int64_t oh, int64_t ow,
                                          const int32_t *accumulate, const int64_t *gx) {
    for (int64_t k = 0; k < blocks; ++k) {
        const int64_t *f = conf + 6 * k;
        CONCAT(dw_input_grad, SUFFIX)((const SCALAR *)grad[k], n, f[0], f[1], c, (const SCALAR *)w[k], f[2], f[3],
                                      f[4], f[5], oh, ow, accumulate[k], (SCALAR *)gx[k]);
    }
}

/* dw_weight_grad of every block. */
void CONCAT(dw_weight_grad_blocks, SUFFIX)(int64_t blocks, int64_t n, int64_t c, const int64_t *conf,
                                           const int64_t *x, const int64_t *grad, int64_t oh, int64_t ow,
                                           const int64_t *gw) {
    for (int64_t k = 0; k < blocks; ++k) {
        const int64_t *f = conf + 6 * k;
        CONCAT(dw_weight_grad, SUFFIX)((const SCALAR *)x[k], n, f[0], f[1], c, (const SCALAR *)grad[k], f[2], f[3],
                                       f[4], f[5], oh, ow, (SCALAR *)gw[k]);
    }
}

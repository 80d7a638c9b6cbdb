/* RMSProp: the update of one element, or of one vector of elements.
 *
 * netcl's kernel builder includes this file twice, once with `real_t` defined as the
 * parameter's scalar type and once as a vector of it, and names the function through
 * `UPDATE`. `real` is always the scalar type (hyperparameters are scalars).
 *
 * Variant flags, fixed at build time: MAXIMIZE, WEIGHT_DECAY, CENTERED, MOMENTUM.
 * State buffers that the variant does not use are passed as dummies and never read.
 *
 * The order of operations is the order torch.optim.RMSprop uses, and netcl's array-API
 * path (netcl/optim/rmsprop.py) writes the same expressions in the same order; the
 * builder turns FP_CONTRACT off so that no multiply-add is fused behind our back.
 */
inline void UPDATE(
    real_t *param, real_t grad,
    real_t *square_avg, real_t *momentum_buffer, real_t *grad_avg,
    real lr, real alpha, real one_minus_alpha, real eps,
    real weight_decay, real momentum)
{
    real_t g = grad;
#if MAXIMIZE
    g = -g;
#endif
#if WEIGHT_DECAY
    g = g + weight_decay * *param;
#endif

    /* v = alpha * v + (1 - alpha) * g^2 */
    real_t v = *square_avg * alpha + one_minus_alpha * g * g;
    *square_avg = v;

#if CENTERED
    /* m = alpha * m + (1 - alpha) * g;  avg = sqrt(v - m^2) + eps */
    real_t m = *grad_avg * alpha + one_minus_alpha * g;
    *grad_avg = m;
    real_t avg = sqrt(v - m * m) + eps;
#else
    real_t avg = sqrt(v) + eps;
#endif

#if MOMENTUM
    /* b = momentum * b + g / avg;  param -= lr * b */
    real_t b = *momentum_buffer * momentum + g / avg;
    *momentum_buffer = b;
    *param = *param + (-lr) * b;
#else
    /* param -= lr * g / avg */
    *param = *param + (-lr) * (g / avg);
#endif
}

/* RMSProp: the update of one element, or of one vector of elements.
 *
 * netcl's kernel builder includes this file twice, once with `real_t` defined as the
 * parameter's scalar type and once as a vector of it, and names the function through
 * `UPDATE`. `real` is always the scalar type (hyperparameters are scalars) and
 * `REAL_MAX` its largest finite value.
 *
 * Variant flags, fixed at build time: MAXIMIZE, WEIGHT_DECAY, CENTERED, MOMENTUM.
 * State buffers that the variant does not use are passed as dummies and never read.
 *
 * The order of operations is torch.optim.RMSprop's (but for squaring g before scaling
 * it, which is more accurate), and netcl's array-API
 * path (netcl/optim/rmsprop.py) writes the same expressions in the same order; the
 * builder turns FP_CONTRACT off so that no multiply-add is fused behind our back.
 *
 * Extreme values (where torch would freeze a parameter or write NaN), with selects
 * rather than fmin/fmax/clamp, whose NaN rules cost a third of the step on PoCL:
 * - an element whose gradient is NaN or infinite is left as it was, state included;
 * - v saturates at REAL_MAX instead of overflowing to infinity, so it decays again;
 * - without centering, g / (sqrt(v) + eps) is clamped to +-clip = 1 / sqrt(1 - alpha),
 *   the bound it has in exact arithmetic (v >= (1 - alpha) * g^2), so a step moves a
 *   parameter by at most lr * clip / (1 - momentum);
 * - with centering, v - m^2 below zero (rounding) counts as zero.
 */
inline void UPDATE(
    real_t *param, real_t grad,
    real_t *square_avg, real_t *momentum_buffer, real_t *grad_avg,
    real lr, real alpha, real one_minus_alpha, real eps,
    real weight_decay, real momentum, real clip)
{
    real_t g = grad;
#if MAXIMIZE
    g = -g;
#endif
#if WEIGHT_DECAY
    g = g + weight_decay * *param;
#endif

    /* v = alpha * v + (1 - alpha) * g^2; squaring first rounds a little less often in
       the worst case than torch's ((1 - alpha) * g) * g (at most 2 ulp against 2.1) */
    real_t v = *square_avg * alpha + one_minus_alpha * (g * g);
    v = (v < REAL_MAX) ? v : (real_t)(REAL_MAX);

#if CENTERED
    /* m = alpha * m + (1 - alpha) * g;  u = g / (sqrt(v - m^2) + eps) */
    real_t m = *grad_avg * alpha + one_minus_alpha * g;
    real_t variance = v - m * m;
    variance = (variance > (real)0) ? variance : (real_t)(0);
    real_t u = g / (sqrt(variance) + eps);
#else
    /* u = g / (sqrt(v) + eps) */
    real_t u = g / (sqrt(v) + eps);
    u = (u > clip) ? (real_t)(clip) : u;
    u = (u < -clip) ? (real_t)(-clip) : u;
#endif

#if MOMENTUM
    /* b = momentum * b + u;  param -= lr * b */
    real_t b = *momentum_buffer * momentum + u;
    real_t p = *param + (-lr) * b;
#else
    /* param -= lr * u */
    real_t p = *param + (-lr) * u;
#endif

    /* write back only where the gradient was finite (component-wise for vectors) */
    const real_t unchanged = *param;
    *param = isfinite(g) ? p : unchanged;
    *square_avg = isfinite(g) ? v : *square_avg;
#if CENTERED
    *grad_avg = isfinite(g) ? m : *grad_avg;
#endif
#if MOMENTUM
    *momentum_buffer = isfinite(g) ? b : *momentum_buffer;
#endif
}

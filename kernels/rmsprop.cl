/* RMSProp: the update of one element.
 *
 * netcl's kernel builder (netcl/_kernels.py) puts this file in front of the kernel,
 * which calls `update` once per element with private copies of its values and writes
 * them back only where `update` returns true. Before this file it defines `real` (the
 * parameter's type, float or double), `REAL_MAX` (its largest finite value),
 * `FINITE(x)` (x is neither infinite nor NaN, tested on its exponent bits, cheaper than
 * PoCL's `isfinite`) and `SQRT(x)` (the correctly rounded square root).
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
 * - an element whose gradient is NaN or infinite is left as it was, state included
 *   (`update` returns false: the kernel does not write it, and SIMD code stores the
 *   others under a mask instead of blending old and new values);
 * - v saturates at REAL_MAX instead of overflowing to infinity, so it decays again;
 * - without centering, g / (sqrt(v) + eps) is clamped to +-clip = 1 / sqrt(1 - alpha),
 *   the bound it has in exact arithmetic (v >= (1 - alpha) * g^2), so a step moves a
 *   parameter by at most lr * clip / (1 - momentum);
 * - with centering, v - m^2 below zero (rounding) counts as zero.
 */
inline bool update(
    real *param, real grad,
    real *square_avg, real *momentum_buffer, real *grad_avg,
    real lr, real alpha, real one_minus_alpha, real eps,
    real weight_decay, real momentum, real clip)
{
    real g = grad;
#if MAXIMIZE
    g = -g;
#endif
#if WEIGHT_DECAY
    g = g + weight_decay * *param;
#endif

    /* v = alpha * v + (1 - alpha) * g^2; squaring first rounds a little less often in
       the worst case than torch's ((1 - alpha) * g) * g (at most 2 ulp against 2.1) */
    real v = *square_avg * alpha + one_minus_alpha * (g * g);
    v = (v < REAL_MAX) ? v : (real)(REAL_MAX);

#if CENTERED
    /* m = alpha * m + (1 - alpha) * g;  u = g / (sqrt(v - m^2) + eps) */
    real m = *grad_avg * alpha + one_minus_alpha * g;
    real variance = v - m * m;
    variance = (variance > (real)0) ? variance : (real)(0);
    real u = g / (SQRT(variance) + eps);
#else
    /* u = g / (sqrt(v) + eps) */
    real u = g / (SQRT(v) + eps);
    u = (u > clip) ? (real)(clip) : u;
    u = (u < -clip) ? (real)(-clip) : u;
#endif

#if MOMENTUM
    /* b = momentum * b + u;  param -= lr * b */
    real b = *momentum_buffer * momentum + u;
    real p = *param + (-lr) * b;
#else
    /* param -= lr * u */
    real p = *param + (-lr) * u;
#endif

    *param = p;
    *square_avg = v;
#if CENTERED
    *grad_avg = m;
#endif
#if MOMENTUM
    *momentum_buffer = b;
#endif
    /* written back only where the gradient was finite */
    return FINITE(g);
}

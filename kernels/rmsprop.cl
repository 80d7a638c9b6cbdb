/* RMSProp: the update of one element.
 *
 * netcl's kernel builder (netcl/_kernels.py) puts this file in front of the kernel,
 * which calls `update` once per element with private copies of its values and writes
 * them back (only where the gradient is finite, unless the optimizer was asked to let
 * NaN through). Before this file it defines `real` (the parameter's type, float or
 * double), `REAL_MAX` (its largest finite value), `FINITE(x)` (x is neither infinite nor
 * NaN, tested on its exponent bits, cheaper than PoCL's `isfinite`), `SAT(x)` (x, or
 * +-REAL_MAX where it overflowed) and `SQRT(x)` (the correctly rounded square root).
 *
 * Variant flags, fixed at build time: MAXIMIZE, WEIGHT_DECAY, CENTERED, MOMENTUM.
 * State buffers that the variant does not use are passed as dummies and never read.
 *
 * The order of operations is torch.optim.RMSprop's (but for squaring g before scaling
 * it, which is more accurate), and netcl's array-API
 * path (netcl/optim/rmsprop.py) writes the same expressions in the same order; the
 * builder turns FP_CONTRACT off so that no multiply-add is fused behind our back.
 *
 * Extreme values: a finite gradient never makes a parameter or state value infinite or
 * NaN. With selects rather than fmin/fmax/clamp, whose NaN rules cost a third of the
 * step on PoCL:
 * - g after weight decay, v, m, b and the parameter saturate at +-REAL_MAX instead of
 *   overflowing (v then decays again);
 * - where g^2 overflows but (1 - alpha) * g^2 need not, v takes torch's order
 *   ((1 - alpha) * g) * g, so that it saturates only where the true value overflows;
 * - without centering, g / (sqrt(v) + eps) is clamped to +-clip = 1 / sqrt(1 - alpha),
 *   the bound it has in exact arithmetic (v >= (1 - alpha) * g^2), so a step moves a
 *   parameter by at most lr * clip / (1 - momentum);
 * - with centering, v - m^2 below zero (rounding) counts as zero, and where m^2
 *   overflows (the variance cannot be estimated in this dtype) u is computed as
 *   without centering, clamp included (sqrt(v) >= sqrt(v - m^2)).
 */
inline void update(
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
    g = SAT(g + weight_decay * *param);
#endif

    /* v = alpha * v + (1 - alpha) * g^2; squaring first rounds a little less often in
       the worst case than torch's ((1 - alpha) * g) * g (at most 2 ulp against 2.1).
       (Overflow tests compare with REAL_MAX: PoCL vectorizes those, not FINITE here.) */
    const real square = g * g;
    const real scaled = (square <= REAL_MAX) ? one_minus_alpha * square : (one_minus_alpha * g) * g;
    real v = *square_avg * alpha + scaled;
    v = (v > REAL_MAX) ? (real)(REAL_MAX) : v;

#if CENTERED
    /* m = alpha * m + (1 - alpha) * g;  u = g / (sqrt(v - m^2) + eps) */
    const real m = SAT(*grad_avg * alpha + one_minus_alpha * g);
    const real mm = m * m;
    real variance = v - mm;
    variance = (variance < (real)0) ? (real)(0) : variance;
    const bool estimable = mm <= REAL_MAX;
    variance = estimable ? variance : v;
    real u = SAT(g / (SQRT(variance) + eps));
    const real bounded = (u > clip) ? (real)(clip) : ((u < -clip) ? (real)(-clip) : u);
    u = estimable ? u : bounded;
#else
    /* u = g / (sqrt(v) + eps) */
    real u = g / (SQRT(v) + eps);
    u = (u > clip) ? (real)(clip) : u;
    u = (u < -clip) ? (real)(-clip) : u;
#endif

#if MOMENTUM
    /* b = momentum * b + u;  param -= lr * b */
    const real b = SAT(*momentum_buffer * momentum + u);
    const real p = SAT(*param + (-lr) * b);
#else
    /* param -= lr * u */
    const real p = SAT(*param + (-lr) * u);
#endif

    *param = p;
    *square_avg = v;
#if CENTERED
    *grad_avg = m;
#endif
#if MOMENTUM
    *momentum_buffer = b;
#endif
}

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
 * Variant flags, fixed at build time: MAXIMIZE, WEIGHT_DECAY, CENTERED, MOMENTUM, and
 * the other frameworks' options: EPS_IN_SQRT (g / sqrt(v + eps)), INITIAL_SCALE (v starts
 * at `initial`, a parameter's own scalar: the scale on its first step, else 0),
 * BIAS_CORRECTION (v and m divided by `correction` = 1 - alpha^t in the denominator),
 * NESTEROV (the step is u + momentum * b) and DECOUPLED_WEIGHT_DECAY (param *= `decay` =
 * 1 - lr * weight_decay first; the gradient is left as it is).
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
    real weight_decay, real momentum, real clip, real decay
#if INITIAL_SCALE || BIAS_CORRECTION
    , real initial, real correction  /* the parameter's own: only where a switch uses them */
#endif
    )
{
    real g = grad;
#if MAXIMIZE
    g = -g;
#endif
#if WEIGHT_DECAY
    g = SAT(g + weight_decay * *param);
#endif
#if DECOUPLED_WEIGHT_DECAY
    const real kept = *param * decay;
#else
    const real kept = *param;
#endif

    /* v = alpha * v + (1 - alpha) * g^2; squaring first rounds a little less often in
       the worst case than torch's ((1 - alpha) * g) * g (at most 2 ulp against 2.1).
       (Overflow tests compare with REAL_MAX: PoCL vectorizes those, not FINITE here.) */
    const real square = g * g;
    const real scaled = (square <= REAL_MAX) ? one_minus_alpha * square : (one_minus_alpha * g) * g;
#if INITIAL_SCALE
    real v = (*square_avg + initial) * alpha + scaled;
#else
    real v = *square_avg * alpha + scaled;
#endif
    v = (v > REAL_MAX) ? (real)(REAL_MAX) : v;
#if BIAS_CORRECTION
    const real vh = v / correction;  /* >= v: the clip below still bounds u */
#else
    const real vh = v;
#endif

#if CENTERED
    /* m = alpha * m + (1 - alpha) * g;  u = g / (sqrt(v - m^2) + eps) */
    const real m = SAT(*grad_avg * alpha + one_minus_alpha * g);
#if BIAS_CORRECTION
    const real mh = m / correction;
#else
    const real mh = m;
#endif
    const real mm = mh * mh;
    real variance = vh - mm;
    variance = (variance < (real)0) ? (real)(0) : variance;
    /* (the test written out twice rather than kept in a bool: `update` is also built
       for vectors of values, see vector.cl) */
    variance = (mm <= REAL_MAX) ? variance : vh;
#if EPS_IN_SQRT
    real u = SAT(g / SQRT(variance + eps));
#else
    real u = SAT(g / (SQRT(variance) + eps));
#endif
    const real bounded = (u > clip) ? (real)(clip) : ((u < -clip) ? (real)(-clip) : u);
    u = (mm <= REAL_MAX) ? u : bounded;
#else
    /* u = g / (sqrt(v) + eps) */
#if EPS_IN_SQRT
    real u = g / SQRT(vh + eps);
#else
    real u = g / (SQRT(vh) + eps);
#endif
    u = (u > clip) ? (real)(clip) : u;
    u = (u < -clip) ? (real)(-clip) : u;
#endif

#if MOMENTUM
    /* b = momentum * b + u;  param -= lr * b (Nesterov: lr * (u + momentum * b)) */
    const real b = SAT(*momentum_buffer * momentum + u);
#if NESTEROV
    const real p = SAT(kept + (-lr) * SAT(u + momentum * b));
#else
    const real p = SAT(kept + (-lr) * b);
#endif
#else
    /* param -= lr * u */
    const real p = SAT(kept + (-lr) * u);
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

/* Adam and AdamW: the update of one element (see rmsprop.cl for what netcl's kernel
 * builder defines before this file and how it writes the results back).
 *
 * Variant flags: MAXIMIZE, WEIGHT_DECAY, DECOUPLED (AdamW's weight decay), AMSGRAD.
 * The parameter's own scalars: step_size = lr / (1 - beta1^t) and
 * bias_correction2_sqrt = sqrt(1 - beta2^t), computed on the host from its step t.
 *
 * The order of operations is torch.optim.Adam's (the first moment is torch's lerp);
 * netcl/optim/adam.py writes the same. A finite gradient never makes a value infinite
 * or NaN: g after weight decay, m, v and the parameter saturate at +-REAL_MAX, and where
 * the lerp's g - m overflows, m is computed as beta1 * m + (1 - beta1) * g, which cannot.
 */
inline void update(
    real *param, real grad,
    real *exp_avg, real *exp_avg_sq, real *max_exp_avg_sq,
    real weight, real beta1, real beta2, real one_minus_beta2, real eps,
    real weight_decay, real decay,
    real step_size, real bias_correction2_sqrt)
{
    real g = grad;
#if MAXIMIZE
    g = -g;
#endif
    real p = *param;
#if WEIGHT_DECAY
#if DECOUPLED
    p = SAT(p * decay);            /* param *= 1 - lr * weight_decay */
#else
    g = SAT(g + weight_decay * p);
#endif
#endif

    /* m = lerp(m, g, 1 - beta1), as torch computes it */
    const real m0 = *exp_avg;
    const real d = g - m0;
    real m = (weight < (real)0.5) ? m0 + weight * d : g - d * beta1;
    m = (d <= REAL_MAX && d >= -REAL_MAX) ? m : beta1 * m0 + weight * g;
    m = SAT(m);
    /* v = beta2 * v + (1 - beta2) * g^2 */
    real v = *exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    v = (v > REAL_MAX) ? (real)(REAL_MAX) : v;
#if AMSGRAD
    const real vmax0 = *max_exp_avg_sq;
    real vmax = (vmax0 > v) ? vmax0 : v;
    real denom = SQRT(vmax) / bias_correction2_sqrt + eps;
#else
    real denom = SQRT(v) / bias_correction2_sqrt + eps;
#endif
    p = SAT(p + (-step_size) * (m / denom));

    *param = p;
    *exp_avg = m;
    *exp_avg_sq = v;
#if AMSGRAD
    *max_exp_avg_sq = vmax;
#endif
}

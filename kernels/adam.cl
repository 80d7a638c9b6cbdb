/* Adam and AdamW: the update of one element, or of one vector of elements (see
 * rmsprop.cl for how netcl's kernel builder includes this file).
 *
 * Variant flags: MAXIMIZE, WEIGHT_DECAY, DECOUPLED (AdamW's weight decay), AMSGRAD.
 * The parameter's own scalars: step_size = lr / (1 - beta1^t) and
 * bias_correction2_sqrt = sqrt(1 - beta2^t), computed on the host from its step t.
 *
 * The order of operations is torch.optim.Adam's (the first moment is torch's lerp);
 * netcl/optim/adam.py writes the same. An element whose gradient is NaN or infinite is
 * left as it was, state included, and the second moment saturates at REAL_MAX.
 */
inline void UPDATE(
    real_t *param, real_t grad,
    real_t *exp_avg, real_t *exp_avg_sq, real_t *max_exp_avg_sq,
    real weight, real beta1, real beta2, real one_minus_beta2, real eps,
    real weight_decay, real decay,
    real step_size, real bias_correction2_sqrt)
{
    real_t g = grad;
#if MAXIMIZE
    g = -g;
#endif
    real_t p = *param;
#if WEIGHT_DECAY
#if DECOUPLED
    p = p * decay;                 /* param *= 1 - lr * weight_decay */
#else
    g = g + weight_decay * p;
#endif
#endif

    /* m = lerp(m, g, 1 - beta1), as torch computes it */
    const real_t m0 = *exp_avg;
    real_t m = (weight < (real)0.5) ? m0 + weight * (g - m0) : g - (g - m0) * beta1;
    /* v = beta2 * v + (1 - beta2) * g^2 */
    real_t v = *exp_avg_sq * beta2 + one_minus_beta2 * g * g;
    v = (v < REAL_MAX) ? v : (real_t)(REAL_MAX);
#if AMSGRAD
    const real_t vmax0 = *max_exp_avg_sq;
    real_t vmax = (vmax0 > v) ? vmax0 : v;
    real_t denom = sqrt(vmax) / bias_correction2_sqrt + eps;
#else
    real_t denom = sqrt(v) / bias_correction2_sqrt + eps;
#endif
    p = p + (-step_size) * (m / denom);

    const real_t unchanged = *param;
    *param = isfinite(g) ? p : unchanged;
    *exp_avg = isfinite(g) ? m : m0;
    *exp_avg_sq = isfinite(g) ? v : *exp_avg_sq;
#if AMSGRAD
    *max_exp_avg_sq = isfinite(g) ? vmax : *max_exp_avg_sq;
#endif
}

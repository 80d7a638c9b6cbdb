/* SGD: the update of one element (see rmsprop.cl for what netcl's kernel builder
 * defines before this file and how it writes the results back).
 *
 * Variant flags: MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV.
 * `first` is the parameter's own scalar: 1 on the step that starts its momentum buffer,
 * which torch starts as a copy of the gradient, not from zero.
 *
 * The order of operations is torch.optim.SGD's; netcl/optim/sgd.py writes the same.
 * A finite gradient never makes a value infinite or NaN: g after weight decay, the
 * momentum buffer, the step and the parameter saturate at +-REAL_MAX.
 */
inline void update(
    real *param, real grad, real *momentum_buffer,
    real lr, real momentum, real one_minus_dampening, real weight_decay,
    real first)
{
    real d = grad;
#if MAXIMIZE
    d = -d;
#endif
#if WEIGHT_DECAY
    d = SAT(d + weight_decay * *param);
#endif
    const real g = d;

#if MOMENTUM
    /* b = g on the first step, else b = momentum * b + (1 - dampening) * g */
    const real b = (first != 0) ? g : SAT(*momentum_buffer * momentum + one_minus_dampening * g);
#if NESTEROV
    d = SAT(g + momentum * b);
#else
    d = b;
#endif
#endif

    /* param -= lr * d */
    const real p = SAT(*param + (-lr) * d);

    *param = p;
#if MOMENTUM
    *momentum_buffer = b;
#endif
}

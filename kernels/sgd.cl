/* SGD: the update of one element (see rmsprop.cl for what netcl's kernel builder
 * defines before this file).
 *
 * Variant flags: MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV.
 * `first` is the parameter's own scalar: 1 on the step that starts its momentum buffer,
 * which torch starts as a copy of the gradient, not from zero.
 *
 * The order of operations is torch.optim.SGD's; netcl/optim/sgd.py writes the same.
 * An element whose gradient is NaN or infinite is left as it was, state included
 * (`update` returns false).
 */
inline bool update(
    real *param, real grad, real *momentum_buffer,
    real lr, real momentum, real one_minus_dampening, real weight_decay,
    real first)
{
    real d = grad;
#if MAXIMIZE
    d = -d;
#endif
#if WEIGHT_DECAY
    d = d + weight_decay * *param;
#endif
    const real g = d;

#if MOMENTUM
    /* b = g on the first step, else b = momentum * b + (1 - dampening) * g */
    real b = (first != 0) ? g : *momentum_buffer * momentum + one_minus_dampening * g;
#if NESTEROV
    d = g + momentum * b;
#else
    d = b;
#endif
#endif

    /* param -= lr * d */
    const real p = *param + (-lr) * d;

    *param = p;
#if MOMENTUM
    *momentum_buffer = b;
#endif
    return FINITE(g);
}

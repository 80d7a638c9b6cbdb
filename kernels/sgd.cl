/* SGD: the update of one element, or of one vector of elements (see rmsprop.cl for how
 * netcl's kernel builder includes this file).
 *
 * Variant flags: MAXIMIZE, WEIGHT_DECAY, MOMENTUM, NESTEROV.
 * `first` is the parameter's own scalar: 1 on the step that starts its momentum buffer,
 * which torch starts as a copy of the gradient, not from zero.
 *
 * The order of operations is torch.optim.SGD's; netcl/optim/sgd.py writes the same.
 * An element whose gradient is NaN or infinite is left as it was, state included.
 */
inline void UPDATE(
    real_t *param, real_t grad, real_t *momentum_buffer,
    real lr, real momentum, real one_minus_dampening, real weight_decay,
    real first)
{
    real_t d = grad;
#if MAXIMIZE
    d = -d;
#endif
#if WEIGHT_DECAY
    d = d + weight_decay * *param;
#endif
    const real_t g = d;

#if MOMENTUM
    /* b = g on the first step, else b = momentum * b + (1 - dampening) * g */
    real_t b = (first != 0) ? g : *momentum_buffer * momentum + one_minus_dampening * g;
#if NESTEROV
    d = g + momentum * b;
#else
    d = b;
#endif
#endif

    /* param -= lr * d */
    const real_t p = *param + (-lr) * d;

    const real_t unchanged = *param;
    *param = isfinite(g) ? p : unchanged;
#if MOMENTUM
    *momentum_buffer = isfinite(g) ? b : *momentum_buffer;
#endif
}

/* float16 parameters, 8 values at a time, where the compiler targets x86's F16C and AVX.
 *
 * netcl's kernel builder (netcl/_kernels.py) puts this file after the optimizer's source
 * and builds that source a second time as `update8`, whose values are float8 vectors:
 * the same operations in the same order on each lane, so the same bits. A CPU's kernel
 * then updates a float16 parameter 8 values at a time where VECTOR_HALF is 1, and the
 * values left over one at a time.
 *
 * Why: PoCL's compiler turns the loop over values into SIMD code itself, but the exact
 * rounding of float to float16 (to_half_bits in precision.cl) costs a fifth of the step
 * there, while x86's vcvtps2ph rounds 8 values to nearest even in one instruction. The
 * compiler does not turn that builtin, called on values of a scalar loop, into SIMD code
 * (the loop stayed scalar, 4x slower), so the loop is written over vectors here. The
 * arrays are read and written through pointers to unaligned vector types: PoCL's
 * vload8 and vstore8 are calls into its library (2.2x slower).
 *
 * What this file defines, where VECTOR_HALF is 1:
 * LOAD8(p, c), STORE8(p, c, x)            8 floats of p from index c
 * LOAD_HALF8(p, c), STORE_HALF8(p, c, x)  8 float16 values (as ushort) of p from index c
 * FROM_HALF8(h)                           them as float8 (exact, specials included)
 * LOADED_FINITE8(x)                       a lane mask (-1 or 0): the value of x loaded
 *                                         with FROM_HALF8 was finite
 * to_half8(x)                             TO_STORAGE for 8 values: saturated at 65504,
 *                                         NaN made float16's quiet NaN of its sign,
 *                                         rounded to nearest even
 */
#if defined(__F16C__) && defined(__AVX__) && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_vcvtps2ph256) && __has_builtin(__builtin_ia32_vcvtph2ps256) && \
    __has_builtin(__builtin_ia32_sqrtps256)
#define VECTOR_HALF 1
#endif
#endif
#ifndef VECTOR_HALF
#define VECTOR_HALF 0
#endif

#if VECTOR_HALF
typedef float float8u __attribute__((ext_vector_type(8), aligned(4)));
typedef ushort ushort8u __attribute__((ext_vector_type(8), aligned(2)));

#define LOAD8(p, c) (*(__global const float8u *)((p) + (c)))
#define STORE8(p, c, x) (*(__global float8u *)((p) + (c)) = (x))
#define LOAD_HALF8(p, c) (*(__global const ushort8u *)((p) + (c)))
#define STORE_HALF8(p, c, x) (*(__global ushort8u *)((p) + (c)) = (x))
#define FROM_HALF8(h) __builtin_ia32_vcvtph2ps256(as_short8(h))
#define LOADED_FINITE8(x) ((as_uint8(x) & 0x7fffffffU) < 0x47800000U) /* |x| < 2**16 */

inline ushort8 to_half8(float8 x)
{
    x = (x > STORAGE_MAX) ? (float8)(STORAGE_MAX) : x;
    x = (x < -STORAGE_MAX) ? (float8)(-STORAGE_MAX) : x;
    x = (x == x) ? x : as_float8((as_uint8(x) & 0x80000000U) | 0x7fc00000U);
    return as_ushort8(__builtin_ia32_vcvtps2ph256(x, 0)); /* 0: to nearest even */
}

/* SAT for vectors (see the builder's preamble) */
inline float8 SAT8(float8 x)
{
    x = (x > (float8)(REAL_MAX)) ? (float8)(REAL_MAX) : x;
    x = (x < (float8)(-REAL_MAX)) ? (float8)(-REAL_MAX) : x;
    return x;
}

/* the optimizer's source again, as update8 over float8 (the builder puts it after this
   file, then undoes these names) */
#undef real
#define real float8
#define update update8
#define SAT SAT8
#undef SQRT
#define SQRT(x) __builtin_ia32_sqrtps256(x) /* correctly rounded, as the scalar one */
#endif

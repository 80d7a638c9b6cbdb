/* How the fused kernel reads and writes a parameter and its gradient in their storage
 * type (see netcl/_precision.py, whose numpy code computes the same bits).
 *
 * STORAGE: 0 the compute type itself (float32 or float64), 1 float16, 2 bfloat16.
 * EXACT_SPECIALS: float16 infinities and NaNs must load as such (see FROM_STORAGE).
 * HARDWARE_HALF: float16 may load with x86's F16C instruction where the compiler
 *   targets it (see FROM_STORAGE).
 * Half values are held as ushort (pyopencl declares no `half` arguments, and no
 * cl_khr_fp16 is needed) and updated in float:
 *
 * FROM_STORAGE(bits)   the stored value as the compute type
 * LOADED_FINITE(x)     whether a value from FROM_STORAGE was finite in its storage type
 * TO_STORAGE(x, r)     x saturated at the storage type's largest finite value (never a
 *                      silent infinity; NaN stays NaN) and rounded to nearest even, or,
 *                      with STOCHASTIC, stochastically: the random bits `r` are added
 *                      below the bits that are kept, which are then truncated.
 *
 * An infinite or NaN half parameter is left as it is by the kernel (the caller writes
 * its stored bits back), as an element with a non-finite gradient is.
 */

/* a 32-bit integer hash (lowbias32): the random bits of stochastic rounding (MIX's
   statements also make vector.cl's mix8, for 8 values) */
#define MIX(x) \
    x ^= x >> 16; \
    x *= 0x7feb352dU; \
    x ^= x >> 15; \
    x *= 0x846ca68bU; \
    x ^= x >> 16
inline uint mix(uint x)
{
    MIX(x);
    return x;
}

#if STORAGE == 0
#define FROM_STORAGE(x) (x)
#define LOADED_FINITE(x) FINITE(x)
#define TO_STORAGE(x, r) (x)
#else

#if STORAGE == 1
#define STORAGE_MAX 65504.0f
#else
#define STORAGE_MAX 3.38953139e38f /* 0x7f7f0000: bfloat16's largest finite value */
#endif

/* x saturated at the storage type's largest finite value (each test is false for NaN,
 * which stays as it is) */
inline float storage_sat(float x)
{
    x = (x > STORAGE_MAX) ? STORAGE_MAX : x;
    return (x < -STORAGE_MAX) ? -STORAGE_MAX : x;
}

/* x, or where it is NaN the quiet NaN of its sign: the one numpy's conversions give,
 * and one that rounding, or random bits added below the kept ones, cannot carry out of */
inline float quiet_nan(float x)
{
    return (x == x) ? x : as_float((as_uint(x) & 0x80000000U) | 0x7fc00000U);
}

#if STORAGE == 1
/* float16 <-> float, in a few integer and float operations that PoCL's compiler turns
 * into SIMD code across work-items. vload_half and vstore_half_rte give the same values
 * but run element by element there (a float16 Adam step took ten times the float32
 * one's time with them), and so did every form of the conversion below that tests for
 * infinity and NaN while loading (and fabs anywhere): the load does not, and maps them to magnitudes of
 * 2**16 and more, which LOADED_FINITE tells apart from float16's finite values (at most
 * 65504). No float32 subnormal is involved in either direction. */

/* The sign and the 15 bits below it, moved to float32's places (the float16 exponent
 * field becomes the low bits of float32's), then scaled by 2**(127 - 15): exact for
 * normal and subnormal values. */
#define HALF_BITS(h) ((((int)(short)(h)) << 13) & (int)0x8fffe000)
#if EXACT_SPECIALS
/* where the update must see infinities and NaNs as they are (nonfinite="propagate",
 * whose state takes them in): the slower, exact conversion */
#define FROM_STORAGE(h) \
    ((((h) & 0x7c00) == 0x7c00) ? as_float(HALF_BITS(h) | 0x7f800000) : as_float(HALF_BITS(h)) * 0x1.0p112f)
#else
#if HARDWARE_HALF && defined(__F16C__) && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_vcvtph2ps)
/* x86's conversion (vcvtph2ps), which PoCL's compiler turns into one SIMD instruction
 * per 8 values where the formula below takes 4: the same values, exactly (infinities
 * and NaNs load as such, which LOADED_FINITE tells apart as well) */
#define FROM_STORAGE(h) (__builtin_ia32_vcvtph2ps((short8)((short)(h), 0, 0, 0, 0, 0, 0, 0))[0])
#endif
#endif
#ifndef FROM_STORAGE
#define FROM_STORAGE(h) (as_float(HALF_BITS(h)) * 0x1.0p112f)
#endif
#endif
#define LOADED_FINITE(x) ((as_uint(x) & 0x7fffffffU) < 0x47800000U) /* |x| < 2**16 */

/* float -> float16 bits, to nearest even (after storage_sat: |x| <= 65504, or NaN, which
 * becomes float16's quiet NaN of its sign, 0x7e00 or 0xfe00, as numpy's conversion
 * makes float32's quiet NaN) */
inline ushort to_half_bits(float x)
{
    const uint bits = as_uint(x);
    const uint sign = (bits >> 16) & 0x8000U;
    const uint magnitude = bits & 0x7fffffffU;
    /* below 2**-14, float16 is subnormal: adding 0.5 rounds to its grid (2**-24 is the
     * ulp of 0.5), and the bits below 0.5's are the result */
    const uint subnormal = as_uint(as_float(magnitude) + 0.5f) - 0x3f000000U;
    /* else: rebias the exponent (- (127 - 15) << 23), round the 13 dropped bits to
     * nearest even */
    const uint normal = (magnitude + 0xc8000fffU + ((magnitude >> 13) & 1U)) >> 13;
    const uint finite = magnitude < 0x38800000U ? subnormal : normal;
    return (ushort)((magnitude > 0x7f800000U ? 0x7e00U : finite) | sign);
}

/* x on float16's grid, rounded stochastically with the random bits r */
inline float to_half_grid(float x, uint r)
{
    const uint bits = as_uint(x);
    const int exponent = (bits >> 23) & 0xff;
    /* float16 keeps 10 of the 23 mantissa bits down to 2**-14, one fewer per binade
     * below (its ulp stays 2**-24) */
    const int drop = exponent >= 113 ? 13 : 126 - exponent;
    /* below 2**-24: 2**-24 with probability |x| / 2**-24 (to 32 bits), else 0 */
    const float magnitude = as_float(bits & 0x7fffffffU);
    const uint threshold = (uint)((drop > 23 ? magnitude : 0.0f) * 72057594037927936.0f); /* 2**56 */
    const float small = r < threshold ? 5.9604644775390625e-8f : 0.0f;
    /* (a select, not min(): on PoCL a call, which kept the loop scalar, 6 times slower) */
    const uint mask = (1U << (drop < 23 ? drop : 23)) - 1U;
    const float kept = as_float((bits + (r & mask)) & ~mask);
    return drop > 23 ? ((bits >> 31) ? -small : small) : kept;
}

#if STOCHASTIC
#define TO_STORAGE(x, r) to_half_bits(to_half_grid(quiet_nan(storage_sat(x)), (r)))
#else
#define TO_STORAGE(x, r) to_half_bits(storage_sat(x))
#endif

#else /* bfloat16: the upper 16 bits of a float */
#define FROM_STORAGE(b) as_float(((uint)(b)) << 16)
#define LOADED_FINITE(x) FINITE(x)

inline ushort to_bfloat16(float x, uint r)
{
    const uint bits = as_uint(quiet_nan(storage_sat(x)));
#if STOCHASTIC
    return (ushort)((bits + (r & 0xffffU)) >> 16);
#else
    /* to nearest even (NaN: quiet_nan made it one this keeps) */
    return (ushort)((bits + 0x7fffU + ((bits >> 16) & 1U)) >> 16);
#endif
}

#define TO_STORAGE(x, r) to_bfloat16((x), (r))
#endif
#endif

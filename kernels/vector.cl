/* A CPU's loop over a float16 parameter, 8 values at a time, where the compiler targets
 * x86's AVX and F16C; over a float32 or bfloat16 one where it targets AVX but not
 * AVX-512.
 *
 * netcl's kernel builder (netcl/_kernels.py) puts this file after the optimizer's source
 * and precision.cl, and builds that source a second time as `update8`, whose values are
 * float8 vectors: the same operations in the same order on each lane, so the same bits.
 * Where VECTOR is 1, a CPU's kernel then updates a parameter 8 values at a time and the
 * values left over one at a time.
 *
 * Why: PoCL's compiler turns the loop over single values into SIMD code itself, but
 * - the exact rounding of float to float16 (to_half_bits in precision.cl) cost a fifth
 *   of a float16 step there, while F16C's vcvtps2ph rounds 8 values to nearest even in
 *   one instruction, which the compiler does not turn into SIMD code when it is called
 *   on the values of a loop over single values (that loop stayed scalar, 4x slower);
 * - a loop over vectors can prefetch (the builder's code: 512 values ahead in each
 *   array), which took a float32 Adam step from memory 9 to 13% faster (a throwaway
 *   kernel, three runs, AVX2); in the loop over single values it made the step slower.
 * Where the compiler targets AVX-512 (PoCL 3.1 with LLVM 15 on an AMD Zen 5, compiling
 * for skylake-avx512), its own SIMD code of the loop over single values was the faster
 * one for float32 and bfloat16 (Adam and RMSProp at 2**24 values, alternated runs: 3 to
 * 5% and 10 to 15%), and this file's for float16 (12 to 18%; 27% with stochastic
 * rounding).
 * The arrays are read and written through pointers to unaligned vector types: PoCL's
 * vload8 and vstore8 are calls into its library (2.2x slower).
 *
 * What this file defines, where VECTOR is 1 (STORAGE as in precision.cl):
 * STORED8                          the type of 8 stored values (float8 or ushort8)
 * LOAD8(p, c), STORE8(p, c, x)     8 floats of p (a state buffer) from index c
 * LOAD_STORED8(p, c), STORE_STORED8(p, c, x)
 *                                  8 stored values of p (the parameter, its gradient)
 * FROM_STORAGE8(x)                 8 stored values as float8 (exact, specials included)
 * LOADED_FINITE8(x)                a lane mask (-1 or 0): the value of x loaded with
 *                                  FROM_STORAGE8 was finite in its storage type
 * RANDOM8(key, c)                  the random bits of stochastic rounding of the values
 *                                  at c .. c + 7 (those of the loop over single values)
 * TO_STORAGE8(x, r)                TO_STORAGE for 8 values, with their random bits r
 * SELECT_STORED(keep, a, b)        a where the lane mask keep is set, else b
 */
#if defined(__AVX__) && defined(__has_builtin)
#if __has_builtin(__builtin_ia32_sqrtps256)
#if STORAGE != 1
#ifndef __AVX512F__
#define VECTOR 1
#endif
#elif defined(__F16C__) && __has_builtin(__builtin_ia32_vcvtps2ph256) && __has_builtin(__builtin_ia32_vcvtph2ps256)
#define VECTOR 1
#endif
#endif
#endif
#ifndef VECTOR
#define VECTOR 0
#endif

#if VECTOR
typedef float float8u __attribute__((ext_vector_type(8), aligned(4)));
typedef ushort ushort8u __attribute__((ext_vector_type(8), aligned(2)));
#define FINITE8(x) ((as_uint8(x) & 0x7f800000U) != 0x7f800000U)
#define LOAD8(p, c) (*(__global const float8u *)((p) + (c)))
#define STORE8(p, c, x) (*(__global float8u *)((p) + (c)) = (x))

#if STORAGE == 0
#define STORED8 float8
#define LOAD_STORED8(p, c) LOAD8(p, c)
#define STORE_STORED8(p, c, x) STORE8(p, c, x)
#define FROM_STORAGE8(x) (x)
#define LOADED_FINITE8(x) FINITE8(x)
#define TO_STORAGE8(x, r) (x)
#define SELECT_STORED(keep, a, b) ((keep) ? (a) : (b))
#else
#define STORED8 ushort8
#define LOAD_STORED8(p, c) (*(__global const ushort8u *)((p) + (c)))
#define STORE_STORED8(p, c, x) (*(__global ushort8u *)((p) + (c)) = (x))
#define SELECT_STORED(keep, a, b) (convert_short8(keep) ? (a) : (b))

/* x saturated at the storage type's largest finite value, NaN made the quiet NaN of its
   sign (storage_sat and quiet_nan of precision.cl, for 8 values) */
inline float8 storage_sat8(float8 x)
{
    x = (x > STORAGE_MAX) ? (float8)(STORAGE_MAX) : x;
    x = (x < -STORAGE_MAX) ? (float8)(-STORAGE_MAX) : x;
    return (x == x) ? x : as_float8((as_uint8(x) & 0x80000000U) | 0x7fc00000U);
}

#if STORAGE == 1
#define FROM_STORAGE8(h) __builtin_ia32_vcvtph2ps256(as_short8(h))
#define LOADED_FINITE8(x) ((as_uint8(x) & 0x7fffffffU) < 0x47800000U) /* |x| < 2**16 */
#if STOCHASTIC
/* to_half_grid (precision.cl) of 8 values: the values it gives are float16 values, which
   vcvtps2ph's rounding to nearest even then converts exactly (NaN: storage_sat8 made it
   the quiet NaN that to_half_bits gives too) */
inline float8 to_half_grid8(float8 x, uint8 r)
{
    const uint8 bits = as_uint8(x);
    const int8 exponent = as_int8((bits >> 23) & 0xffU);
    /* where all 8 are at least 2**-14 (or infinite or NaN), float16 keeps 10 of their
       23 mantissa bits: the same result in a third of the operations */
    const ulong4 below = as_ulong4(exponent < 113);
    if ((below.s0 | below.s1 | below.s2 | below.s3) == 0)
        return as_float8((bits + (r & 0x1fffU)) & ~0x1fffU);
    const int8 drop = exponent >= 113 ? (int8)(13) : (int8)(126) - exponent;
    const float8 magnitude = as_float8(bits & 0x7fffffffU);
    const float8 scaled = (drop > 23 ? magnitude : (float8)(0.0f)) * 72057594037927936.0f; /* 2**56 */
    const uint8 threshold = __builtin_convertvector(scaled, uint8);
    const float8 small = r < threshold ? (float8)(5.9604644775390625e-8f) : (float8)(0.0f);
    const uint8 mask = ((uint8)(1U) << as_uint8(drop < 23 ? drop : (int8)(23))) - 1U;
    const float8 kept = as_float8((bits + (r & mask)) & ~mask);
    return drop > 23 ? (as_int8(bits) < 0 ? -small : small) : kept;
}
#define TO_STORAGE8(x, r) as_ushort8(__builtin_ia32_vcvtps2ph256(to_half_grid8(storage_sat8(x), (r)), 0))
#else
/* 0: to nearest even */
#define TO_STORAGE8(x, r) as_ushort8(__builtin_ia32_vcvtps2ph256(storage_sat8(x), 0))
#endif
#else
#define FROM_STORAGE8(b) as_float8(convert_uint8(b) << 16)
#define LOADED_FINITE8(x) FINITE8(x)
inline ushort8 to_bfloat16_8(float8 x, uint8 r)
{
    const uint8 bits = as_uint8(storage_sat8(x));
#if STOCHASTIC
    return convert_ushort8((bits + (r & 0xffffU)) >> 16);
#else
    return convert_ushort8((bits + 0x7fffU + ((bits >> 16) & 1U)) >> 16); /* to nearest even */
#endif
}
#define TO_STORAGE8(x, r) to_bfloat16_8((x), (r))
#endif
#endif

/* mix (precision.cl) of 8 values */
inline uint8 mix8(uint8 x)
{
    MIX(x);
    return x;
}
/* ((uint)(c + k) is (uint)c + k, modulo 2**32) */
#define RANDOM8(key, c) mix8(mix((uint)(key)) + ((uint)(c) + (uint8)(0, 1, 2, 3, 4, 5, 6, 7)))

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

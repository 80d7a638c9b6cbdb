/* A CPU's loop over a parameter's values, 16 at a time where the compiler targets x86's
 * AVX-512, else 8 at a time where it targets AVX (and F16C, for a float16 parameter).
 *
 * netcl's kernel builder (netcl/_kernels.py) puts this file after the optimizer's source
 * and precision.cl, and builds that source a second time as `updatev`, whose values are
 * vectors of WIDTH floats (V(float): OpenCL C's float8 or float16, a vector type, not
 * the half-precision one): the same operations in the same order on each lane, so the
 * same bits. Where VECTOR is 1, a CPU's kernel then updates a parameter WIDTH values at a
 * time and the values left over one at a time.
 *
 * Why: PoCL's compiler turns the loop over single values into SIMD code itself, but
 * - the exact rounding of float to float16 (to_half_bits in precision.cl) cost a fifth
 *   of a float16 step there, while x86's vcvtps2ph rounds 8 or 16 values to nearest even
 *   in one instruction, which the compiler does not turn into SIMD code when it is called
 *   on the values of a loop over single values (that loop stayed scalar, 4x slower);
 * - a loop over vectors can prefetch (the builder's code: 512 values ahead in each
 *   array), which took a float32 Adam step from memory 9 to 13% faster (a throwaway
 *   kernel, three runs, AVX2); in the loop over single values it made the step slower;
 * - where the compiler targets AVX-512 (PoCL 3.1 with LLVM 15 on an AMD Zen 5, compiling
 *   for skylake-avx512), 16 values at a time took float16 and bfloat16 Adam and RMSProp
 *   steps 8 to 47% below 8 at a time (float16 with stochastic rounding: 45%), and 8 at
 *   a time was slower there than the compiler's own SIMD code for float32 and bfloat16
 *   (2**24 values, two alternated runs of each).
 * The arrays are read and written through pointers to unaligned vector types: PoCL's
 * vload8 and vstore8 are calls into its library (2.2x slower).
 *
 * MAX_WIDTH (the builder's) caps WIDTH. What this file defines, where VECTOR is 1
 * (STORAGE as in precision.cl):
 * WIDTH, V(type), AS_V(type), CONVERT_V(type)
 *                                  the values at a time; the vector of WIDTH of a type,
 *                                  and the as_ and convert_ functions to it
 * STOREDV                          the type of WIDTH stored values (V(float) or V(ushort))
 * LOADV(p, c), STOREV(p, c, x)     WIDTH floats of p (a state buffer) from index c
 * LOAD_STOREDV(p, c), STORE_STOREDV(p, c, x)
 *                                  WIDTH stored values of p (the parameter, its gradient)
 * FROM_STORAGEV(x)                 stored values as V(float) (exact, specials included)
 * LOADED_FINITEV(x)                a lane mask (-1 or 0): the value of x loaded with
 *                                  FROM_STORAGEV was finite in its storage type
 * RANDOMV(key, c)                  the random bits of stochastic rounding of the values
 *                                  from c on (those of the loop over single values)
 * TO_STORAGEV(x, r)                TO_STORAGE for WIDTH values, with their random bits r
 * SELECT_STORED(keep, a, b)        a where the lane mask keep is set, else b
 * lane_sum(x)                      the sum of the lanes of a V(int)
 */
#ifdef __has_builtin
#if MAX_WIDTH >= 16 && defined(__AVX512F__) && __has_builtin(__builtin_ia32_sqrtps512)
#if __has_builtin(__builtin_ia32_vcvtph2ps512_mask) && __has_builtin(__builtin_ia32_vcvtps2ph512_mask)
#define WIDTH 16
#define SQRTV(x) __builtin_ia32_sqrtps512((x), 4) /* 4: the current rounding, to nearest even */
#define HALF_TO_FLOATV(h) __builtin_ia32_vcvtph2ps512_mask(as_short16(h), (float16)(0.0f), (ushort)0xffff, 4)
/* 0: to nearest even */
#define FLOAT_TO_HALFV(x) as_ushort16(__builtin_ia32_vcvtps2ph512_mask((x), 0, (short16)(0), (ushort)0xffff))
#define LANES (uint16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#endif
#endif
#if !defined(WIDTH) && MAX_WIDTH >= 8 && defined(__AVX__) && __has_builtin(__builtin_ia32_sqrtps256)
#if STORAGE != 1 || (defined(__F16C__) && __has_builtin(__builtin_ia32_vcvtps2ph256))
#define WIDTH 8
#define SQRTV(x) __builtin_ia32_sqrtps256(x)
#define HALF_TO_FLOATV(h) __builtin_ia32_vcvtph2ps256(as_short8(h))
#define FLOAT_TO_HALFV(x) as_ushort8(__builtin_ia32_vcvtps2ph256((x), 0))
#define LANES (uint8)(0, 1, 2, 3, 4, 5, 6, 7)
#endif
#endif
#endif
#ifdef WIDTH
#define VECTOR 1
#else
#define VECTOR 0
#endif

#if VECTOR
#define VCAT_(a, b) a##b
#define VCAT(a, b) VCAT_(a, b)
#define V(type) VCAT(type, WIDTH)
#define AS_V(type) VCAT(as_, V(type))
#define CONVERT_V(type) VCAT(convert_, V(type))

typedef float floatvu __attribute__((ext_vector_type(WIDTH), aligned(4)));
typedef ushort ushortvu __attribute__((ext_vector_type(WIDTH), aligned(2)));
#define FINITEV(x) ((AS_V(uint)(x) & 0x7f800000U) != 0x7f800000U)
#define LOADV(p, c) (*(__global const floatvu *)((p) + (c)))
#define STOREV(p, c, x) (*(__global floatvu *)((p) + (c)) = (x))

/* the lanes of x folded in halves down to 8 (a call per lane would not be) */
#if WIDTH == 16
#define FOLD8(x, op) ((x).lo op (x).hi)
#else
#define FOLD8(x, op) (x)
#endif
inline uint lane_sum(V(int) x)
{
    const int8 e = FOLD8(x, +);
    const int4 f = e.lo + e.hi;
    const int2 g = f.lo + f.hi;
    return (uint)(g.x + g.y);
}
inline bool any_lane(V(int) x)
{
    const int8 e = FOLD8(x, |);
    const int4 f = e.lo | e.hi;
    const int2 g = f.lo | f.hi;
    return (g.x | g.y) != 0;
}

#if STORAGE == 0
#define STOREDV V(float)
#define LOAD_STOREDV(p, c) LOADV(p, c)
#define STORE_STOREDV(p, c, x) STOREV(p, c, x)
#define FROM_STORAGEV(x) (x)
#define LOADED_FINITEV(x) FINITEV(x)
#define TO_STORAGEV(x, r) (x)
#define SELECT_STORED(keep, a, b) ((keep) ? (a) : (b))
#else
#define STOREDV V(ushort)
#define LOAD_STOREDV(p, c) (*(__global const ushortvu *)((p) + (c)))
#define STORE_STOREDV(p, c, x) (*(__global ushortvu *)((p) + (c)) = (x))
#define SELECT_STORED(keep, a, b) (CONVERT_V(short)(keep) ? (a) : (b))

/* x saturated at the storage type's largest finite value, NaN made the quiet NaN of its
   sign (storage_sat and quiet_nan of precision.cl, for WIDTH values) */
inline V(float) storage_satv(V(float) x)
{
    x = (x > STORAGE_MAX) ? (V(float))(STORAGE_MAX) : x;
    x = (x < -STORAGE_MAX) ? (V(float))(-STORAGE_MAX) : x;
    return (x == x) ? x : AS_V(float)((AS_V(uint)(x) & 0x80000000U) | 0x7fc00000U);
}

#if STORAGE == 1
#define FROM_STORAGEV(h) HALF_TO_FLOATV(h)
#define LOADED_FINITEV(x) ((AS_V(uint)(x) & 0x7fffffffU) < 0x47800000U) /* |x| < 2**16 */
#if STOCHASTIC
/* to_half_grid (precision.cl) of WIDTH values: the values it gives are float16 values,
   which vcvtps2ph's rounding to nearest even then converts exactly (NaN: storage_satv
   made it the quiet NaN that to_half_bits gives too) */
inline V(float) to_half_gridv(V(float) x, V(uint) r)
{
    const V(uint) bits = AS_V(uint)(x);
    const V(int) exponent = AS_V(int)((bits >> 23) & 0xffU);
    /* where all are at least 2**-14 (or infinite or NaN), float16 keeps 10 of their 23
       mantissa bits: the same result in a third of the operations */
    if (!any_lane(exponent < 113))
        return AS_V(float)((bits + (r & 0x1fffU)) & ~0x1fffU);
    const V(int) drop = exponent >= 113 ? (V(int))(13) : (V(int))(126) - exponent;
    const V(float) magnitude = AS_V(float)(bits & 0x7fffffffU);
    const V(float) scaled = (drop > 23 ? magnitude : (V(float))(0.0f)) * 72057594037927936.0f; /* 2**56 */
    const V(uint) threshold = __builtin_convertvector(scaled, V(uint));
    const V(float) small = r < threshold ? (V(float))(5.9604644775390625e-8f) : (V(float))(0.0f);
    const V(uint) mask = ((V(uint))(1U) << AS_V(uint)(drop < 23 ? drop : (V(int))(23))) - 1U;
    const V(float) kept = AS_V(float)((bits + (r & mask)) & ~mask);
    return drop > 23 ? (AS_V(int)(bits) < 0 ? -small : small) : kept;
}
#define TO_STORAGEV(x, r) FLOAT_TO_HALFV(to_half_gridv(storage_satv(x), (r)))
#else
#define TO_STORAGEV(x, r) FLOAT_TO_HALFV(storage_satv(x))
#endif
#else
#define FROM_STORAGEV(b) AS_V(float)(CONVERT_V(uint)(b) << 16)
#define LOADED_FINITEV(x) FINITEV(x)
inline V(ushort) to_bfloat16_v(V(float) x, V(uint) r)
{
    const V(uint) bits = AS_V(uint)(storage_satv(x));
#if STOCHASTIC
    return CONVERT_V(ushort)((bits + (r & 0xffffU)) >> 16);
#else
    return CONVERT_V(ushort)((bits + 0x7fffU + ((bits >> 16) & 1U)) >> 16); /* to nearest even */
#endif
}
#define TO_STORAGEV(x, r) to_bfloat16_v((x), (r))
#endif
#endif

/* mix (precision.cl) of WIDTH values */
inline V(uint) mixv(V(uint) x)
{
    MIX(x);
    return x;
}
/* ((uint)(c + k) is (uint)c + k, modulo 2**32) */
#define RANDOMV(key, c) mixv(mix((uint)(key)) + ((uint)(c) + LANES))

/* the optimizer's source again, as updatev over V(float) (the builder puts it after this
   file, then undoes these names), with SAT for vectors (see the builder's preamble) */
#undef real
#define real V(float)
DEFINE_SAT(SATV)
#define update updatev
#define SAT SATV
#undef SQRT
#define SQRT(x) SQRTV(x) /* correctly rounded, as the scalar one */
#endif

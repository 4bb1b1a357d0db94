// The digit kernel of the CKKS block product (see vf_ckks.hpp): every coefficient (< 2^60) is two
// 30-bit digits, a product is four 32x32->64-bit vector multiplies, and each output keeps four
// digit sums (weights 2^0, 2^30, 2^60, 2^90) per coefficient, normalised every kDigitDims
// dimensions: in that time the middle sum of the middle output takes 16 digit products of
// < 2^60 -- still < 2^64, exactly because every digit is < 2^30. The sums are combined mod q
// once per coefficient.
//
// Included once per ISA inside that ISA's namespace and target region (like vf_skeleton.hpp), with
// a vector type V in scope: T (the register), W (64-bit lanes), loadu/load/store, set1, and_,
// shr30 (right shift by 30), mul (_mul_epu32: low 32 bits of each lane), add. No include guard on purpose.

constexpr u64 kDigitMax = u64(1) << 60;  // coefficients (so moduli) must be below this
constexpr int kDigitDims = 4;           // dimensions between normalisations (see above)

// acc[c][g]: digit sums g = 0, 1, 2 (weights 2^0, 2^30, 2^60) of output c for V::W coefficients
// += the products of D dimensions (acc[c][3], weight 2^90, only takes carries in normalise)
template <int D>
static inline void mac_dims(const u64* p, const u64* b, i64 ds, i64 poly, V::T (&acc)[3][4]) {
    const V::T m30 = V::set1((i64(1) << 30) - 1);
    for (int d = 0; d < D; ++d) {
        const V::T p0 = V::loadu(p + d * ds), p1 = V::loadu(p + d * ds + poly);
        const V::T b0 = V::loadu(b + d * ds), b1 = V::loadu(b + d * ds + poly);
        const V::T p0l = V::and_(p0, m30), p0h = V::shr30(p0);
        const V::T p1l = V::and_(p1, m30), p1h = V::shr30(p1);
        const V::T b0l = V::and_(b0, m30), b0h = V::shr30(b0);
        const V::T b1l = V::and_(b1, m30), b1h = V::shr30(b1);
        acc[0][0] = V::add(acc[0][0], V::mul(p0l, b0l));
        acc[0][1] = V::add(acc[0][1], V::add(V::mul(p0l, b0h), V::mul(p0h, b0l)));
        acc[0][2] = V::add(acc[0][2], V::mul(p0h, b0h));
        acc[1][0] = V::add(acc[1][0], V::add(V::mul(p0l, b1l), V::mul(p1l, b0l)));
        acc[1][1] = V::add(acc[1][1], V::add(V::add(V::mul(p0l, b1h), V::mul(p0h, b1l)),
                                             V::add(V::mul(p1l, b0h), V::mul(p1h, b0l))));
        acc[1][2] = V::add(acc[1][2], V::add(V::mul(p0h, b1h), V::mul(p1h, b0h)));
        acc[2][0] = V::add(acc[2][0], V::mul(p1l, b1l));
        acc[2][1] = V::add(acc[2][1], V::add(V::mul(p1l, b1h), V::mul(p1h, b1l)));
        acc[2][2] = V::add(acc[2][2], V::mul(p1h, b1h));
    }
}

// carry each digit sum into the next (digits 0..2 < 2^30 afterwards; digit 3 takes the rest)
static inline void normalise(V::T (&acc)[3][4]) {
    const V::T m30 = V::set1((i64(1) << 30) - 1);
    for (int c = 0; c < 3; ++c) {
        acc[c][1] = V::add(acc[c][1], V::shr30(acc[c][0]));
        acc[c][2] = V::add(acc[c][2], V::shr30(acc[c][1]));
        acc[c][3] = V::add(acc[c][3], V::shr30(acc[c][2]));
        for (int g = 0; g < 3; ++g) acc[c][g] = V::and_(acc[c][g], m30);
    }
}

static void digit_tile(const Shape& s, const u64* P, const u64* B, u64* out, const Modulus& m, i64 fold,
                     i64 l, i64 n0, i64 n1) {
    if (m.q > kDigitMax) { mac_any(s, P, B, out, m, fold, l, n0, n1); return; }
    constexpr i64 kTile = 1024;         // long streams per dimension: measured best at 1-2 K
    alignas(64) u64 sums[3][4][kTile];  // [output][digit][coefficient], 96 KiB (in L2)
    const i64 poly = s.poly(), ds = 2 * poly, off = l * s.n;
    const u64 c60 = static_cast<u64>((u128(1) << 60) % m.q), c90 = static_cast<u64>((u128(1) << 90) % m.q);
    for (i64 t0 = n0; t0 < n1; t0 += kTile) {
        const i64 len = std::min(kTile, n1 - t0), lenw = len / V::W * V::W;
        std::memset(sums, 0, sizeof(sums));
        for (i64 i = 0; i < s.dims; i += kDigitDims) {
            const int dd = static_cast<int>(std::min<i64>(kDigitDims, s.dims - i));
            const u64* p = P + i * ds + off + t0;
            const u64* b = B + i * ds + off + t0;
            for (i64 k = 0; k < lenw; k += V::W) {
                V::T acc[3][4];
                for (int c = 0; c < 3; ++c)
                    for (int g = 0; g < 4; ++g) acc[c][g] = V::load(&sums[c][g][k]);
                switch (dd) {  // acc[c][0..2] take the products, acc[c][3] the carries
                    case 4: mac_dims<4>(p + k, b + k, ds, poly, acc); break;
                    case 3: mac_dims<3>(p + k, b + k, ds, poly, acc); break;
                    case 2: mac_dims<2>(p + k, b + k, ds, poly, acc); break;
                    default: mac_dims<1>(p + k, b + k, ds, poly, acc); break;
                }
                normalise(acc);
                for (int c = 0; c < 3; ++c)
                    for (int g = 0; g < 4; ++g) V::store(&sums[c][g][k], acc[c][g]);
            }
        }
        u64* o = out + off + t0;
        for (int c = 0; c < 3; ++c)
            for (i64 k = 0; k < lenw; ++k) {
                const u128 v = u128(sums[c][0][k] + (sums[c][1][k] << 30)) + u128(sums[c][2][k]) * c60 +
                               u128(sums[c][3][k]) * c90;  // < 2^60 + 2^90 + 2^124
                o[c * poly + k] = m.reduce(v);
            }
        if (lenw < len) mac_any(s, P, B, out, m, fold, l, t0 + lenw, t0 + len);
    }
}

/* Fused per-row statistics of attention tiles, for bayesmanifold's streaming accumulators.
 *
 * Each function takes one tile of [batch, head, query, key] float32 tensors that share their
 * strides (keys contiguous), walks every row of it once (two passes: the row's weighted mean, then
 * everything else), and writes one float per row and statistic into [batch, head, query] buffers.
 * They compute exactly what the tiled PyTorch code in bayesmanifold/analyses computes, in the same
 * dtype, with the sums taken in a different order (results agree to float32 rounding).
 *
 * A row with a non-finite input (NaN or infinity in any tensor read) gets NaN in every statistic,
 * so a check fed NaN cannot report that a law holds.
 *
 * Built at first use with the system's C compiler (bayesmanifold/kernels/build.py); OpenMP
 * threads rows, `omp simd` vectorises each row's loop.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TINY 1.17549435e-38f /* smallest normal float32: log of a clamped 0, times 0, adds 0 */

/* log2 of a positive normal float: the exponent plus log2 of the mantissa taken into
   [sqrt(1/2), sqrt(2)), by the odd series 2 atanh(t) = ln((1 + t) / (1 - t)), |t| <= 0.1716
   (the first omitted term is below 4e-10: about 1 ulp of float32). Vectorises, unlike log2f. */
static inline float log2_pos(float x)
{
    int32_t bits;
    memcpy(&bits, &x, 4);
    int32_t e = ((bits >> 23) & 0xff) - 127;
    int32_t mb = (bits & 0x7fffff) | 0x3f800000;
    float m;
    memcpy(&m, &mb, 4);
    int big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e += big;
    float t = (m - 1.f) / (m + 1.f), t2 = t * t;
    float p = t * (2.f + t2 * (0.666666667f + t2 * (0.4f + t2 * (0.285714286f + t2 * 0.222222222f))));
    return (float)e + p * 1.44269504f;
}

static inline int64_t row_offset(int64_t r, int H, int Q, int64_t sb, int64_t sh, int64_t sq,
                                 int64_t *bi, int64_t *hi, int64_t *qi)
{
    *bi = r / ((int64_t)H * Q);
    *hi = (r / Q) % H;
    *qi = r % Q;
    return *bi * sb + *hi * sh + *qi * sq;
}

static inline void write_row(float **out, int n, int64_t o, const float *v, int bad)
{
    for (int k = 0; k < n; k++)
        if (out[k]) out[k][o] = bad ? NAN : v[k];
}

/* Whether a row's unmasked keys are one run [lo, hi) (causal, sliding-window and padded masks):
   the loops then test the key's index instead of loading the mask, several times cheaper. */
static inline int valid_run(const uint8_t *m, int K, int *lo, int *hi)
{
    int n = 0;
    for (int j = 0; j < K; j++) n += m[j];
    const uint8_t *first = K ? memchr(m, 1, (size_t)K) : NULL;
    if (!first) {
        *lo = *hi = 0;
        return 1;
    }
    int l = (int)(first - m), h = K;
    while (h > l && !m[h - 1]) h--;
    *lo = l;
    *hi = h;
    return n == h - l;
}

#define VALID(j) (ranged ? ((j) >= lo && (j) < hi) : mr[j] != 0)

static inline __attribute__((always_inline)) void
adv_row(int K, const float *restrict ar, const float *restrict pr, const float *restrict sr,
        const uint8_t *restrict mr, int lo, int hi, const int ranged, float *restrict adv, float *v)
{
    float bbar = 0.f;
#pragma omp simd reduction(+ : bbar)
    for (int j = 0; j < K; j++) bbar += ar[j] * pr[j];
    float npos = 0, sadv = 0, ssq = 0, mn = INFINITY, mx = -INFINITY, mass = 0, aadv = 0, apos = 0;
    float wmax = 0, amax = 0, tot = 0, gmax = 0, glogg = 0, nonfinite = 0;
#pragma omp simd reduction(+ : npos, sadv, ssq, mass, aadv, apos, tot, glogg, nonfinite) \
    reduction(min : mn) reduction(max : mx, wmax, amax, gmax)
    for (int j = 0; j < K; j++) {
        float al = ar[j], p = pr[j], s = sr[j];
        float chk = al + p + s;
        nonfinite += (chk - chk) != 0.f;
        float A = VALID(j) ? bbar - p : 0.f;
        adv[j] = A;
        float pos = A > 0.f ? 1.f : 0.f;
        npos += pos;
        sadv += A;
        ssq += A * A;
        mn = mn < A ? mn : A;
        mx = mx > A ? mx : A;
        float wp = pos * al;
        mass += wp;
        wmax = wmax > wp ? wmax : wp;
        amax = amax > al ? amax : al;
        apos += wp * A;
        aadv += al * A;
        float g = fabsf(s);
        tot += g;
        gmax = gmax > g ? gmax : g;
        glogg += g * log2_pos(g > TINY ? g : TINY);
    }
    float r[14] = {npos, sadv, ssq, mn, mx, mass, aadv, apos, wmax, amax, tot, gmax, glogg, nonfinite};
    memcpy(v, r, sizeof r);
}

/* Advantage statistics (AdvantageStats): A_ij = b_bar_i - b_ij with b = dL/dalpha and
   b_bar_i = sum_j alpha_ij b_ij, +0 at masked entries. Outputs, in order: number of A > 0, sum A,
   sum A^2, min A, max A, sum alpha [A > 0], sum alpha A, sum alpha A [A > 0], max alpha [A > 0],
   max alpha, and of g = |dL/ds|: sum g, max g, sum g log2 g. hist: [H, 2048] counts of
   (bits(A) >> 21) + 1024 (the float32 grid, four bins per octave), masked entries not counted. */
void adv_rows(int B, int H, int Q, int K, const float *a, const float *gp, const float *gs,
              int64_t sb, int64_t sh, int64_t sq, const uint8_t *mask, int64_t mb, int64_t mq,
              float **out, int64_t ob, int64_t oh, int64_t *hist, int nthreads)
{
    int64_t rows = (int64_t)B * H * Q;
#pragma omp parallel num_threads(nthreads)
    {
        /* per thread and head, four interleaved int32 sub-histograms (neighbouring entries often
           share a bin: interleaving breaks the chain of increments to one counter); a tile holds
           fewer than 2^31 entries (checked by the caller) */
        int32_t *lh = hist ? calloc((size_t)H * 4 * 2048, sizeof(int32_t)) : NULL;
        float *adv = malloc(sizeof(float) * (size_t)(K > 0 ? K : 1));
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < rows; r++) {
            int64_t bi, hi, qi;
            int64_t off = row_offset(r, H, Q, sb, sh, sq, &bi, &hi, &qi);
            const uint8_t *mr = mask + bi * mb + qi * mq;
            int lo, hi_k, n_valid = 0;
            float v[14];
            if (valid_run(mr, K, &lo, &hi_k)) {
                adv_row(K, a + off, gp + off, gs + off, mr, lo, hi_k, 1, adv, v);
                n_valid = hi_k - lo;
            } else {
                adv_row(K, a + off, gp + off, gs + off, mr, lo, hi_k, 0, adv, v);
                for (int j = 0; j < K; j++) n_valid += mr[j];
            }
            if (lh) {
                int32_t *hh = lh + hi * 4 * 2048;
                const int32_t *ab = (const int32_t *)adv;
                int j = 0;
                for (; j + 3 < K; j += 4) {
                    hh[(ab[j] >> 21) + 1024]++;
                    hh[2048 + (ab[j + 1] >> 21) + 1024]++;
                    hh[4096 + (ab[j + 2] >> 21) + 1024]++;
                    hh[6144 + (ab[j + 3] >> 21) + 1024]++;
                }
                for (; j < K; j++) hh[(ab[j] >> 21) + 1024]++;
                hh[1024] -= K - n_valid; /* masked entries hold +0 */
            }
            write_row(out, 13, bi * ob + hi * oh + qi, v, v[13] != 0.f);
        }
        if (lh) {
#pragma omp critical
            for (int64_t h = 0; h < H; h++)
                for (int64_t i = 0; i < 2048; i++)
                    hist[h * 2048 + i] += (int64_t)lh[h * 8192 + i] + lh[h * 8192 + 2048 + i] + lh[h * 8192 + 4096 + i] + lh[h * 8192 + 6144 + i];
            free(lh);
        }
        free(adv);
    }
}

static inline __attribute__((always_inline)) void
law_row(int K, const float *restrict ar, const float *restrict pr, const float *restrict sr, const float *restrict cr,
        const uint8_t *restrict mr, int lo, int hi, const int ranged, float *v)
{
    float cbar = 0.f;
#pragma omp simd reduction(+ : cbar)
    for (int j = 0; j < K; j++) cbar += ar[j] * cr[j];
    float ress = 0, maxs = 0, resp = 0, maxp = 0, rowsum = 0, scale = 0, asum = 0, nonfinite = 0;
#pragma omp simd reduction(+ : rowsum, scale, asum, nonfinite) reduction(max : ress, maxs, resp, maxp)
    for (int j = 0; j < K; j++) {
        float al = ar[j], p = pr[j], s = sr[j], c = cr[j];
        float chk = al + p + s + c;
        nonfinite += (chk - chk) != 0.f;
        float d = fabsf((c - cbar) * al - s);
        ress = ress > d ? ress : d;
        float g = fabsf(s);
        maxs = maxs > g ? maxs : g;
        int ok = VALID(j);
        float e = ok ? fabsf(p - c) : 0.f;
        resp = resp > e ? resp : e;
        float f = ok ? fabsf(p) : 0.f;
        maxp = maxp > f ? maxp : f;
        rowsum += s;
        scale += fabsf(al * c);
        asum += al;
    }
    float r[8] = {ress, maxs, resp, maxp, rowsum, scale, asum, nonfinite};
    memcpy(v, r, sizeof r);
}

/* Gradient-law residuals (RoutingLawCheck), with c = u.v recomputed (contiguous [B, H, Q, K]) and
   c_bar_i = sum_j alpha_ij c_ij. Outputs, in order: max |dL/ds - alpha (c - c_bar)|, max |dL/ds|,
   max |dL/dalpha - c| and max |dL/dalpha| over unmasked entries, sum dL/ds, sum |alpha c|,
   sum alpha. */
void law_rows(int B, int H, int Q, int K, const float *a, const float *gp, const float *gs,
              int64_t sb, int64_t sh, int64_t sq, const float *compat, const uint8_t *mask,
              int64_t mb, int64_t mq, float **out, int64_t ob, int64_t oh, int nthreads)
{
    int64_t rows = (int64_t)B * H * Q;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t bi, hi, qi;
        int64_t off = row_offset(r, H, Q, sb, sh, sq, &bi, &hi, &qi);
        const float *cr = compat + r * (int64_t)K;
        const uint8_t *mr = mask + bi * mb + qi * mq;
        int lo, hi_k;
        float v[8];
        if (valid_run(mr, K, &lo, &hi_k))
            law_row(K, a + off, gp + off, gs + off, cr, mr, lo, hi_k, 1, v);
        else
            law_row(K, a + off, gp + off, gs + off, cr, mr, lo, hi_k, 0, v);
        write_row(out, 7, bi * ob + hi * oh + qi, v, v[7] != 0.f);
    }
}

/* Attention entropy terms: sum_j alpha_ij ln alpha_ij per row (0 ln 0 = 0); NaN propagates. */
void entropy_rows(int B, int H, int Q, int K, const float *a, int64_t sb, int64_t sh, int64_t sq,
                  float *out, int64_t ob, int64_t oh, int nthreads)
{
    int64_t rows = (int64_t)B * H * Q;
#pragma omp parallel for schedule(dynamic, 8) num_threads(nthreads)
    for (int64_t r = 0; r < rows; r++) {
        int64_t bi, hi, qi;
        int64_t off = row_offset(r, H, Q, sb, sh, sq, &bi, &hi, &qi);
        const float *restrict ar = a + off;
        float acc = 0.f;
#pragma omp simd reduction(+ : acc)
        for (int j = 0; j < K; j++) {
            float al = ar[j];
            acc += al * log2_pos(al > TINY ? al : TINY);
        }
        out[bi * ob + hi * oh + qi] = acc * 0.693147181f;
    }
}

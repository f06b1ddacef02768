/* Fused Ghost Batch Normalization for (N, C) inputs on CPU.
 *
 * Compiled on first use by batchlab.norm._kernels (twice: SCALAR=float with FN(n)=n##_f32 and
 * SCALAR=double with FN(n)=n##_f64) and called through ctypes. No include guard: the wrapper
 * includes this file once per scalar type.
 *
 * The input is N rows of C contiguous values, cut into consecutive virtual batches of vbs rows
 * (the last one may be smaller). Every
 * virtual batch is small (V * C values, tens of KiB for the usual sizes), so all passes over it
 * run from cache: one trip to memory per tensor, which is what torch's own batch-norm kernel
 * costs, instead of one kernel launch per virtual batch. Statistics are accumulated in double
 * in one pass over the data shifted by the virtual batch's first row.
 *
 * Centring is done as (x - K) - (mean - K), with K the virtual batch's first row: both
 * differences are small, so a large common offset costs no precision (torch's float kernel loses
 * up to ~0.1 of a standard deviation at an offset of 1e6). The forward saves mean - K and 1/std
 * (rounded to SCALAR) for the backward, and updates the running buffers (when given) once per
 * virtual batch, in order.
 *
 * Both entry points split the virtual batches over up to `nthreads` OpenMP threads (contiguous
 * ranges, per-thread scratch, partial sums combined in thread order, so results depend only on
 * the thread count). The running-buffer update of G virtual batches in order,
 * r <- (1 - m) r + m s_g, is applied in its closed form r <- (1 - m)^G r + sum_g m (1 - m)^(G-1-g) s_g
 * (cumulative average: r <- k0 / (k0 + G) r + sum_g s_g / (k0 + G)), whose terms are independent.
 *
 * Forward, per virtual batch g and channel c:
 *   mean = sum_v x / V,  var = sum_v (x - mean)^2 / V,  invstd = 1 / sqrt(var + eps)
 *   y = (x - mean) * invstd * w + b
 * Backward (the batch-norm gradient within each virtual batch; xc = x - mean, k = w * invstd):
 *   sg = sum_v gy,  sgx = sum_v gy * xc
 *   dx = k * (gy - sg / V) - xc * k * invstd^2 * sgx / V
 *   dw += sgx * invstd,  db += sg
 */

#ifndef BLOCK_ROWS
#define BLOCK_ROWS 64
#endif
#define MAX_THREADS 64

typedef struct {
    const SCALAR *x, *w, *b;
    SCALAR *y, *mean_out, *invstd_out;
    double momentum, eps, *work, *rm_acc, *rv_acc;
    long long k0, N, vbs, C, G, g0, g1;
} FN(fwd_args);

static void *FN(fwd_range)(void *p)
{
    const FN(fwd_args) *A = (const FN(fwd_args) *)p;
    const long long C = A->C, N = A->N, vbs = A->vbs, G = A->G;
    const SCALAR *restrict x = A->x, *restrict w = A->w, *restrict b = A->b;
    SCALAR *restrict y = A->y;
    double *restrict mean = A->work, *restrict acc = A->work + C;
    double *restrict rm_acc = A->rm_acc, *restrict rv_acc = A->rv_acc;
    /* the element-wise passes run in SCALAR (twice the SIMD width of double for float) */
    SCALAR *restrict mean_s = (SCALAR *)(A->work + 2 * C), *restrict scale = mean_s + C,
           *restrict shift = scale + C, *restrict ps1 = shift + C, *restrict ps2 = ps1 + C;
    for (long long g = A->g0; g < A->g1; ++g) {
        const long long V = N - g * vbs < vbs ? N - g * vbs : vbs; /* the last one may be smaller */
        const SCALAR *restrict xg = x + g * vbs * C;
        SCALAR *restrict yg = y + g * vbs * C;
        /* one pass: sums of (x - K) and (x - K)^2 with K the virtual batch's first row, so that a
           large common offset does not cancel catastrophically (shifted-data variance);
           SCALAR partial sums over blocks of rows, gathered in double */
        const SCALAR *restrict K = xg;
        for (long long c = 0; c < C; ++c) { mean[c] = 0.0; acc[c] = 0.0; }
        for (long long v0 = 1; v0 < V; v0 += BLOCK_ROWS) {
            const long long v1 = v0 + BLOCK_ROWS < V ? v0 + BLOCK_ROWS : V;
            for (long long c = 0; c < C; ++c) { ps1[c] = 0; ps2[c] = 0; }
            for (long long v = v0; v < v1; ++v) {
                const SCALAR *restrict row = xg + v * C;
                for (long long c = 0; c < C; ++c) {
                    const SCALAR d = row[c] - K[c];
                    ps1[c] += d;
                    ps2[c] += d * d;
                }
            }
            for (long long c = 0; c < C; ++c) { mean[c] += (double)ps1[c]; acc[c] += (double)ps2[c]; }
        }
        /* weight of this virtual batch's statistics in the closed-form running update */
        const double wg = A->momentum >= 0.0 ? A->momentum * pow(1.0 - A->momentum, (double)(G - 1 - g))
                                             : 1.0 / (double)(A->k0 + G);
        for (long long c = 0; c < C; ++c) {
            const double s1 = mean[c], m2 = acc[c] - s1 * s1 / (double)V;
            const double var = (m2 > 0.0 ? m2 : 0.0) / (double)V, inv = 1.0 / sqrt(var + A->eps);
            const double dm = s1 / (double)V; /* mean - K */
            A->mean_out[g * C + c] = mean_s[c] = (SCALAR)dm;
            A->invstd_out[g * C + c] = (SCALAR)inv;
            if (rm_acc) {
                rm_acc[c] += wg * ((double)K[c] + dm);
                rv_acc[c] += wg * (V > 1 ? var * (double)V / (double)(V - 1) : var); /* unbiased */
            }
            scale[c] = (SCALAR)(w ? inv * (double)w[c] : inv);
            shift[c] = b ? b[c] : (SCALAR)0;
        }
        for (long long v = 0; v < V; ++v) {
            const SCALAR *restrict row = xg + v * C;
            SCALAR *restrict out = yg + v * C;
            for (long long c = 0; c < C; ++c)
                out[c] = ((row[c] - K[c]) - mean_s[c]) * scale[c] + shift[c];
        }
    }
    return NULL;
}

typedef struct {
    const SCALAR *gy, *x, *dmean, *invstd, *w;
    SCALAR *dx;
    double *work, *dwa, *dba;
    long long N, vbs, C, g0, g1;
} FN(bwd_args);

static void *FN(bwd_range)(void *p)
{
    const FN(bwd_args) *A = (const FN(bwd_args) *)p;
    const long long C = A->C, N = A->N, vbs = A->vbs;
    const SCALAR *restrict x = A->x, *restrict gy = A->gy, *restrict w = A->w;
    SCALAR *restrict dx = A->dx;
    double *restrict sg = A->work, *restrict sgx = A->work + C, *restrict dwa = A->dwa, *restrict dba = A->dba;
    SCALAR *restrict k = (SCALAR *)(A->work + 2 * C), *restrict a = k + C, *restrict gmean = a + C,
           *restrict ps1 = gmean + C, *restrict ps2 = ps1 + C;
    for (long long g = A->g0; g < A->g1; ++g) {
        const long long V = N - g * vbs < vbs ? N - g * vbs : vbs;
        const SCALAR *restrict xg = x + g * vbs * C, *restrict gg = gy + g * vbs * C;
        SCALAR *restrict dg = dx + g * vbs * C;
        const SCALAR *restrict K = xg, *restrict dmean = A->dmean + g * C, *restrict inv = A->invstd + g * C;
        for (long long c = 0; c < C; ++c) { sg[c] = 0.0; sgx[c] = 0.0; }
        for (long long v0 = 0; v0 < V; v0 += BLOCK_ROWS) {
            const long long v1 = v0 + BLOCK_ROWS < V ? v0 + BLOCK_ROWS : V;
            for (long long c = 0; c < C; ++c) { ps1[c] = 0; ps2[c] = 0; }
            for (long long v = v0; v < v1; ++v) {
                const SCALAR *restrict row = xg + v * C, *restrict grow = gg + v * C;
                for (long long c = 0; c < C; ++c) {
                    ps1[c] += grow[c];
                    ps2[c] += grow[c] * ((row[c] - K[c]) - dmean[c]);
                }
            }
            for (long long c = 0; c < C; ++c) { sg[c] += (double)ps1[c]; sgx[c] += (double)ps2[c]; }
        }
        for (long long c = 0; c < C; ++c) {
            const double ic = (double)inv[c], kc = w ? (double)w[c] * ic : ic;
            dwa[c] += sgx[c] * ic;
            dba[c] += sg[c];
            k[c] = (SCALAR)kc;
            a[c] = (SCALAR)(kc * ic * ic * sgx[c] / (double)V);
            gmean[c] = (SCALAR)(sg[c] / (double)V);
        }
        for (long long v = 0; v < V; ++v) {
            const SCALAR *restrict row = xg + v * C, *restrict grow = gg + v * C;
            SCALAR *restrict out = dg + v * C;
            for (long long c = 0; c < C; ++c)
                out[c] = k[c] * (grow[c] - gmean[c]) - ((row[c] - K[c]) - dmean[c]) * a[c];
        }
    }
    return NULL;
}

/* Run fn over T argument blocks, in parallel when compiled with OpenMP. The library then links
   libgomp.so.1, which resolves to the copy torch has already loaded: one thread pool, whose
   threads are already awake after torch's own parallel regions. */
static void FN(run_threads)(void *(*fn)(void *), char *args, size_t size, long long T)
{
#ifdef _OPENMP
#pragma omp parallel for num_threads((int)T) schedule(static, 1) if (T > 1)
#endif
    for (long long t = 0; t < T; ++t)
        fn(args + t * size);
}

static long long FN(thread_count)(long long nthreads, long long G)
{
    long long T = nthreads < G ? nthreads : G;
    return T < 1 ? 1 : (T > MAX_THREADS ? MAX_THREADS : T);
}

/* work: nthreads * 12 * C doubles */
void FN(ghost_bn_forward)(const SCALAR *x, const SCALAR *w, const SCALAR *b, SCALAR *y,
                          SCALAR *mean_out, SCALAR *invstd_out, SCALAR *running_mean,
                          SCALAR *running_var, double momentum, long long k0, long long N,
                          long long vbs, long long C, double eps, long long nthreads, double *work)
{
    const long long G = (N + vbs - 1) / vbs, T = FN(thread_count)(nthreads, G);
    FN(fwd_args) args[MAX_THREADS];
    for (long long t = 0; t < T; ++t) {
        double *wt = work + t * 12 * C;
        FN(fwd_args) A = {x, w, b, y, mean_out, invstd_out, momentum, eps, wt,
                          running_mean ? wt + 10 * C : NULL, running_mean ? wt + 11 * C : NULL,
                          k0, N, vbs, C, G, G * t / T, G * (t + 1) / T};
        args[t] = A;
        if (running_mean)
            for (long long c = 0; c < 2 * C; ++c) wt[10 * C + c] = 0.0;
    }
    FN(run_threads)(FN(fwd_range), (char *)args, sizeof(FN(fwd_args)), T);
    if (running_mean) {
        const double decay = momentum >= 0.0 ? pow(1.0 - momentum, (double)G) : (double)k0 / (double)(k0 + G);
        for (long long c = 0; c < C; ++c) {
            double rm = decay * (double)running_mean[c], rv = decay * (double)running_var[c];
            for (long long t = 0; t < T; ++t) { rm += args[t].rm_acc[c]; rv += args[t].rv_acc[c]; }
            running_mean[c] = (SCALAR)rm;
            running_var[c] = (SCALAR)rv;
        }
    }
}

/* work: nthreads * 12 * C doubles */
void FN(ghost_bn_backward)(const SCALAR *gy, const SCALAR *x, const SCALAR *dmean,
                           const SCALAR *invstd, const SCALAR *w, SCALAR *dx, SCALAR *dw, SCALAR *db,
                           long long N, long long vbs, long long C, long long nthreads, double *work)
{
    const long long G = (N + vbs - 1) / vbs, T = FN(thread_count)(nthreads, G);
    FN(bwd_args) args[MAX_THREADS];
    for (long long t = 0; t < T; ++t) {
        double *wt = work + t * 12 * C;
        FN(bwd_args) A = {gy, x, dmean, invstd, w, dx, wt, wt + 10 * C, wt + 11 * C, N, vbs, C,
                          G * t / T, G * (t + 1) / T};
        args[t] = A;
        for (long long c = 0; c < 2 * C; ++c) wt[10 * C + c] = 0.0;
    }
    FN(run_threads)(FN(bwd_range), (char *)args, sizeof(FN(bwd_args)), T);
    for (long long c = 0; c < C; ++c) {
        double sw = 0.0, sb = 0.0;
        for (long long t = 0; t < T; ++t) { sw += args[t].dwa[c]; sb += args[t].dba[c]; }
        if (dw) dw[c] = (SCALAR)sw;
        if (db) db[c] = (SCALAR)sb;
    }
}

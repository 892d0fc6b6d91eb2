/*
 * Selective scan for the CPU: forward and hand-written backward.
 *
 * Work is split into items of one batch row and up to VL consecutive channels; the VL channels are the SIMD
 * lanes, so every inner loop runs over lanes and vectorises without reassociation. The backward keeps an
 * item's hidden-state history (len x nstate x VL) in a per-thread buffer, so the full
 * (batch, dim, len, nstate) state tensor never exists unless the caller asks for it. The forward keeps
 * none.
 *
 * Per channel d and state n:   dt_t = softplus(delta_t + bias) (softplus optional),
 *                              a_t = exp(dt_t A_n),   h_t = a_t h_{t-1} + dt_t B_t u_t,
 *                              y_t = sum_n C_t h_t + D u_t,   out_t = y_t silu(z_t).
 * Snapshots copy the states at a few given positions out of the forward recurrence, and the backward adds
 * their gradients into the adjoint at those positions.
 *
 * Adaptor-T's memory read (read_weights set), added before the gate: with K = nsnap / 2 locations per
 * snapshot group, location k read by interpolating its two snapshots (slots k and K + k) at fraction f_k,
 *      m_k = scale (h_{p_k} + f_k (h_{p_{K+k}} - h_{p_k})),   y_t += sum_k w_{t,k} sum_n C_t m_k.
 * An item's memory holds only its own channels' states, so it is made once the item's recurrence has run
 * and read while the item's output is still in cache: the read costs no pass over memory of its own.
 * The backward makes it again from the state history, and adds the memory's gradient into the adjoint at
 * the snapshot positions.
 *
 * Compiled at first use by adaptor_peft/ops/native.py, once with SCAN_DOUBLE and once without, with
 * OpenMP where the compiler has it: linked against libgomp.so.1, it shares PyTorch's OpenMP runtime and
 * threads (same soname, already loaded), so the two never oversubscribe the cores.
 * A lane block never straddles a B/C group or a snapshot group: the channels are cut into segments of
 * the gcd of the channels per group of each, and each segment into blocks of VL lanes, the
 * last one partly filled. Idle lanes see zero inputs, add nothing to any sum, and are never stored, so
 * any channel count works; the caller guarantees snapshot positions in [0, len).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define VL 16

#ifdef SCAN_DOUBLE
typedef double real;
#define EXP exp
#define LOG log
#define SCAN_FORWARD scan_forward_f64
#define SCAN_BACKWARD scan_backward_f64
#else
typedef float real;
#define EXP fast_expf
#define LOG fast_logf
#define SCAN_FORWARD scan_forward_f32
#define SCAN_BACKWARD scan_backward_f32

/* exp for float, branch-free so that lane loops vectorise: Cephes range reduction and polynomial
 * (about 1 ulp); inputs are clamped to the normal range. */
static inline float fast_expf(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* log for positive normal floats, branch-free: Cephes logf (about 1 ulp). */
static inline float fast_logf(float x) {
    int32_t bits;
    memcpy(&bits, &x, sizeof bits);
    float e = (float)(((bits >> 23) & 0xff) - 126);
    bits = (bits & 0x007fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &bits, sizeof m);
    const int small = m < 0.707106781186547524f;
    e = small ? e - 1.0f : e;
    m = small ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
    return m + y + 0.693359375f * e;
}
#endif

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)); log1p(q) as log(1 + q) q / ((1 + q) - 1), which stays
 * accurate for tiny q. */
static inline real softplus(real x) {
    const real q = EXP(x > 0 ? -x : x), p = 1 + q, d = p - 1;
    const real log1p_q = LOG(p) * q / (d == 0 ? 1 : d);
    return (x > 0 ? x : 0) + (d == 0 ? q : log1p_q);
}

typedef struct {
    int64_t batch, dim, len, nstate, groups;
    const real *u, *delta, *delta_bias, *A, *B, *C, *Dskip, *z; /* delta_bias, Dskip, z may be NULL */
    int64_t softplus;                            /* apply softplus to delta + delta_bias */
    int64_t u_s[3], delta_s[3], z_s[3];          /* strides of (batch, dim, len) inputs */
    int64_t B_s[4], C_s[4];                      /* strides of (batch, groups, nstate, len) */
    real *out;                                   /* (batch, dim, len), strides out_s */
    real *last_state;                            /* (batch, dim, nstate) or NULL */
    real *hidden;                                /* (batch, dim, len, nstate) or NULL */
    const real *dout;                            /* backward: like out */
    real *du, *ddelta, *dz;                      /* backward: (batch, dim, len); dz NULL if no z */
    real *dA, *dD, *ddelta_bias, *dB, *dC;       /* backward, accumulated into: (dim, nstate), (dim,), (dim,),
                                                    (batch, groups, nstate, len) twice */
    int64_t out_s[3], dout_s[3], ddelta_s[3];    /* strides of out, dout (read), ddelta (written), */
    int64_t du_s[3], dz_s[3];                    /* du and dz (written) */
    int64_t snap_groups, nsnap;                  /* snapshot groups (dividing dim) and positions per group */
    const int64_t *snapshot_index;               /* (batch, snap_groups, nsnap) or NULL */
    real *snapshots;                             /* forward: (batch, dim, nsnap, nstate) */
    const real *dsnapshots;                      /* backward: like snapshots, or NULL */
    const real *read_frac, *read_weights, *read_scale; /* the memory read, or NULL: (batch, snap_groups, K),
                                                    (batch, snap_groups, K, len), (dim,) with K = nsnap / 2 */
    real *dread_frac, *dread_weights, *dread_scale; /* backward, accumulated into: like the three above */
} ScanArgs;

/* The size of ScanArgs, which the Python side checks its mirror of the struct against. */
int64_t scan_args_size(void) {
    return (int64_t)sizeof(ScanArgs);
}

/* A gradient that sums over channels (dB, dC), kept per lane: rows x VL partial sums
 * that items sharing the target add into with plain vector adds, reduced across lanes into target[0 .. rows)
 * only when an item with another target comes (or at the end), instead of once per item and row. */
typedef struct {
    real *lanes, *target;
    int64_t rows;
} LaneSums;

typedef struct {
    real *u, *x, *dt, *z, *y, *hist, *decay, *dy, *du, *ddt;
    real *h, *a, *g, *A, *cum_dA;
    real Dv[VL];    /* the block's D skip weights, zero where there is no D or no channel */
    int64_t b, d0, nv; /* the item: batch row, first channel, active lanes */
    int64_t *snap_at, *snap_slot, nsnap; /* the item's snapshots by position: nsnap of them, 0 when none are due */
    real *snap;     /* the item's snapshots (nsnap, nstate, VL); in the backward, their gradients */
    real *mem, *dmem, *sums; /* the read: memory and its gradient (K, nstate, VL); backward: sum_n C_t m_k
                                (len, K, VL) */
    LaneSums dB, dC, dW; /* backward only; dW: the read weights' gradient */
} Work;

static int64_t gcd(int64_t a, int64_t b) {
    while (b) {
        const int64_t r = a % b;
        a = b;
        b = r;
    }
    return a;
}

/* Channels per segment, and lane blocks per segment. */
static int64_t segment(const ScanArgs *s) {
    return gcd(s->dim / s->groups, s->dim / s->snap_groups);
}

static int64_t item_count(const ScanArgs *s) {
    const int64_t seg = segment(s);
    return s->batch * (s->dim / seg) * ((seg + VL - 1) / VL);
}

/* Sets the work's batch row, first channel and active lanes for one item. */
static void locate(const ScanArgs *s, Work *w, int64_t item) {
    const int64_t seg = segment(s), per_segment = (seg + VL - 1) / VL, per_row = (s->dim / seg) * per_segment;
    const int64_t r = item % per_row, j = r % per_segment;
    w->b = item / per_row;
    w->d0 = (r / per_segment) * seg + j * VL;
    w->nv = seg - j * VL < VL ? seg - j * VL : VL;
    w->nsnap = 0;
}

/* The item's row of the snapshot groups' tables: (batch, snap_groups) flattened. */
static int64_t snapshot_row(const ScanArgs *s, const Work *w) {
    return w->b * s->snap_groups + w->d0 / (s->dim / s->snap_groups);
}

/* Orders the item's snapshots by position (an insertion sort: there are few), which makes them due. */
static void sort_snapshots(const ScanArgs *s, Work *w) {
    const int64_t S = s->nsnap;
    const int64_t *index = s->snapshot_index + snapshot_row(s, w) * S;
    for (int64_t q = 0; q < S; q++) {
        int64_t j = q;
        for (; j > 0 && w->snap_at[j - 1] > index[q]; j--) {
            w->snap_at[j] = w->snap_at[j - 1];
            w->snap_slot[j] = w->snap_slot[j - 1];
        }
        w->snap_at[j] = index[q];
        w->snap_slot[j] = q;
    }
    w->nsnap = S;
}

/* Where snapshot ``slot`` of the item's lane v lives in (batch, dim, nsnap, nstate). */
static int64_t snapshot_offset(const ScanArgs *s, const Work *w, int64_t v, int64_t slot) {
    return ((w->b * s->dim + w->d0 + v) * s->nsnap + slot) * s->nstate;
}

static int work_alloc(Work *w, const ScanArgs *s, int backward) {
    const int64_t L = s->len, N = s->nstate;
    const int64_t row = L * VL, state = N * VL;
    const int64_t history = backward || s->hidden ? (L + 1) * state : 0; /* the plain forward keeps none */
    const int64_t K = s->read_weights ? s->nsnap / 2 : 0, snaps = s->snapshot_index ? s->nsnap * state : 0;
    const int64_t read = K * state + (backward ? K * state + L * K * VL : 0);
    const int64_t lane_sums = backward ? 2 * L * state + L * K * VL : 0;
    const int64_t total = 6 * row + history + (backward ? L * state + 2 * row : 0) + 5 * state + lane_sums;
    real *p = calloc((size_t)(total + snaps + read), sizeof(real));
    if (!p) return -1;
    w->snap = p + total;
    w->mem = w->snap + snaps;
    w->dmem = w->mem + K * state;
    w->sums = w->dmem + K * state;
    if (s->snapshot_index) {
        w->snap_at = malloc((size_t)(2 * s->nsnap) * sizeof(int64_t));
        if (!w->snap_at) {
            free(p);
            return -1;
        }
        w->snap_slot = w->snap_at + s->nsnap;
    }
    w->u = p; p += row;
    w->x = p; p += row;
    w->dt = p; p += row;
    w->z = p; p += row;
    w->y = p; p += row;
    w->hist = history ? p + state : NULL; p += history; /* hist[-1] stays zero: the state before t = 0 */
    w->h = p; p += state;
    w->a = p; p += state;
    w->g = p; p += state;
    w->A = p; p += state;
    w->cum_dA = p; p += state;
    w->du = p; p += row;
    if (backward) {
        w->decay = p; p += L * state;
        w->dy = p; p += row;
        w->ddt = p; p += row;
        w->dB = (LaneSums){p, NULL, N * L}; p += L * state;
        w->dC = (LaneSums){p, NULL, N * L}; p += L * state;
        w->dW = (LaneSums){p, NULL, K * L};
    }
    return 0;
}

/* Adds the lane sums into their target and zeroes them. */
static void lanes_flush(LaneSums *acc) {
    if (!acc->target) return;
    for (int64_t r = 0; r < acc->rows; r++) {
        real sum = 0, *lane = acc->lanes + r * VL;
        #pragma omp simd reduction(+:sum)
        for (int v = 0; v < VL; v++) sum += lane[v];
        acc->target[r] += sum;
        memset(lane, 0, VL * sizeof(real));
    }
    acc->target = NULL;
}

/* The lane sums to add into for ``target``, flushing those of another target first. */
static real *lanes_for(LaneSums *acc, real *target) {
    if (acc->target != target) {
        lanes_flush(acc);
        acc->target = target;
    }
    return acc->lanes;
}

static void work_free(Work *w) {
    free(w->u);
    free(w->snap_at);
}

static inline real silu_gate(real z, real *dgate) {
    const real sig = 1 / (1 + EXP(-z));
    if (dgate) *dgate = sig * (1 + z * (1 - sig));
    return z * sig;
}

/* The recurrence over one lane block; with keep, every state goes to w->hist, and with keep == 2
 * every decay exp(dt A) to w->decay as well; the snapshots that are due (sort_snapshots) are copied out
 * as the recurrence passes their positions. Always inlined so that each (nstate, keep) combination used
 * below compiles to its own loop with constant trip counts. */
static inline __attribute__((always_inline)) void recurrence(
    const ScanArgs *s, Work *w, const real *Bg, const real *Cg, const int64_t N, const int keep) {
    int64_t due = 0; /* the next snapshot to take */
    for (int64_t t = 0; t < s->len; t++) {
        const real *dt = w->dt + t * VL, *u = w->u + t * VL;
        real dtu[VL], acc[VL];
        for (int v = 0; v < VL; v++) {
            dtu[v] = dt[v] * u[v];
            acc[v] = 0;
        }
        real *hist = keep ? w->hist + t * N * VL : NULL;
        for (int64_t n = 0; n < N; n++) {
            const real bn = Bg[n * s->B_s[2] + t * s->B_s[3]];
            const real cn = Cg[n * s->C_s[2] + t * s->C_s[3]];
            real *h = w->h + n * VL, *A = w->A + n * VL;
            #pragma omp simd
            for (int v = 0; v < VL; v++) {
                const real a = EXP(dt[v] * A[v]);
                const real hn = a * h[v] + dtu[v] * bn;
                h[v] = hn;
                if (keep) hist[n * VL + v] = hn;
                if (keep == 2) w->decay[(t * N + n) * VL + v] = a;
                acc[v] += hn * cn;
            }
        }
        for (int v = 0; v < VL; v++)
            w->y[t * VL + v] = acc[v] + w->Dv[v] * u[v];
        for (; due < w->nsnap && w->snap_at[due] == t; due++)
            memcpy(w->snap + w->snap_slot[due] * N * VL, w->h, (size_t)(N * VL) * sizeof(real));
    }
}

/* dst[t VL + v] = src[v strides[1] + t strides[2]] for the first nv lanes. Positions outer: Δ, z and the
 * output gradient usually come as (batch, len, dim) views, whose lanes then share one cache line and one
 * page per position, where a lane-by-lane walk would touch a new page at almost every step. Each row also
 * prefetches the next lane block's line of that row, which the next item reads: the hardware prefetchers
 * miss a walk with one line per row. With it the scan ran about 10 % faster on Vim's layout. */
static void load_lanes(real *dst, const real *src, const int64_t *strides, int64_t L, int64_t nv) {
    if (strides[1] == 1 && nv == VL) /* the usual case: one vector load per position */
        for (int64_t t = 0; t < L; t++) {
            __builtin_prefetch(src + t * strides[2] + VL);
            memcpy(dst + t * VL, src + t * strides[2], VL * sizeof(real));
        }
    else
        for (int64_t t = 0; t < L; t++)
            for (int64_t v = 0; v < nv; v++) dst[t * VL + v] = src[v * strides[1] + t * strides[2]];
}

/* dst[v strides[1] + t strides[2]] = src[t VL + v] for the first nv lanes, positions outer and the next lane
 * block's lines prefetched (for writing) as in load_lanes. */
static void store_lanes(real *dst, const real *src, const int64_t *strides, int64_t L, int64_t nv) {
    if (strides[1] == 1 && nv == VL)
        for (int64_t t = 0; t < L; t++) {
            __builtin_prefetch(dst + t * strides[2] + VL, 1);
            memcpy(dst + t * strides[2], src + t * VL, VL * sizeof(real));
        }
    else
        for (int64_t t = 0; t < L; t++)
            for (int64_t v = 0; v < nv; v++) dst[v * strides[1] + t * strides[2]] = src[t * VL + v];
}

/* B or C (X, with its strides) of the item's batch row and B/C group. */
static const real *item_group(const real *X, const int64_t *strides, const ScanArgs *s, const Work *w) {
    return X + w->b * strides[0] + (w->d0 / (s->dim / s->groups)) * strides[1];
}

/* Loads the lane block's inputs into lane-major buffers (w->x holds delta + bias before softplus) and
 * runs the recurrence, leaving the pre-gate output y in w->y. */
static void block_forward(const ScanArgs *s, Work *w, int keep) {
    const int64_t L = s->len, N = s->nstate, b = w->b, d0 = w->d0;
    for (int64_t v = 0; v < VL; v++) {
        w->Dv[v] = s->Dskip && v < w->nv ? s->Dskip[d0 + v] : 0;
        if (v >= w->nv) { /* an idle lane: zero input, zero state */
            for (int64_t t = 0; t < L; t++) w->u[t * VL + v] = w->x[t * VL + v] = w->z[t * VL + v] = 0;
            for (int64_t n = 0; n < N; n++) w->A[n * VL + v] = w->h[n * VL + v] = 0;
            continue;
        }
        for (int64_t n = 0; n < N; n++) {
            w->A[n * VL + v] = s->A[(d0 + v) * N + n];
            w->h[n * VL + v] = 0;
        }
    }
    load_lanes(w->u, s->u + b * s->u_s[0] + d0 * s->u_s[1], s->u_s, L, w->nv);
    load_lanes(w->x, s->delta + b * s->delta_s[0] + d0 * s->delta_s[1], s->delta_s, L, w->nv);
    if (s->z) load_lanes(w->z, s->z + b * s->z_s[0] + d0 * s->z_s[1], s->z_s, L, w->nv);
    real bias[VL] = {0};
    if (s->delta_bias)
        for (int v = 0; v < w->nv; v++) bias[v] = s->delta_bias[d0 + v];
    for (int64_t t = 0; t < L; t++)
        for (int v = 0; v < VL; v++) w->x[t * VL + v] += bias[v];
    if (s->softplus)
        for (int64_t i = 0; i < L * VL; i++) w->dt[i] = softplus(w->x[i]);
    else
        memcpy(w->dt, w->x, (size_t)(L * VL) * sizeof(real));
    const real *Bg = item_group(s->B, s->B_s, s, w), *Cg = item_group(s->C, s->C_s, s, w);
    if (N == 16 && keep == 2) recurrence(s, w, Bg, Cg, 16, 2);
    else if (N == 16) keep ? recurrence(s, w, Bg, Cg, 16, 1) : recurrence(s, w, Bg, Cg, 16, 0);
    else if (keep == 2) recurrence(s, w, Bg, Cg, N, 2);
    else keep ? recurrence(s, w, Bg, Cg, N, 1) : recurrence(s, w, Bg, Cg, N, 0);
}

/* The item's memory m_k = scale (lo + f_k (hi - lo)) into w->mem, lo and hi the states of slots k and K + k at
 * state[slot] (each nstate x VL). */
static void memory_form(const ScanArgs *s, Work *w, const real *const *state) {
    const int64_t N = s->nstate, K = s->nsnap / 2;
    const real *frac = s->read_frac + snapshot_row(s, w) * K;
    real scale[VL] = {0};
    for (int64_t v = 0; v < w->nv; v++) scale[v] = s->read_scale[w->d0 + v];
    for (int64_t k = 0; k < K; k++)
        for (int64_t i = 0; i < N * VL; i++) {
            const real lo = state[k][i], hi = state[K + k][i];
            w->mem[k * N * VL + i] = scale[i % VL] * (lo + frac[k] * (hi - lo));
        }
}

/* Adds the read, sum_k w_{t,k} sum_n C_t[n] m_k, into the item's pre-gate output w->y; four positions at a
 * time (a short last block recomputes the last position), so that the sums over n run as independent
 * chains. With ``keep`` the inner sums go to w->sums too, for the weights' gradient. Inlined per (nstate, K),
 * like recurrence. */
static inline __attribute__((always_inline)) void read_add_with(
    const ScanArgs *s, Work *w, const real *Cg, int keep, const int64_t N, const int64_t K) {
    const int64_t L = s->len;
    const real *weights = s->read_weights + snapshot_row(s, w) * K * L;
    for (int64_t t0 = 0; t0 < L; t0 += 4) {
        int64_t t[4];
        for (int j = 0; j < 4; j++) t[j] = t0 + j < L ? t0 + j : L - 1;
        real r[4][VL] = {{0}};
        for (int64_t k = 0; k < K; k++) {
            real sum[4][VL] = {{0}};
            for (int64_t n = 0; n < N; n++) {
                const real *m = w->mem + (k * N + n) * VL, *c = Cg + n * s->C_s[2];
                for (int j = 0; j < 4; j++) {
                    const real cj = c[t[j] * s->C_s[3]];
                    #pragma omp simd
                    for (int v = 0; v < VL; v++) sum[j][v] += cj * m[v];
                }
            }
            for (int j = 0; j < 4; j++) {
                const real wk = weights[k * L + t[j]];
                #pragma omp simd
                for (int v = 0; v < VL; v++) r[j][v] += wk * sum[j][v];
                if (keep) memcpy(w->sums + (t[j] * K + k) * VL, sum[j], sizeof sum[j]);
            }
        }
        for (int j = 0; j < 4; j++)
            if (t0 + j < L)
                #pragma omp simd
                for (int v = 0; v < VL; v++) w->y[t[j] * VL + v] += r[j][v];
    }
}

static void read_add(const ScanArgs *s, Work *w, const real *Cg, int keep) {
    if (s->nstate == 16 && s->nsnap == 4) read_add_with(s, w, Cg, keep, 16, 2);
    else read_add_with(s, w, Cg, keep, s->nstate, s->nsnap / 2);
}

/* The read's backward, given w->dy, the gradient reaching the pre-gate output: the weights' gradient into
 * dWl (lane sums), the scale's into dscale[d0 ..] and the fractions' into dfrac[row K ..]; the
 * memory's gradient goes into w->snap, the gradients of the snapshots at slots k and K + k, whose states
 * state[slot] are. Needs memory_form and read_add (with keep) first; C's gradient is reverse's. Inlined per
 * (nstate, K). */
static inline __attribute__((always_inline)) void read_backward_with(
    const ScanArgs *s, Work *w, const real *Cg, const real *const *state, real *dWl, real *dscale, real *dfrac,
    const int64_t N, const int64_t K) {
    const int64_t L = s->len, row = snapshot_row(s, w);
    const real *weights = s->read_weights + row * K * L, *frac = s->read_frac + row * K;
    for (int64_t t = 0; t < L; t++) {
        const real *dy = w->dy + t * VL;
        real *restrict p = w->sums + t * K * VL; /* sum_n C_t[n] m_k, then dy w_{t,k}: what reaches it */
        for (int64_t k = 0; k < K; k++) {
            const real wk = weights[k * L + t];
            real *restrict dw = dWl + (k * L + t) * VL;
            #pragma omp simd
            for (int v = 0; v < VL; v++) {
                dw[v] += dy[v] * p[k * VL + v];
                p[k * VL + v] = dy[v] * wk;
            }
        }
    }
    /* dm_k[n] = sum_t (dy w_{t,k}) C_t[n], four n at a time with the sums in registers */
    for (int64_t k = 0; k < K; k++)
        for (int64_t n0 = 0; n0 < N; n0 += 4) {
            int64_t n[4];
            for (int j = 0; j < 4; j++) n[j] = n0 + j < N ? n0 + j : N - 1;
            real acc[4][VL] = {{0}};
            for (int64_t t = 0; t < L; t++) {
                const real *restrict p = w->sums + (t * K + k) * VL;
                for (int j = 0; j < 4; j++) {
                    const real c = Cg[n[j] * s->C_s[2] + t * s->C_s[3]];
                    #pragma omp simd
                    for (int v = 0; v < VL; v++) acc[j][v] += p[v] * c;
                }
            }
            for (int j = 0; j < 4 && n0 + j < N; j++) memcpy(w->dmem + (k * N + n[j]) * VL, acc[j], sizeof acc[j]);
        }
    real scale[VL] = {0}, ds[VL] = {0};
    for (int64_t v = 0; v < w->nv; v++) scale[v] = s->read_scale[w->d0 + v];
    for (int64_t k = 0; k < K; k++) {
        real df[VL] = {0};
        for (int64_t n = 0; n < N; n++) {
            const real *lo = state[k] + n * VL, *hi = state[K + k] + n * VL, *dm = w->dmem + (k * N + n) * VL;
            real *below = w->snap + (k * N + n) * VL, *above = w->snap + ((K + k) * N + n) * VL;
            #pragma omp simd
            for (int v = 0; v < VL; v++) {
                const real scaled = dm[v] * scale[v];
                ds[v] += dm[v] * (lo[v] + frac[k] * (hi[v] - lo[v]));
                df[v] += scaled * (hi[v] - lo[v]);
                below[v] += scaled * (1 - frac[k]);
                above[v] += scaled * frac[k];
            }
        }
        real sum = 0;
        for (int v = 0; v < VL; v++) sum += df[v];
        dfrac[row * K + k] += sum;
    }
    for (int64_t v = 0; v < w->nv; v++) dscale[w->d0 + v] += ds[v];
}

static void read_backward(const ScanArgs *s, Work *w, const real *Cg, const real *const *state, real *dWl,
                          real *dscale, real *dfrac) {
    if (s->nstate == 16 && s->nsnap == 4) read_backward_with(s, w, Cg, state, dWl, dscale, dfrac, 16, 2);
    else read_backward_with(s, w, Cg, state, dWl, dscale, dfrac, s->nstate, s->nsnap / 2);
}

int SCAN_FORWARD(const ScanArgs *s) {
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
    Work w = {0};
    failed = work_alloc(&w, s, 0);
    const int64_t L = s->len, N = s->nstate, items = item_count(s);
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        if (failed) continue;
        locate(s, &w, item);
        const int64_t b = w.b, d0 = w.d0;
        if (s->snapshot_index) sort_snapshots(s, &w);
        block_forward(s, &w, s->hidden != NULL);
        if (s->read_weights) {
            const real *state[s->nsnap];
            for (int64_t q = 0; q < s->nsnap; q++) state[q] = w.snap + q * N * VL;
            memory_form(s, &w, state);
            read_add(s, &w, item_group(s->C, s->C_s, s, &w), 0);
        }
        if (s->z)
            for (int64_t i = 0; i < L * VL; i++) w.y[i] *= silu_gate(w.z[i], NULL);
        store_lanes(s->out + b * s->out_s[0] + d0 * s->out_s[1], w.y, s->out_s, L, w.nv);
        for (int64_t v = 0; v < w.nv; v++) {
            if (s->snapshots)
                for (int64_t q = 0; q < s->nsnap; q++)
                    for (int64_t n = 0; n < N; n++)
                        s->snapshots[snapshot_offset(s, &w, v, q) + n] = w.snap[(q * N + n) * VL + v];
            if (s->last_state)
                for (int64_t n = 0; n < N; n++)
                    s->last_state[(b * s->dim + d0 + v) * N + n] = w.h[n * VL + v];
            if (s->hidden)
                for (int64_t t = 0; t < L; t++)
                    for (int64_t n = 0; n < N; n++)
                        s->hidden[((b * s->dim + d0 + v) * L + t) * N + n] = w.hist[(t * N + n) * VL + v];
        }
    }
    work_free(&w);
    }
    return failed ? -1 : 0;
}

/* The adjoint recurrence g_t = dL/dh_t = C_t dy_t (+ a snapshot's gradient) + a_{t+1} g_{t+1}, run
 * backwards in time, with every parameter gradient that reads g; a snapshot taken at t adds its gradient
 * (in w->snap) to g_t (needs sort_snapshots). With the read's K locations (K > 0, memory_form first), C_t
 * is read through h_t + sum_k w_{t,k} m_k, so C's gradient takes that sum. Inlined per (nstate, K), like
 * recurrence. */
static inline __attribute__((always_inline)) void reverse(
    const ScanArgs *s, Work *w, const real *Bg, const real *Cg, real *dBl, real *dCl, const int64_t N,
    const int64_t K) {
    const int64_t L = s->len;
    const real *weights = K ? s->read_weights + snapshot_row(s, w) * K * L : NULL;
    int64_t due = w->nsnap - 1; /* the next snapshot, from the end */
    for (int64_t i = 0; i < N * VL; i++) {
        w->g[i] = 0;
        w->a[i] = 0;
        w->cum_dA[i] = 0;
    }
    for (int64_t t = L - 1; t >= 0; t--) {
        const real *dt = w->dt + t * VL, *u = w->u + t * VL, *dy = w->dy + t * VL;
        real ddt[VL] = {0}, du[VL] = {0}, dtu[VL], wt[K ? K : 1];
        for (int v = 0; v < VL; v++) dtu[v] = dt[v] * u[v];
        for (int64_t k = 0; k < K; k++) wt[k] = weights[k * L + t];
        /* A snapshot's gradient joins g_t: a_{t+1} g_{t+1} is formed first and a_{t+1} set to 1, so that the
         * step below adds the sum as it is, and steps without a snapshot pay nothing for it. */
        for (int first = 1; due >= 0 && w->snap_at[due] == t; due--, first = 0) {
            const real *dsnapshot = w->snap + w->snap_slot[due] * N * VL;
            for (int64_t i = 0; i < N * VL; i++) {
                if (first) {
                    w->g[i] *= w->a[i];
                    w->a[i] = 1;
                }
                w->g[i] += dsnapshot[i];
            }
        }
        for (int64_t n = 0; n < N; n++) {
            const real bn = Bg[n * s->B_s[2] + t * s->B_s[3]];
            const real cn = Cg[n * s->C_s[2] + t * s->C_s[3]];
            const real *hprev = w->hist + ((t - 1) * N + n) * VL, *ht = w->hist + (t * N + n) * VL;
            real *gs = w->g + n * VL, *anext = w->a + n * VL, *A = w->A + n * VL, *cdA = w->cum_dA + n * VL;
            real *dbn = dBl + (n * L + t) * VL, *dcn = dCl + (n * L + t) * VL;
            #pragma omp simd
            for (int v = 0; v < VL; v++) {
                const real a = w->decay[(t * N + n) * VL + v];
                const real gv = gs[v] * anext[v] + cn * dy[v];
                const real ga_hp = gv * a * hprev[v];
                ddt[v] += ga_hp * A[v] + gv * u[v] * bn;
                cdA[v] += ga_hp * dt[v];
                du[v] += gv * dt[v] * bn;
                dbn[v] += gv * dtu[v];
                real seen = ht[v];
                for (int64_t k = 0; k < K; k++) seen += wt[k] * w->mem[(k * N + n) * VL + v];
                dcn[v] += dy[v] * seen;
                gs[v] = gv;
                anext[v] = a;
            }
        }
        for (int v = 0; v < VL; v++) {
            w->ddt[t * VL + v] = ddt[v];
            w->du[t * VL + v] += du[v];
        }
    }
}

/* Adds a thread's partial parameter gradients into the shared outputs. */
static void add_into(real *dst, const real *src, int64_t n) {
    #pragma omp critical
    for (int64_t i = 0; i < n; i++) dst[i] += src[i];
}

int SCAN_BACKWARD(const ScanArgs *s) {
    int failed = 0;
    #pragma omp parallel reduction(|:failed)
    {
    Work w = {0};
    const int64_t L = s->len, N = s->nstate, Dm = s->dim;
    const int64_t bc_size = s->batch * s->groups * N * L, K = s->read_weights ? s->nsnap / 2 : 0;
    const int64_t rows = s->batch * s->snap_groups;
    real *dA = calloc((size_t)(Dm * N + 2 * Dm + 2 * bc_size + (K ? Dm + rows * K * (1 + L) : 0)), sizeof(real));
    failed = work_alloc(&w, s, 1) || !dA;
    real *dD = dA + Dm * N, *dbias_acc = dD + Dm;
    real *dB = dbias_acc + Dm, *dC = dB + bc_size;
    real *dscale = dC + bc_size, *dfrac = dscale + Dm, *dW = dfrac + rows * K;
    const int64_t items = item_count(s);
    #pragma omp for schedule(static)
    for (int64_t item = 0; item < items; item++) {
        if (failed) continue;
        locate(s, &w, item);
        const int64_t b = w.b, d0 = w.d0, nv = w.nv;
        const int64_t g = d0 / (Dm / s->groups);
        block_forward(s, &w, 2);
        const real *Bg = item_group(s->B, s->B_s, s, &w), *Cg = item_group(s->C, s->C_s, s, &w);
        const real *state[s->nsnap ? s->nsnap : 1]; /* the read's snapshot states, in the history */
        if (K) {
            const int64_t *index = s->snapshot_index + snapshot_row(s, &w) * s->nsnap;
            for (int64_t q = 0; q < s->nsnap; q++) state[q] = w.hist + index[q] * N * VL;
            memory_form(s, &w, state);
            read_add(s, &w, Cg, 1); /* y then holds the read, for dz */
        }
        if (nv < VL) memset(w.dy, 0, (size_t)(L * VL) * sizeof(real)); /* idle lanes pass no gradient */
        load_lanes(w.dy, s->dout + b * s->dout_s[0] + d0 * s->dout_s[1], s->dout_s, L, nv);
        /* The gate: dy becomes the gradient reaching y; w->du (free until the skip below) keeps
         * dout silu'(z), which times the final y is dz. */
        if (s->z)
            for (int64_t i = 0; i < L * VL; i++) {
                real dgate;
                const real gate = silu_gate(w.z[i], &dgate);
                w.du[i] = w.dy[i] * dgate;
                w.dy[i] *= gate;
            }
        real *dCl = lanes_for(&w.dC, dC + (b * s->groups + g) * N * L);

        /* dz (parked in ddt until the reverse pass), and the skip: gradient reaching D and u. */
        if (s->z)
            for (int64_t i = 0; i < L * VL; i++) w.ddt[i] = w.du[i] * w.y[i];
        real dDv[VL] = {0};
        for (int64_t t = 0; t < L; t++)
            for (int v = 0; v < VL; v++) {
                w.du[t * VL + v] = w.Dv[v] * w.dy[t * VL + v];
                dDv[v] += w.dy[t * VL + v] * w.u[t * VL + v];
            }
        if (s->z) store_lanes(s->dz + b * s->dz_s[0] + d0 * s->dz_s[1], w.ddt, s->dz_s, L, nv);
        for (int64_t v = 0; v < nv && s->Dskip; v++) dD[d0 + v] += dDv[v];

        real *dBl = lanes_for(&w.dB, dB + (b * s->groups + g) * N * L);
        if (s->snapshot_index && (s->dsnapshots || K)) {
            memset(w.snap, 0, (size_t)(s->nsnap * N * VL) * sizeof(real));
            for (int64_t q = 0; s->dsnapshots && q < s->nsnap; q++)
                for (int64_t v = 0; v < nv; v++)
                    for (int64_t n = 0; n < N; n++)
                        w.snap[(q * N + n) * VL + v] = s->dsnapshots[snapshot_offset(s, &w, v, q) + n];
            if (K)
                read_backward(s, &w, Cg, state, lanes_for(&w.dW, dW + snapshot_row(s, &w) * K * L), dscale, dfrac);
            sort_snapshots(s, &w);
        }
        if (N == 16 && K == 2) reverse(s, &w, Bg, Cg, dBl, dCl, 16, 2);
        else if (N == 16 && !K) reverse(s, &w, Bg, Cg, dBl, dCl, 16, 0);
        else reverse(s, &w, Bg, Cg, dBl, dCl, N, K);
        if (s->softplus)
            for (int64_t t = 0; t < L * VL; t++) w.ddt[t] *= 1 / (1 + EXP(-w.x[t]));
        real dbias[VL] = {0};
        for (int64_t t = 0; t < L; t++)
            for (int v = 0; v < VL; v++) dbias[v] += w.ddt[t * VL + v];
        store_lanes(s->ddelta + b * s->ddelta_s[0] + d0 * s->ddelta_s[1], w.ddt, s->ddelta_s, L, nv);
        store_lanes(s->du + b * s->du_s[0] + d0 * s->du_s[1], w.du, s->du_s, L, nv);
        for (int64_t v = 0; v < nv; v++) {
            dbias_acc[d0 + v] += dbias[v];
            for (int64_t n = 0; n < N; n++) dA[(d0 + v) * N + n] += w.cum_dA[n * VL + v];
        }
    }
    lanes_flush(&w.dB);
    lanes_flush(&w.dC);
    lanes_flush(&w.dW);
    work_free(&w);
    if (!failed) {
        if (K) {
            add_into(s->dread_scale, dscale, Dm);
            add_into(s->dread_frac, dfrac, rows * K);
            add_into(s->dread_weights, dW, rows * K * L);
        }
        add_into(s->dA, dA, Dm * N);
        if (s->Dskip) add_into(s->dD, dD, Dm);
        if (s->delta_bias) add_into(s->ddelta_bias, dbias_acc, Dm);
        add_into(s->dB, dB, bc_size);
        add_into(s->dC, dC, bc_size);
    }
    free(dA);
    }
    return failed ? -1 : 0;
}

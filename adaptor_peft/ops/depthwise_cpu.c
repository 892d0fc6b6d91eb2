/*
 * Depthwise convolution given by taps, for the CPU (Adaptor-S): forward, and the weight gradient.
 *
 * A tap t has an offset (dy_t, dx_t) and one weight per channel; the convolution is
 *     y[b, h, w, c] = sum_t weight[t, c] x[b, h + dy_t, w + dx_t, c]    (zero outside the map),
 * on channels-last maps given as tokens: (batch, tokens, channels), the patches of the height x width grid
 * in grid order and, where skip >= 0, one more token at index skip (Vim's class token), which is not a
 * patch: the convolution gives it nothing, or, with keep_skip, its own value. A model's token sequence is read and written in place, with no copy
 * that takes the class token out and puts it back. The input gradient is the same convolution with the
 * offsets negated. The weight gradient is
 *     dweight[t, c] = sum_{b, h, w} x[b, h + dy_t, w + dx_t, c] g[b, h, w, c],
 * which PyTorch's CPU depthwise backward computes an order of magnitude slower than the forward. Sums
 * stay in registers, vectorised over channels. x and g are read through (batch, token) strides with
 * adjacent channels, so a slice of a wider projection (Mamba's causal conv on one half of in_proj's
 * output, a 1 x len grid) is read in place; y is contiguous.
 * Compiled with selective_scan_cpu.c into one library by adaptor_peft/ops/native.py.
 */
#include <stdint.h>
#include <string.h>

#ifdef SCAN_DOUBLE
typedef double real;
#define TAPS_FORWARD depthwise_taps_f64
#define TAPS_GRAD depthwise_taps_grad_f64
#else
typedef float real;
#define TAPS_FORWARD depthwise_taps_f32
#define TAPS_GRAD depthwise_taps_grad_f32
#endif

#define CB 64 /* channels per inner block */

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The token of patch (h, w). */
static inline int64_t token(int64_t h, int64_t w, int64_t width, int64_t skip) {
    const int64_t p = h * width + w;
    return skip >= 0 && p >= skip ? p + 1 : p;
}

/* y: the convolution of x plus bias (NULL: none), y's skipped token x's (keep_skip) or zero. x: (batch,
 * tokens, channels) at strides xs (batch, token) and 1; y: the same, contiguous; offsets: (taps, 2) as
 * (dy, dx). A work item is one row of one batch entry. */
void TAPS_FORWARD(const real *x, const int64_t *xs, const real *weight, const real *bias, const int64_t *offsets,
                  int64_t taps, int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t skip,
                  int64_t keep_skip, real *y) {
    const int64_t tokens = height * width + (skip >= 0);
    #pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < batch * height; item++) {
        const int64_t b = item / height, h = item % height;
        const real *xb = x + b * xs[0];
        real *yb = y + b * tokens * channels;
        if (skip >= 0 && h == 0) {
            if (keep_skip) memcpy(yb + skip * channels, xb + skip * xs[1], (size_t)channels * sizeof(real));
            else memset(yb + skip * channels, 0, (size_t)channels * sizeof(real));
        }
        for (int64_t w = 0; w < width; w++) {
            real *out = yb + token(h, w, width, skip) * channels;
            for (int64_t c0 = 0; c0 < channels; c0 += CB) {
                const int64_t n = channels - c0 < CB ? channels - c0 : CB;
                real acc[CB] = {0};
                if (bias) memcpy(acc, bias + c0, (size_t)n * sizeof(real));
                for (int64_t t = 0; t < taps; t++) {
                    const int64_t hh = h + offsets[2 * t], ww = w + offsets[2 * t + 1];
                    if (hh < 0 || hh >= height || ww < 0 || ww >= width) continue;
                    const real *src = xb + token(hh, ww, width, skip) * xs[1] + c0, *wt = weight + t * channels + c0;
                    if (n == CB) {
                        #pragma omp simd
                        for (int c = 0; c < CB; c++) acc[c] += wt[c] * src[c];
                    } else {
                        for (int64_t c = 0; c < n; c++) acc[c] += wt[c] * src[c];
                    }
                }
                memcpy(out + c0, acc, (size_t)n * sizeof(real));
            }
        }
    }
}

/* x, g as TAPS_FORWARD's x, at strides xs and gs; dweight: (batch, taps, channels), each batch entry's part of
 * the sum (the caller adds them up). A work item is one batch entry and channel block, whose slices of x and
 * g stay in cache while every tap walks them. */
void TAPS_GRAD(const real *x, const int64_t *xs, const real *g, const int64_t *gs, const int64_t *offsets,
               int64_t taps, int64_t batch, int64_t height, int64_t width, int64_t channels, int64_t skip,
               real *dweight) {
    const int64_t blocks = (channels + CB - 1) / CB;
    #pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < batch * blocks; item++) {
        const int64_t b = item / blocks, c0 = (item % blocks) * CB;
        const int64_t n = channels - c0 < CB ? channels - c0 : CB;
        const real *xb = x + b * xs[0] + c0, *gb = g + b * gs[0] + c0;
        for (int64_t t = 0; t < taps; t++) {
            const int64_t dy = offsets[2 * t], dx = offsets[2 * t + 1];
            const int64_t h0 = max64(0, -dy), h1 = min64(height, height - dy);
            const int64_t w0 = max64(0, -dx), w1 = min64(width, width - dx);
            real acc[CB] = {0};
            for (int64_t h = h0; h < h1; h++)
                for (int64_t w = w0; w < w1; w++) {
                    const real *xw = xb + token(h + dy, w + dx, width, skip) * xs[1];
                    const real *gw = gb + token(h, w, width, skip) * gs[1];
                    if (n == CB) {
                        #pragma omp simd
                        for (int c = 0; c < CB; c++) acc[c] += xw[c] * gw[c];
                    } else {
                        for (int64_t c = 0; c < n; c++) acc[c] += xw[c] * gw[c];
                    }
                }
            for (int64_t c = 0; c < n; c++) dweight[(b * taps + t) * channels + c0 + c] = acc[c];
        }
    }
}

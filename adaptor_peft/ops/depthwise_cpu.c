/*
 * Weight gradient of a depthwise convolution given by taps, for the CPU (Adaptor-S's backward).
 *
 * A tap t has an offset (dy_t, dx_t) and one weight per channel; the convolution is
 *     y[b, h, w, c] = sum_t weight[t, c] x[b, h + dy_t, w + dx_t, c]    (zero outside the map),
 * on channels-last maps. Its weight gradient is
 *     dweight[t, c] = sum_{b, h, w} x[b, h + dy_t, w + dx_t, c] g[b, h, w, c],
 * which PyTorch's CPU depthwise backward computes an order of magnitude slower than the forward. Here
 * the sums stay in registers, vectorised over channels.
 * Compiled with selective_scan_cpu.c into one library by adaptor_peft/ops/native.py.
 */
#include <stdint.h>

#ifdef SCAN_DOUBLE
typedef double real;
#define TAPS_GRAD depthwise_taps_grad_f64
#else
typedef float real;
#define TAPS_GRAD depthwise_taps_grad_f32
#endif

#define CB 64 /* channels per work item */

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* x, g: (batch, height, width, channels) contiguous; offsets: (taps, 2) as (dy, dx); dweight: (batch, taps,
 * channels), each batch row's part of the sum (the caller adds them up). A work item is one batch row and
 * channel block, whose slices of x and g stay in cache while every tap walks them. */
void TAPS_GRAD(const real *x, const real *g, const int64_t *offsets, int64_t taps, int64_t batch, int64_t height,
               int64_t width, int64_t channels, real *dweight) {
    const int64_t blocks = (channels + CB - 1) / CB;
    #pragma omp parallel for schedule(static)
    for (int64_t item = 0; item < batch * blocks; item++) {
        const int64_t b = item / blocks, c0 = (item % blocks) * CB;
        const int64_t n = channels - c0 < CB ? channels - c0 : CB;
        for (int64_t t = 0; t < taps; t++) {
            const int64_t dy = offsets[2 * t], dx = offsets[2 * t + 1];
            const int64_t h0 = max64(0, -dy), h1 = min64(height, height - dy);
            const int64_t w0 = max64(0, -dx), w1 = min64(width, width - dx);
            real acc[CB] = {0};
            for (int64_t h = h0; h < h1; h++) {
                const real *xr = x + ((b * height + h + dy) * width + dx) * channels + c0;
                const real *gr = g + ((b * height + h) * width) * channels + c0;
                for (int64_t w = w0; w < w1; w++) {
                    const real *xw = xr + w * channels, *gw = gr + w * channels;
                    if (n == CB) {
                        #pragma omp simd
                        for (int c = 0; c < CB; c++) acc[c] += xw[c] * gw[c];
                    } else {
                        for (int64_t c = 0; c < n; c++) acc[c] += xw[c] * gw[c];
                    }
                }
            }
            for (int64_t c = 0; c < n; c++) dweight[(b * taps + t) * channels + c0 + c] = acc[c];
        }
    }
}

//! The U-Net's convolution on the CPU as one candle op with its own backward: a few matrix products per
//! group of images and direction, on host buffers.
//!
//! For image n with input x_n (C x H x W), kernel W (C_out x C k^2), padding p = k/2 and stride s, the
//! column matrix col_n (C k^2 x H' W') holds col_n[(c, dy, dx), (i, j)] = x_n[c, s i + dy - p, s j + dx - p]
//! (zero outside the image). Then
//! - forward:  y_n = W col_n + b                      (C_out x H' W', already NCHW),
//! - backward: dW = sum_n g_n col_n^T, db = sum_n sum_(i,j) g_n, dx_n = col2im(W^T g_n),
//!
//! where col2im adds each column entry back onto the pixel it was read from. That is how strided
//! convolutions run, image by image. At stride 1 (all but the U-Net's downsampling) no column matrix is
//! built: a stack of images is zero-padded once, and each direction is one product per kernel tap on a
//! shifted view of it (forward and dW) or of the padded g (dx: a convolution with the flipped kernel),
//! covering every image of the stack at once; see `Geometry::shifted_products` and
//! `Geometry::backward_stack`. Built from candle ops the same convolution took a padded copy, nine window
//! copies, a concatenation and two layout changes forward, and as many backward. Groups of images run in
//! parallel on candle's CPU thread pool.
//!
//! The bias b is per channel (C_out), or per image and channel (N x C_out): then db_n = sum_(i,j) g_n.
//! A per-image bias takes in an addend that is constant over each image (the U-Net's time embedding)
//! without a separate broadcast add, whose backward candle runs as a reduction over the whole activation.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;

use super::linalg::{matmul, matmul_in, slice, with_slice, zeroed_by_chunks, View};
use super::supports;
use crate::error::{Error, Result};
use crate::precision::Precision;

/// y = conv(x, w) + b with padding k/2 and stride `stride` (1, or 2 on even sizes) for an odd square
/// kernel w (C_out x C x k x k), on f32 or f64 tensors on the CPU; b is (C_out), or (N, C_out) for a
/// bias per image. The matrix products of f32 tensors, forward and backward, run in `precision`
/// (resolved for this CPU, see [`Precision::on_this_cpu`]); f64 runs in f64.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    stride: usize,
    precision: Precision,
) -> Result<Tensor> {
    if !supports(x) {
        return Err(Error::Config(format!(
            "the CPU convolution takes f32 or f64 tensors on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )));
    }
    check_conv(x, w, stride)?;
    let (n, co) = (x.dim(0)?, w.dim(0)?);
    if b.dims() != [co] && b.dims() != [n, co] {
        return Err(Error::Config(format!(
            "the convolution's bias must be ({co}) or ({n}, {co}), got {:?}",
            b.dims()
        )));
    }
    if x.elem_count() == 0 || w.elem_count() == 0 {
        // Nothing to multiply (no images, pixels or channels): y is the bias alone, an empty tensor
        // without images or pixels. (The grouping below needs an image; candle's own conv2d overflows
        // on zero-sized images.)
        let (ho, wo) = (x.dim(2)? / stride, x.dim(3)? / stride);
        let bias = b.reshape((if b.rank() == 2 { n } else { 1 }, co, 1, 1))?;
        return Ok(bias.broadcast_as((n, co, ho, wo))?.contiguous()?);
    }
    let precision = precision.on_this_cpu();
    Ok(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Conv { stride, precision },
    )?)
}

/// Sizes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    co: usize,
    k: usize,
    stride: usize,
    ho: usize,
    wo: usize,
    /// The arithmetic of the f32 products.
    precision: Precision,
}

impl Geometry {
    /// From shapes that passed [`check_conv`].
    fn new(x: &Shape, w: &Shape, stride: usize, precision: Precision) -> candle_core::Result<Self> {
        let (n, c, h, wd) = x.dims4()?;
        let (co, _, k, _) = w.dims4()?;
        Ok(Self {
            n,
            c,
            h,
            w: wd,
            co,
            k,
            stride,
            ho: h / stride,
            wo: wd / stride,
            precision,
        })
    }

    /// Rows (C k^2) and columns (H' W') of one image's column matrix.
    fn col_dims(&self) -> (usize, usize) {
        (self.c * self.k * self.k, self.ho * self.wo)
    }

    /// For output index i and kernel offset d: the input index s i + d - p read, if inside [0, size).
    fn source(&self, out: usize, offset: usize, size: usize) -> Option<usize> {
        let i = (out * self.stride + offset).checked_sub(self.k / 2)?;
        (i < size).then_some(i)
    }

    /// The output columns j whose input column s j + dx - p lies inside the image, and the first one's
    /// input column.
    fn valid_columns(&self, dx: usize) -> (std::ops::Range<usize>, usize) {
        let p = self.k / 2;
        // s j + dx - p >= 0  <=>  j >= (p - dx) / s, rounded up;
        // s j + dx - p <= w - 1  <=>  j <= (w - 1 + p - dx) / s, rounded down.
        let Some(room) = (self.w - 1 + p).checked_sub(dx) else {
            return (0..0, 0);
        };
        let last = (room / self.stride + 1).min(self.wo);
        let first = p.saturating_sub(dx).div_ceil(self.stride);
        if first >= last {
            return (0..0, 0);
        }
        (first..last, first * self.stride + dx - p)
    }

    /// col (C k^2 x H' W') from one image (C x H x W).
    fn im2col<T: WithDType>(&self, img: &[T], col: &mut [T]) {
        let (rows, cols) = self.col_dims();
        let s = self.stride;
        for r in 0..rows {
            let (ch, dy, dx) = (r / (self.k * self.k), r / self.k % self.k, r % self.k);
            let plane = &img[ch * self.h * self.w..(ch + 1) * self.h * self.w];
            let (js, x0) = self.valid_columns(dx);
            let row = &mut col[r * cols..(r + 1) * cols];
            for (i, out) in row.chunks_exact_mut(self.wo).enumerate() {
                let Some(y) = self.source(i, dy, self.h) else {
                    out.fill(T::zero());
                    continue;
                };
                let line = &plane[y * self.w + x0..(y + 1) * self.w];
                out[..js.start].fill(T::zero());
                out[js.end..].fill(T::zero());
                let inner = &mut out[js.clone()];
                if s == 1 {
                    inner.copy_from_slice(&line[..inner.len()]);
                } else {
                    inner
                        .iter_mut()
                        .zip(line.iter().step_by(s))
                        .for_each(|(o, &v)| *o = v);
                }
            }
        }
    }

    /// img (C x H x W) += col2im(col): each column entry added back onto the pixel it came from.
    fn col2im<T: WithDType>(&self, col: &[T], img: &mut [T]) {
        let (rows, cols) = self.col_dims();
        let s = self.stride;
        for r in 0..rows {
            let (ch, dy, dx) = (r / (self.k * self.k), r / self.k % self.k, r % self.k);
            let plane = &mut img[ch * self.h * self.w..(ch + 1) * self.h * self.w];
            let (js, x0) = self.valid_columns(dx);
            let row = &col[r * cols..(r + 1) * cols];
            for (i, src) in row.chunks_exact(self.wo).enumerate() {
                let Some(y) = self.source(i, dy, self.h) else {
                    continue;
                };
                let line = &mut plane[y * self.w + x0..(y + 1) * self.w];
                let inner = &src[js.clone()];
                if s == 1 {
                    // Contiguous on both sides: a plain zip, which the compiler vectorises.
                    line[..inner.len()]
                        .iter_mut()
                        .zip(inner)
                        .for_each(|(o, &v)| *o += v);
                } else {
                    line.iter_mut()
                        .step_by(s)
                        .zip(inner)
                        .for_each(|(o, &v)| *o += v);
                }
            }
        }
    }

    /// How images are grouped: `size` images per group (a group's convolution is one set of matrix
    /// products), groups in parallel on candle's pool when there are at least as many images as threads
    /// (each group's products then single-threaded), else one group at a time with threaded products.
    ///
    /// Strided convolutions go through column matrices image by image. At stride 1 a group is a stack
    /// of images ([`Geometry::pad_stack`]) of up to ~4096 output positions: small images (the U-Net's
    /// 14 x 14 and 7 x 7 levels) then make products of a useful size, where one image alone made
    /// products too thin for the matrix kernel (7 x 7: 56 columns).
    fn grouping(&self) -> (usize, Parallelism) {
        let threads = rayon::current_num_threads();
        let cap = if self.stride == 1 {
            let p = self.k / 2;
            (4096 / ((self.h + p) * self.padded_width())).max(1)
        } else {
            1
        };
        if self.n >= threads {
            (cap.min(self.n.div_ceil(threads)), Parallelism::None)
        } else {
            (cap.min(self.n), Parallelism::Rayon(threads))
        }
    }

    /// f(group index, chunk) on the chunks of a zeroed vector of `self.n * per_image` values, one chunk
    /// per group of [`Geometry::grouping`]: in parallel or one after the other. Results in group order.
    fn by_groups<T: WithDType, R: Send>(
        &self,
        per_image: usize,
        f: impl Fn(usize, &mut [T], Parallelism) -> R + Sync,
    ) -> (Vec<T>, Vec<R>) {
        let (size, par) = self.grouping();
        let chunk = size * per_image;
        if matches!(par, Parallelism::None) {
            return zeroed_by_chunks(self.n * per_image, chunk, |i, c| f(i, c, par));
        }
        let mut out = vec![T::zero(); self.n * per_image];
        let results = out
            .chunks_mut(chunk)
            .enumerate()
            .map(|(i, c)| f(i, c, par))
            .collect();
        (out, results)
    }

    /// Row length of the padded layout ([`Geometry::pad_stack`]): W + p.
    fn padded_width(&self) -> usize {
        self.w + self.k / 2
    }

    /// Values of one channel's stack of `images` padded images: p rows of zeros, then per image its H
    /// rows and p rows of zeros, each row W + p long.
    fn stack_len(&self, images: usize) -> usize {
        let p = self.k / 2;
        (p + images * (self.h + p)) * self.padded_width()
    }

    /// Length of [`Geometry::pad_stack`]'s output for `channels` channels of `images` images.
    fn padded_len(&self, channels: usize, images: usize) -> usize {
        channels * self.stack_len(images) + 2 * (self.k / 2)
    }

    /// Output positions of a stack's shifted products: the rows from the first image's first to the last
    /// image's last (the p zero rows between images included), W + p each.
    fn stack_outputs(&self, images: usize) -> usize {
        let p = self.k / 2;
        (images * (self.h + p) - p) * self.padded_width()
    }

    /// dst = `src` (images x channels x H x W) zero-padded for a same-size k x k convolution, p = k/2,
    /// channel-major: p zeros, then per channel the stack of [`Geometry::stack_len`], then p zeros.
    /// A row needs only p zeros on one side and an image only p zero rows: flattened, the zeros after
    /// one row (image) are also the ones before the next. Only the zeros are written besides the copy.
    fn pad_stack<T: WithDType>(&self, src: &[T], channels: usize, dst: &mut [T]) {
        let p = self.k / 2;
        let (h, w, wp) = (self.h, self.w, self.padded_width());
        let plane = h * w;
        let images = src.len() / (channels * plane);
        let stack = self.stack_len(images);
        dst[..p].fill(T::zero());
        for (ch, d) in dst[p..p + channels * stack]
            .chunks_exact_mut(stack)
            .enumerate()
        {
            d[..p * wp].fill(T::zero());
            for img in 0..images {
                let s = &src[(img * channels + ch) * plane..][..plane];
                let d = &mut d[(p + img * (h + p)) * wp..][..(h + p) * wp];
                for (row, out) in s.chunks_exact(w).zip(d.chunks_exact_mut(wp)) {
                    out[..w].copy_from_slice(row);
                    out[w..].fill(T::zero());
                }
                d[h * wp..].fill(T::zero());
            }
        }
        dst[p + channels * stack..].fill(T::zero());
    }

    /// dst (images x channels x H x W) = the image pixels of `src` (channels x [`Geometry::stack_outputs`]).
    fn unpad_stack<T: WithDType>(&self, src: &[T], channels: usize, dst: &mut [T]) {
        let (p, wp, plane) = (self.k / 2, self.padded_width(), self.h * self.w);
        let images = dst.len() / (channels * plane);
        let outputs = self.stack_outputs(images);
        for (ch, s) in src.chunks_exact(outputs).enumerate() {
            for img in 0..images {
                let s = &s[img * (self.h + p) * wp..];
                let d = &mut dst[(img * channels + ch) * plane..][..plane];
                for (row, out) in s.chunks(wp).zip(d.chunks_exact_mut(self.w)) {
                    out.copy_from_slice(&row[..self.w]);
                }
            }
        }
    }

    /// Stride 1 without a column matrix: in the padded stack `pad` ([`Geometry::pad_stack`]), the
    /// input of kernel tap (dy, dx) for output pixel (i, j) of an image sits at (i + dy)(W+p) + j + dx
    /// from that image's first output row, i.e. at the output's own padded-width index q shifted by
    /// dy (W+p) + dx. So ypad (C_out x [`Geometry::stack_outputs`]) += sum over the k^2 taps of W_tap
    /// (C_out x C, from `tap_weight`) times the padded stack shifted by that offset, each one plain
    /// strided matrix product for all the stack's images; the padding positions are left for
    /// [`Geometry::unpad_stack`] to drop.
    fn shifted_products<'w, T: ConvFloat>(
        &self,
        pad: &[T],
        images: usize,
        tap_weight: impl Fn(usize) -> View<'w, T>,
        ypad: &mut [T],
        par: Parallelism,
    ) {
        let (k, wp, stack) = (self.k, self.padded_width(), self.stack_len(images));
        let dims = (self.co, self.stack_outputs(images), self.c);
        for dy in 0..k {
            for dx in 0..k {
                let xv = View::strided(pad, dy * wp + dx, stack, 1);
                T::product(
                    self.precision,
                    ypad,
                    dims,
                    true,
                    tap_weight(dy * k + dx),
                    xv,
                    par,
                );
            }
        }
    }

    /// Whether the shifted backward computes dW_tap^T = X_tap g^T (C x C_out) rather than dW_tap: when
    /// C > C_out, so that the matrix kernel's long side (its 64-row tiles) runs over the larger count
    /// (the 64 -> 32 decoder convolution of the tiny U-Net: dW 12% faster, `bench unet-parts`).
    fn dw_transposed(&self) -> bool {
        self.c > self.co
    }

    /// The stride-1 forward of a group of images: pad, bias, [`Geometry::shifted_products`], unpad.
    /// `bias` is per channel (C_out) or per image of the group.
    fn forward_stack<T: ConvFloat>(
        &self,
        xg: &[T],
        w: &[T],
        bias: &[T],
        yg: &mut [T],
        par: Parallelism,
    ) {
        let (p, kk, wp) = (self.k / 2, self.k * self.k, self.padded_width());
        let images = xg.len() / (self.c * self.h * self.w);
        let q = self.stack_outputs(images);
        let pad_len = self.padded_len(self.c, images);
        T::with_col(pad_len + self.co * q, |buf| {
            let (pad, ypad) = buf.split_at_mut(pad_len);
            self.pad_stack(xg, self.c, pad);
            for (o, row) in ypad.chunks_exact_mut(q).enumerate() {
                for (img, rows) in row.chunks_mut((self.h + p) * wp).enumerate() {
                    let b = if bias.len() == self.co {
                        bias[o]
                    } else {
                        bias[img * self.co + o]
                    };
                    rows.fill(b);
                }
            }
            // W_tap[o, c] = w[o, c, tap]
            let tap_weight = |tap| View::strided(w, tap, self.c * kk, kk);
            self.shifted_products(pad, images, tap_weight, ypad, par);
            self.unpad_stack(ypad, self.co, yg);
        });
    }

    /// The stride-1 backward of a group of images without column matrices. With g padded like an input:
    /// - dx is the same-padded convolution of g with the kernel flipped in space and transposed in
    ///   channels, dx[c] = sum_(o, tap) w[o, c, k^2 - 1 - tap] g[o] shifted by the tap: the forward's
    ///   shifted products with C and C_out swapped;
    /// - dW_tap (C_out x C) = g (C_out x [`Geometry::stack_outputs`], zeros at the padding positions)
    ///   times the padded input shifted by the tap, transposed: summed over the group's images by the
    ///   product itself. The padded g read from its first image row on is exactly that.
    ///
    /// Writes dx and returns dW tap-major: (k^2 x C_out x C), or (k^2 x C x C_out) when
    /// [`Geometry::dw_transposed`].
    fn backward_stack<T: ConvFloat>(
        &self,
        xg: &[T],
        w: &[T],
        gg: &[T],
        dxg: &mut [T],
        par: Parallelism,
    ) -> Vec<T> {
        let (k, p, kk) = (self.k, self.k / 2, self.k * self.k);
        let images = xg.len() / (self.c * self.h * self.w);
        let (wp, stack, q) = (
            self.padded_width(),
            self.stack_len(images),
            self.stack_outputs(images),
        );
        let swapped = Geometry {
            c: self.co,
            co: self.c,
            ..*self
        };
        let (xlen, glen) = (
            self.padded_len(self.c, images),
            self.padded_len(self.co, images),
        );
        let mut dw = vec![T::zero(); kk * self.co * self.c];
        let transposed = self.dw_transposed();
        T::with_col(xlen + glen + self.c * q, |buf| {
            let (xpad, rest) = buf.split_at_mut(xlen);
            let (gpad, dxpad) = rest.split_at_mut(glen);
            self.pad_stack(xg, self.c, xpad);
            self.pad_stack(gg, self.co, gpad);
            dxpad.fill(T::zero());
            // W^T_tap[c, o] = w[o, c, k^2 - 1 - tap]
            let flipped = |tap| View::strided(w, kk - 1 - tap, kk, self.c * kk);
            swapped.shifted_products(gpad, images, flipped, dxpad, par);
            self.unpad_stack(dxpad, self.c, dxg);
            // g from its first image row on; as (C_out x q) rows or (q x C_out) columns
            let g_at = p * wp + p;
            for (tap, dwt) in dw.chunks_exact_mut(self.co * self.c).enumerate() {
                let x_at = tap / k * wp + tap % k;
                if transposed {
                    let xv = View::strided(xpad, x_at, stack, 1);
                    let gv = View::strided(gpad, g_at, 1, stack);
                    T::product(
                        self.precision,
                        dwt,
                        (self.c, self.co, q),
                        false,
                        xv,
                        gv,
                        par,
                    );
                } else {
                    let gv = View::strided(gpad, g_at, stack, 1);
                    let xv = View::strided(xpad, x_at, 1, stack);
                    T::product(
                        self.precision,
                        dwt,
                        (self.co, self.c, q),
                        false,
                        gv,
                        xv,
                        par,
                    );
                }
            }
        });
        dw
    }

    fn forward<T: ConvFloat>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (rows, cols) = self.col_dims();
        let img = self.c * self.h * self.w;
        let per = self.co * cols;
        let (size, _) = self.grouping();
        let group = |gi: usize, yg: &mut [T], par: Parallelism| {
            let n0 = gi * size;
            let images = yg.len() / per;
            let bias = |n: usize, count: usize| {
                if b.len() == self.co {
                    b
                } else {
                    &b[n * self.co..(n + count) * self.co]
                }
            };
            if self.stride == 1 {
                let xg = &x[n0 * img..(n0 + images) * img];
                return self.forward_stack(xg, w, bias(n0, images), yg, par);
            }
            for (i, yn) in yg.chunks_exact_mut(per).enumerate() {
                T::with_col(rows * cols, |col| {
                    self.im2col(&x[(n0 + i) * img..(n0 + i + 1) * img], col);
                    for (row, &bias) in yn.chunks_exact_mut(cols).zip(bias(n0 + i, 1)) {
                        row.fill(bias);
                    }
                    let (wv, cv) = (View::rows(w, rows), View::rows(col, cols));
                    T::product(self.precision, yn, (self.co, cols, rows), true, wv, cv, par);
                });
            }
        };
        self.by_groups(per, group).0
    }

    /// [`Geometry::backward`] from and to tensors.
    fn backward_tensors<T: ConvFloat>(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let per_image = b.rank() == 2;
        let (dx, dw, db) = with_slice(x, |x| {
            with_slice(w, |w| {
                with_slice(g, |g| self.backward::<T>(x, w, g, per_image))
            })
        })???;
        let dev = x.device();
        Ok((
            Tensor::from_vec(dx, x.shape(), dev)?,
            Tensor::from_vec(dw, w.shape(), dev)?,
            Tensor::from_vec(db, b.shape(), dev)?,
        ))
    }

    /// (dx, dw, db) from the output gradient g (N x C_out x H' x W'); db per image if `per_image`.
    fn backward<T: ConvFloat>(
        &self,
        x: &[T],
        w: &[T],
        g: &[T],
        per_image: bool,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (rows, cols) = self.col_dims();
        let img = self.c * self.h * self.w;
        let out = self.co * cols;
        let (size, _) = self.grouping();
        let shifted = self.stride == 1;
        // Each group's dw (tap-major when shifted) and its images' db; summed after.
        let group = |gi: usize, dxg: &mut [T], par: Parallelism| -> (Vec<T>, Vec<T>) {
            let n0 = gi * size;
            let images = dxg.len() / img;
            let gg = &g[n0 * out..(n0 + images) * out];
            let dw = if shifted {
                self.backward_stack(&x[n0 * img..(n0 + images) * img], w, gg, dxg, par)
            } else {
                let mut dw = vec![T::zero(); self.co * rows];
                for (i, dxn) in dxg.chunks_exact_mut(img).enumerate() {
                    let (xn, gn) = (&x[(n0 + i) * img..][..img], &gg[i * out..][..out]);
                    let dwn = self.backward_columns(xn, w, gn, dxn, par);
                    dw.iter_mut().zip(&dwn).for_each(|(a, &v)| *a += v);
                }
                dw
            };
            let db = gg
                .chunks_exact(cols)
                .map(|r| r.iter().fold(T::zero(), |a, &v| a + v))
                .collect();
            (dw, db)
        };
        // Collected in group order, so the sums below do not depend on the threads' timing.
        let (dx, parts) = self.by_groups(img, group);
        let mut dw = vec![T::zero(); self.co * rows];
        let mut db = Vec::with_capacity(self.n * self.co);
        for (pw, pb) in parts {
            dw.iter_mut().zip(&pw).for_each(|(a, &v)| *a += v);
            db.extend(pb);
        }
        if !per_image {
            let mut sum = vec![T::zero(); self.co];
            for dbn in db.chunks_exact(self.co) {
                sum.iter_mut().zip(dbn).for_each(|(a, &v)| *a += v);
            }
            db = sum;
        }
        if shifted {
            dw = self.untangle_taps(&dw);
        }
        (dx, dw, db)
    }

    /// dW as (C_out x C x k^2) from [`Geometry::backward_stack`]'s tap-major layout. Nested loops, no
    /// index arithmetic by division: a division per element cost about as much as the products at 7 x 7.
    fn untangle_taps<T: WithDType>(&self, tap_major: &[T]) -> Vec<T> {
        let (kk, co, c) = (self.k * self.k, self.co, self.c);
        let mut out = vec![T::zero(); tap_major.len()];
        for (tap, block) in tap_major.chunks_exact(co * c).enumerate() {
            if self.dw_transposed() {
                // block[ch][o]
                for (ch, row) in block.chunks_exact(co).enumerate() {
                    for (o, &v) in row.iter().enumerate() {
                        out[(o * c + ch) * kk + tap] = v;
                    }
                }
            } else {
                // block[o][ch]
                for (o, row) in block.chunks_exact(c).enumerate() {
                    for (ch, &v) in row.iter().enumerate() {
                        out[(o * c + ch) * kk + tap] = v;
                    }
                }
            }
        }
        out
    }

    /// The backward of one image through its column matrix (any stride): dW_n = g_n col_n^T, and
    /// dx_n = col2im(W^T g_n).
    fn backward_columns<T: ConvFloat>(
        &self,
        xn: &[T],
        w: &[T],
        gn: &[T],
        dxn: &mut [T],
        par: Parallelism,
    ) -> Vec<T> {
        let (rows, cols) = self.col_dims();
        let mut dw = vec![T::zero(); self.co * rows];
        T::with_col(rows * cols, |col| {
            self.im2col(xn, col);
            let cv = View::transposed(col, cols);
            T::product(
                self.precision,
                &mut dw,
                (self.co, rows, cols),
                false,
                View::rows(gn, cols),
                cv,
                par,
            );
            let wt = View::transposed(w, rows);
            T::product(
                self.precision,
                col,
                (rows, cols, self.co),
                false,
                wt,
                View::rows(gn, cols),
                par,
            );
            self.col2im(col, dxn);
        });
        dw
    }
}

/// The convolution's element types (f32, f64): a per-thread column buffer kept across calls, so that
/// building an image's column matrix does not allocate (and page in) a fresh one each time, and the
/// matrix product in a precision.
trait ConvFloat: WithDType {
    /// Runs `f` on a buffer of `len` values (contents unspecified).
    fn with_col<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;

    /// [`matmul`], in `precision` for f32 (f64 always in f64).
    fn product(
        precision: Precision,
        dst: &mut [Self],
        dims: (usize, usize, usize),
        accumulate: bool,
        lhs: View<Self>,
        rhs: View<Self>,
        par: Parallelism,
    );
}

macro_rules! conv_float {
    ($t:ty, $name:ident, $product:expr) => {
        thread_local! {
            static $name: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
        }

        impl ConvFloat for $t {
            fn with_col<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R {
                // Taken out (not borrowed), so a nested call on this thread gets a buffer of its own.
                let mut buf = $name.with(|b| std::mem::take(&mut *b.borrow_mut()));
                if buf.len() < len {
                    buf.resize(len, 0.0);
                }
                let r = f(&mut buf[..len]);
                $name.with(|b| *b.borrow_mut() = buf);
                r
            }

            fn product(
                precision: Precision,
                dst: &mut [Self],
                dims: (usize, usize, usize),
                accumulate: bool,
                lhs: View<Self>,
                rhs: View<Self>,
                par: Parallelism,
            ) {
                $product(precision, dst, dims, accumulate, lhs, rhs, par)
            }
        }
    };
}

conv_float!(f32, COL_F32, matmul_in);
conv_float!(f64, COL_F64, |_, dst, dims, acc, lhs, rhs, par| matmul(
    dst, dims, acc, lhs, rhs, par
));

/// The convolution as a candle op (see the module documentation).
struct Conv {
    stride: usize,
    /// The f32 products' arithmetic, resolved for this CPU.
    precision: Precision,
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-cpu"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let geo = Geometry::new(xl.shape(), wl.shape(), self.stride, self.precision)?;
        let shape = Shape::from((geo.n, geo.co, geo.ho, geo.wo));
        let out = match xs {
            CpuStorage::F32(_) => {
                CpuStorage::F32(geo.forward::<f32>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(geo.forward::<f64>(slice(xs, xl)?, slice(ws, wl)?, slice(bs, bl)?))
            }
            _ => candle_core::bail!("the CPU convolution takes f32 or f64"),
        };
        Ok((out, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let geo = Geometry::new(x.shape(), w.shape(), self.stride, self.precision)?;
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F32 => geo.backward_tensors::<f32>(x, w, b, g)?,
            candle_core::DType::F64 => geo.backward_tensors::<f64>(x, w, b, g)?,
            d => candle_core::bail!("the CPU convolution takes f32 or f64, got {d:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// The convolutions supported by the U-Net's layers: an odd square kernel matching the input's channels, stride 1 or 2
/// (even sizes for 2).
pub(crate) fn check_conv(x: &Tensor, w: &Tensor, stride: usize) -> Result<()> {
    let (_, c, h, wd) = x.dims4()?;
    let (_, ci, k, k2) = w.dims4()?;
    if ci != c || k != k2 || k % 2 == 0 || !(stride == 1 || stride == 2) {
        return Err(Error::Config(format!(
            "convolution of {:?} with kernel {:?} and stride {stride} is not supported",
            x.dims(),
            w.dims()
        )));
    }
    if stride == 2 && (h % 2 != 0 || wd % 2 != 0) {
        return Err(Error::Config(format!(
            "a stride-2 convolution needs even height and width, got {h}x{wd}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// bf16 products (forward and all three gradients) agree with f32 to bf16's rounding, and differ
    /// from it (bf16 ran), at the tiny U-Net's shapes: stride 1 stacks, stride 2 columns, C > C_out.
    #[test]
    fn bf16_products_match_f32_to_rounding() {
        if !crate::precision::cpu_units().bf16_matmul() {
            eprintln!("no AVX-512 BF16 on this CPU: bf16 falls back to f32, nothing to compare");
            return;
        }
        let dev = Device::Cpu;
        let rms = |t: &Tensor| {
            let n = t.elem_count() as f64;
            (t.sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
                / n)
                .sqrt()
        };
        for (n, c, co, h, stride) in [(8, 32, 32, 28, 1), (3, 64, 32, 7, 1), (4, 32, 64, 14, 2)] {
            let x = Var::randn(0f32, 1.0, (n, c, h, h), &dev).unwrap();
            let w = Var::randn(0f32, 0.1, (co, c, 3, 3), &dev).unwrap();
            let b = Var::randn(0f32, 1.0, (n, co), &dev).unwrap();
            let r = Tensor::randn(0f32, 1.0, (n, co, h / stride, h / stride), &dev).unwrap();
            let run = |p| {
                let y = conv2d(&x, &w, &b, stride, p).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let grad = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                [y, grad(&x), grad(&w), grad(&b)]
            };
            let (f32s, bf16s) = (run(Precision::F32), run(Precision::Bf16));
            for (what, (a, b)) in ["y", "dx", "dw", "db"].iter().zip(f32s.iter().zip(&bf16s)) {
                let rel = rms(&(a - b).unwrap()) / rms(a);
                // bf16 keeps 8 significant bits: inputs rounded by up to 2^-9 relative each
                assert!(
                    rel < 8e-3,
                    "{what} at {:?}: relative RMS error {rel}",
                    (n, c, co, h, stride)
                );
                if *what != "db" {
                    // db is a sum of g, no product: the same in both
                    assert!(rel > 1e-5, "{what}: bf16 gave f32's values, did it run?");
                }
            }
        }
    }

    /// A random bias per image and channel (N x C_out), or per channel (C_out).
    fn random_bias(per_image: bool, n: usize, co: usize) -> Var {
        let dev = Device::Cpu;
        if per_image {
            Var::randn(0f64, 1.0, (n, co), &dev).unwrap()
        } else {
            Var::randn(0f64, 1.0, co, &dev).unwrap()
        }
    }

    /// Values and all three gradients against candle's own conv2d and autograd, for 1x1, 3x3 and 5x5
    /// kernels, strides 1 and 2 (columns and stacks), C > C_out and C < C_out, non-square inputs, images
    /// smaller than the kernel, batches on both sides of the thread count, and a loss that weights every
    /// output differently.
    #[test]
    fn matches_candle_conv2d_and_its_gradients() {
        let dev = Device::Cpu;
        let cases = [
            (3, 1, 1, 6, 4),
            (3, 2, 3, 6, 4),
            (1, 1, 2, 6, 4),
            (1, 2, 1, 6, 4),
            (3, 1, 4, 6, 4),
            (3, 1, 2, 1, 1),
            (3, 2, 2, 2, 2),
            (5, 1, 1, 2, 3),
            (3, 1, 2, 5, 9),
            (3, 1, 4, 9, 8),
            (5, 1, 1, 3, 16),
            // stacks of one image each (64 x 64 is past a stack's size)
            (3, 1, 3, 64, 64),
        ];
        // channels (in, out), few and more; a bias per channel, or per image and channel
        for (((k, stride, n, h, wd), (c, co)), per_image) in cases
            .into_iter()
            .flat_map(|c| [(c, (3, 5)), (c, (9, 8))])
            .flat_map(|c| [(c, false), (c, true)])
        {
            let x = Var::randn(0f64, 1.0, (n, c, h, wd), &dev).unwrap();
            let w = Var::randn(0f64, 1.0, (co, c, k, k), &dev).unwrap();
            let b = random_bias(per_image, n, co);
            let r = Tensor::randn(0f64, 1.0, (n, co, h / stride, wd / stride), &dev).unwrap();
            let ours = conv2d(&x, &w, &b, stride, Precision::F32).unwrap();
            let bias = match b.rank() {
                1 => b.reshape((1, co, 1, 1)).unwrap(),
                _ => b.reshape((n, co, 1, 1)).unwrap(),
            };
            let want = x
                .conv2d(&w, k / 2, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias)
                .unwrap();
            assert_eq!(ours.dims(), want.dims());
            assert!(crate::testing::max_abs_diff(&ours, &want) < 1e-12);
            let go = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gw = (want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [x.as_tensor(), w.as_tensor(), b.as_tensor()] {
                let (a, e) = (go.get(v).unwrap(), gw.get(v).unwrap());
                assert_eq!(a.dims(), e.dims());
                let d = crate::testing::max_abs_diff(a, e);
                assert!(
                    d < 1e-10,
                    "k {k} stride {stride} n {n} channels {c} -> {co} per-image bias {per_image}: gradient differs by {d}"
                );
            }
        }
    }

    /// The stacked stride-1 forward and backward agree with the column forms image by image, for stacks
    /// of one and of several images, on images smaller than the kernel, both dW layouts and 1x1 kernels.
    #[test]
    fn stacked_convolution_matches_the_column_form() {
        let mut rng = crate::rng::Rng::new(7);
        let cases = [
            (3, 3, 5, 6, 4),
            (3, 2, 4, 1, 1),
            (3, 4, 2, 5, 9),
            (5, 3, 2, 3, 16),
            (1, 3, 4, 2, 3),
        ];
        for ((k, c, co, h, w), n) in cases.into_iter().flat_map(|c| [(c, 1), (c, 3)]) {
            let geo = Geometry {
                n,
                c,
                h,
                w,
                co,
                k,
                stride: 1,
                ho: h,
                wo: w,
                precision: Precision::F32,
            };
            let normal = |rng: &mut crate::rng::Rng, len| {
                (0..len).map(|_| rng.normal()).collect::<Vec<f64>>()
            };
            let (img, out) = (c * h * w, co * h * w);
            let (x, wt, g) = (
                normal(&mut rng, n * img),
                normal(&mut rng, co * c * k * k),
                normal(&mut rng, n * out),
            );
            let bias = normal(&mut rng, n * co);
            let close = |a: &[f64], b: &[f64], what: &str| {
                assert_eq!(a.len(), b.len());
                for (u, v) in a.iter().zip(b) {
                    assert!((u - v).abs() < 1e-12, "{what}, k {k} {h}x{w}, {n} images");
                }
            };
            let (mut y_s, mut dx_s) = (vec![0.0; n * out], vec![0.0; n * img]);
            geo.forward_stack(&x, &wt, &bias, &mut y_s, Parallelism::None);
            let dw_s = geo.backward_stack(&x, &wt, &g, &mut dx_s, Parallelism::None);
            let (mut dx_c, mut dw_c) = (vec![0.0; n * img], vec![0.0; co * c * k * k]);
            let mut y_c = vec![0.0; n * out];
            let (rows, cols) = geo.col_dims();
            for i in 0..n {
                let (xn, gn) = (&x[i * img..][..img], &g[i * out..][..out]);
                let dwn = geo.backward_columns(
                    xn,
                    &wt,
                    gn,
                    &mut dx_c[i * img..][..img],
                    Parallelism::None,
                );
                dw_c.iter_mut().zip(&dwn).for_each(|(a, v)| *a += v);
                let mut col = vec![0.0; rows * cols];
                geo.im2col(xn, &mut col);
                let yn = &mut y_c[i * out..][..out];
                for (row, &b) in yn.chunks_exact_mut(cols).zip(&bias[i * co..]) {
                    row.fill(b);
                }
                let (wv, cv) = (View::rows(&wt, rows), View::rows(&col, cols));
                matmul(yn, (co, cols, rows), true, wv, cv, Parallelism::None);
            }
            close(&y_s, &y_c, "y");
            close(&dx_s, &dx_c, "dx");
            close(&geo.untangle_taps(&dw_s), &dw_c, "dw");
        }
    }

    /// Empty batches, zero-sized images and no channels give the bias alone (an empty tensor when there
    /// is nothing to hold it) and a gradient for the bias, instead of reaching the grouping (which needs
    /// at least one image).
    #[test]
    fn empty_inputs_give_the_bias() {
        let dev = Device::Cpu;
        let cases = [
            (0, 3, 6, 6, 5),
            (2, 0, 6, 6, 5),
            (2, 3, 0, 6, 5),
            (0, 0, 6, 6, 5),
            (2, 3, 6, 6, 0),
        ];
        for ((n, c, h, w, co), per_image) in cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let x = Var::zeros((n, c, h, w), DType::F64, &dev).unwrap();
            let wt = Var::randn(0f64, 1.0, (co, c, 3, 3), &dev).unwrap();
            let b = random_bias(per_image, n, co);
            let y = conv2d(&x, &wt, &b, 1, Precision::F32).unwrap();
            assert_eq!(y.dims(), [n, co, h, w]);
            let rows = if per_image { n } else { 1 };
            let want = b
                .reshape((rows, co, 1, 1))
                .unwrap()
                .broadcast_as((n, co, h, w))
                .unwrap();
            assert!(y.elem_count() == 0 || crate::testing::max_abs_diff(&y, &want) == 0.0);
            let grads = y.sum_all().unwrap().backward().unwrap();
            if let Some(gb) = grads.get(b.as_tensor()) {
                assert_eq!(gb.dims(), b.dims());
            }
        }
    }

    #[test]
    fn rejects_unsupported_shapes_and_types() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((5, 3, 3, 3), DType::F64, &dev).unwrap();
        let b = Tensor::zeros(5, DType::F64, &dev).unwrap();
        let odd = Tensor::zeros((1, 3, 5, 5), DType::F64, &dev).unwrap();
        assert!(conv2d(&odd, &w, &b, 2, Precision::F32).is_err());
        let wrong_c = Tensor::zeros((1, 4, 6, 6), DType::F64, &dev).unwrap();
        assert!(conv2d(&wrong_c, &w, &b, 1, Precision::F32).is_err());
        let x = Tensor::zeros((2, 3, 6, 6), DType::F64, &dev).unwrap();
        for bad in [(4, 5), (2, 4)] {
            let b = Tensor::zeros(bad, DType::F64, &dev).unwrap();
            assert!(conv2d(&x, &w, &b, 1, Precision::F32).is_err());
        }
        let half = Tensor::zeros((1, 3, 6, 6), DType::F16, &dev).unwrap();
        assert!(conv2d(
            &half,
            &w.to_dtype(DType::F16).unwrap(),
            &b,
            1,
            Precision::F32
        )
        .is_err());
    }
}

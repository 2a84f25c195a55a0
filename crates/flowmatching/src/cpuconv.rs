//! The U-Net's convolution on the CPU as one candle op with its own backward: im2col per image and one
//! matrix product per image and direction, on host buffers.
//!
//! For image n with input x_n (C x H x W), kernel W (C_out x C k^2), padding p = k/2 and stride s, the
//! column matrix col_n (C k^2 x H' W') holds col_n[(c, dy, dx), (i, j)] = x_n[c, s i + dy - p, s j + dx - p]
//! (zero outside the image). Then
//! - forward:  y_n = W col_n + b                      (C_out x H' W', already NCHW),
//! - backward: dW = sum_n g_n col_n^T, db = sum_n sum_(i,j) g_n, dx_n = col2im(W^T g_n),
//!
//! where col2im adds each column entry back onto the pixel it was read from. Built from candle ops the same
//! convolution took a padded copy, nine window copies, a concatenation and two layout changes forward, and
//! as many backward; here each image's column matrix (C k^2 x H' W', a few MB at most) is built once forward
//! and once backward and stays in cache. Images run in parallel on candle's CPU thread pool.
//!
//! At stride 1 the forward, and the backward on images wide enough, build no column matrix: each is one
//! product per kernel tap on a shifted view of the zero-padded image (forward and dW) or of the
//! zero-padded g_n (dx: a convolution with the flipped kernel); see `Geometry::shifted_products` and
//! `Geometry::backward_shifted`.
//!
//! The bias b is per channel (C_out), or per image and channel (N x C_out): then db_n = sum_(i,j) g_n.
//! A per-image bias takes in an addend that is constant over each image (the U-Net's time embedding)
//! without a separate broadcast add, whose backward candle runs as a reduction over the whole activation.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use gemm::Parallelism;

use crate::error::{Error, Result};
use crate::linalg::{matmul, slice, with_slice, zeroed_by_chunks, View};

/// Whether [`conv2d`] takes `x`: f32 or f64 on the CPU.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
}

/// y = conv(x, w) + b with padding k/2 and stride `stride` (1, or 2 on even sizes) for an odd square
/// kernel w (C_out x C x k x k), on f32 or f64 tensors on the CPU; b is (C_out), or (N, C_out) for a
/// bias per image.
pub fn conv2d(x: &Tensor, w: &Tensor, b: &Tensor, stride: usize) -> Result<Tensor> {
    if !supports(x) {
        return Err(Error::Config(format!(
            "the CPU convolution takes f32 or f64 tensors on the CPU, got {:?} on {:?}",
            x.dtype(),
            x.device()
        )));
    }
    crate::layers::check_conv(x, w, stride)?;
    let (n, co) = (x.dim(0)?, w.dim(0)?);
    if b.dims() != [co] && b.dims() != [n, co] {
        return Err(Error::Config(format!(
            "the convolution's bias must be ({co}) or ({n}, {co}), got {:?}",
            b.dims()
        )));
    }
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, Conv { stride })?)
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
}

impl Geometry {
    /// From shapes that passed [`crate::layers::check_conv`].
    fn new(x: &Shape, w: &Shape, stride: usize) -> candle_core::Result<Self> {
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

    /// Images in parallel when there are enough of them, else one at a time with threaded products.
    fn parallelism(&self) -> (bool, Parallelism) {
        let threads = rayon::current_num_threads();
        if self.n >= threads {
            (true, Parallelism::None)
        } else {
            (false, Parallelism::Rayon(threads))
        }
    }

    /// Row length of the padded layout ([`Geometry::pad_planes`]): W + p.
    fn padded_width(&self) -> usize {
        self.w + self.k / 2
    }

    /// Values per plane of the padded layout: (H + 2p) rows of W + p.
    fn padded_plane(&self) -> usize {
        (self.h + 2 * (self.k / 2)) * self.padded_width()
    }

    /// Length of [`Geometry::pad_planes`]'s output for `channels` planes.
    fn padded_len(&self, channels: usize) -> usize {
        channels * self.padded_plane() + 2 * (self.k / 2)
    }

    /// dst = the planes of `src` (H x W each) zero-padded for a same-size k x k convolution, p = k/2:
    /// p zeros, then per plane p rows of zeros, the H image rows each followed by p zeros, p rows of
    /// zeros (rows of W + p), then p zeros. A row needs only p zeros on one side: flattened, the p zeros
    /// after one row are also the ones before the next. Only the zeros are written besides the copy.
    fn pad_planes<T: WithDType>(&self, src: &[T], dst: &mut [T]) {
        let p = self.k / 2;
        let (h, w, wp, plane) = (self.h, self.w, self.padded_width(), self.padded_plane());
        let planes = src.len() / (h * w);
        dst[..p].fill(T::zero());
        for (s, d) in src
            .chunks_exact(h * w)
            .zip(dst[p..].chunks_exact_mut(plane))
        {
            d[..p * wp].fill(T::zero());
            for (i, row) in s.chunks_exact(w).enumerate() {
                let at = (p + i) * wp;
                d[at..at + w].copy_from_slice(row);
                d[at + w..at + wp].fill(T::zero());
            }
            d[(p + h) * wp..].fill(T::zero());
        }
        dst[p + planes * plane..].fill(T::zero());
    }

    /// Stride 1 without a column matrix: in the padded layout `pad` ([`Geometry::pad_planes`]), the
    /// input of kernel tap (dy, dx) for output pixel (i, j) sits at (i + dy)(W+p) + j + dx, i.e. at the
    /// output's own padded-width index q = i (W+p) + j shifted by dy (W+p) + dx. So
    /// ypad (C_out x H (W+p)) += sum over the k^2 taps of W_tap (C_out x C, from `tap_weight`) times the
    /// padded image shifted by that offset, each a plain strided matrix product; the columns j >= W are
    /// left for [`Geometry::unpad_columns`] to drop.
    fn shifted_products<'w, T: WithDType>(
        &self,
        pad: &[T],
        tap_weight: impl Fn(usize) -> View<'w, T>,
        ypad: &mut [T],
        par: Parallelism,
    ) {
        let (k, wp, plane) = (self.k, self.padded_width(), self.padded_plane());
        for dy in 0..k {
            for dx in 0..k {
                let xv = View::strided(pad, dy * wp + dx, plane, 1);
                let dims = (self.co, self.h * wp, self.c);
                matmul(ypad, dims, true, tap_weight(dy * k + dx), xv, par);
            }
        }
    }

    /// dst (planes of H x W) = the first W columns of each padded-width row of `src` (H x (W+p) planes).
    fn unpad_columns<T: WithDType>(&self, src: &[T], dst: &mut [T]) {
        let wp = self.padded_width();
        for (s, d) in src
            .chunks_exact(self.h * wp)
            .zip(dst.chunks_exact_mut(self.h * self.w))
        {
            for (row, out) in s.chunks_exact(wp).zip(d.chunks_exact_mut(self.w)) {
                out.copy_from_slice(&row[..self.w]);
            }
        }
    }

    /// Whether the backward runs as shifted products ([`Geometry::backward_shifted`]) rather than
    /// through column matrices: at stride 1 on images at least 8p wide. The shifted products also
    /// multiply the p padding columns of every row, 1/8 more work or less from that width on, which
    /// their not building column matrices more than pays for; on narrower images (the U-Net's 7 x 7
    /// level) the columns were as fast or faster (`bench unet-parts`, tiny and small presets).
    fn shifted_backward_pays(&self) -> bool {
        self.stride == 1 && self.w >= 8 * (self.k / 2)
    }

    /// Whether the shifted backward computes dW_tap^T = X_tap g_n^T (C x C_out) rather than dW_tap: when
    /// C > C_out, so that the matrix kernel's long side (its 64-row tiles) runs over the larger count
    /// (the 64 -> 32 decoder convolution of the tiny U-Net: dW 12% faster, `bench unet-parts`).
    fn dw_transposed(&self) -> bool {
        self.c > self.co
    }

    /// The stride-1 forward of one image: pad, bias, [`Geometry::shifted_products`], unpad.
    fn forward_shifted<T: ColScratch>(
        &self,
        xn: &[T],
        w: &[T],
        bias: &[T],
        yn: &mut [T],
        par: Parallelism,
    ) {
        let kk = self.k * self.k;
        let q = self.h * self.padded_width();
        let pad_len = self.padded_len(self.c);
        T::with_col(pad_len + self.co * q, |buf| {
            let (pad, ypad) = buf.split_at_mut(pad_len);
            self.pad_planes(xn, pad);
            for (row, &bv) in ypad.chunks_exact_mut(q).zip(bias) {
                row.fill(bv);
            }
            // W_tap[o, c] = w[o, c, tap]
            let tap_weight = |tap| View::strided(w, tap, self.c * kk, kk);
            self.shifted_products(pad, tap_weight, ypad, par);
            self.unpad_columns(ypad, yn);
        });
    }

    /// The stride-1 backward of one image without column matrices. With g_n padded like an input:
    /// - dx_n is the same-padded convolution of g_n with the kernel flipped in space and transposed in
    ///   channels, dx_n[c] = sum_(o, tap) w[o, c, k^2 - 1 - tap] g_n[o] shifted by the tap: the forward's
    ///   shifted products with C and C_out swapped;
    /// - dW_tap (C_out x C) = g_n (C_out x H (W+p), at the padded width, zeros in the columns j >= W)
    ///   times the padded input shifted by the tap, transposed. The padded g_n read from its first image
    ///   row on is exactly that.
    ///
    /// Writes dx_n and returns dW tap-major: (k^2 x C_out x C), or (k^2 x C x C_out) when
    /// [`Geometry::dw_transposed`].
    fn backward_shifted<T: ColScratch>(
        &self,
        xn: &[T],
        w: &[T],
        gn: &[T],
        dxn: &mut [T],
        par: Parallelism,
    ) -> Vec<T> {
        let (k, p, kk) = (self.k, self.k / 2, self.k * self.k);
        let (wp, plane) = (self.padded_width(), self.padded_plane());
        let q = self.h * wp;
        let swapped = Geometry {
            c: self.co,
            co: self.c,
            ..*self
        };
        let (xlen, glen) = (self.padded_len(self.c), self.padded_len(self.co));
        let mut dw = vec![T::zero(); kk * self.co * self.c];
        let transposed = self.dw_transposed();
        T::with_col(xlen + glen + self.c * q, |buf| {
            let (xpad, rest) = buf.split_at_mut(xlen);
            let (gpad, dxpad) = rest.split_at_mut(glen);
            self.pad_planes(xn, xpad);
            swapped.pad_planes(gn, gpad);
            dxpad.fill(T::zero());
            // W^T_tap[c, o] = w[o, c, k^2 - 1 - tap]
            let flipped = |tap| View::strided(w, kk - 1 - tap, kk, self.c * kk);
            swapped.shifted_products(gpad, flipped, dxpad, par);
            self.unpad_columns(dxpad, dxn);
            // g_n from its first image row on; as (C_out x q) rows or (q x C_out) columns
            let g_at = p * wp + p;
            for (tap, dwt) in dw.chunks_exact_mut(self.co * self.c).enumerate() {
                let x_at = tap / k * wp + tap % k;
                if transposed {
                    let xv = View::strided(xpad, x_at, plane, 1);
                    let gv = View::strided(gpad, g_at, 1, plane);
                    matmul(dwt, (self.c, self.co, q), false, xv, gv, par);
                } else {
                    let gv = View::strided(gpad, g_at, plane, 1);
                    let xv = View::strided(xpad, x_at, 1, plane);
                    matmul(dwt, (self.co, self.c, q), false, gv, xv, par);
                }
            }
        });
        dw
    }

    fn forward<T: ColScratch>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let (rows, cols) = self.col_dims();
        let shifted = self.stride == 1;
        let (by_image, par) = self.parallelism();
        let img = self.c * self.h * self.w;
        let image = |n: usize, yn: &mut [T]| {
            let xn = &x[n * img..(n + 1) * img];
            let bias = if b.len() == self.co {
                b
            } else {
                &b[n * self.co..(n + 1) * self.co]
            };
            if shifted {
                return self.forward_shifted(xn, w, bias, yn, par);
            }
            T::with_col(rows * cols, |col| {
                self.im2col(xn, col);
                for (row, &bias) in yn.chunks_exact_mut(cols).zip(bias) {
                    row.fill(bias);
                }
                let (wv, cv) = (View::rows(w, rows), View::rows(col, cols));
                matmul(yn, (self.co, cols, rows), true, wv, cv, par);
            });
        };
        let per = self.co * cols;
        if by_image {
            return zeroed_by_chunks(self.n * per, per, image).0;
        }
        let mut y = vec![T::zero(); self.n * per];
        for (n, yn) in y.chunks_exact_mut(per).enumerate() {
            image(n, yn);
        }
        y
    }

    /// [`Geometry::backward`] from and to tensors.
    fn backward_tensors<T: ColScratch>(
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
    fn backward<T: ColScratch>(
        &self,
        x: &[T],
        w: &[T],
        g: &[T],
        per_image: bool,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (rows, cols) = self.col_dims();
        let (by_image, par) = self.parallelism();
        let img = self.c * self.h * self.w;

        // Each image's (dw, db) contributions; summed after. At stride 1, dw comes tap-major.
        let shifted = self.shifted_backward_pays();
        let image = |n: usize, dxn: &mut [T]| -> (Vec<T>, Vec<T>) {
            let gn = &g[n * self.co * cols..(n + 1) * self.co * cols];
            let xn = &x[n * img..(n + 1) * img];
            let dw = if shifted {
                self.backward_shifted(xn, w, gn, dxn, par)
            } else {
                self.backward_columns(xn, w, gn, dxn, par)
            };
            let db = gn
                .chunks_exact(cols)
                .map(|r| r.iter().fold(T::zero(), |a, &v| a + v))
                .collect();
            (dw, db)
        };
        // Collected in image order, so the sums below do not depend on the threads' timing.
        let (dx, parts) = if by_image {
            zeroed_by_chunks(self.n * img, img, image)
        } else {
            let mut dx = vec![T::zero(); self.n * img];
            let parts: Vec<(Vec<T>, Vec<T>)> = dx
                .chunks_exact_mut(img)
                .enumerate()
                .map(|(n, dxn)| image(n, dxn))
                .collect();
            (dx, parts)
        };
        let mut dw = vec![T::zero(); self.co * rows];
        let mut db = vec![T::zero(); if per_image { self.n * self.co } else { self.co }];
        for (n, (pw, pb)) in parts.into_iter().enumerate() {
            dw.iter_mut().zip(&pw).for_each(|(a, &v)| *a += v);
            let dbn = if per_image {
                &mut db[n * self.co..(n + 1) * self.co]
            } else {
                &mut db[..]
            };
            dbn.iter_mut().zip(&pb).for_each(|(a, &v)| *a += v);
        }
        if shifted {
            dw = self.untangle_taps(&dw);
        }
        (dx, dw, db)
    }

    /// dW as (C_out x C x k^2) from [`Geometry::backward_shifted`]'s tap-major layout.
    fn untangle_taps<T: WithDType>(&self, tap_major: &[T]) -> Vec<T> {
        let (kk, co, c) = (self.k * self.k, self.co, self.c);
        let mut out = vec![T::zero(); tap_major.len()];
        for (i, &v) in tap_major.iter().enumerate() {
            let (tap, o, ch) = if self.dw_transposed() {
                (i / (co * c), i % co, i / co % c)
            } else {
                (i / (co * c), i / c % co, i % c)
            };
            out[(o * c + ch) * kk + tap] = v;
        }
        out
    }

    /// The backward of one image through its column matrix (any stride): dW_n = g_n col_n^T, and
    /// dx_n = col2im(W^T g_n).
    fn backward_columns<T: ColScratch>(
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
            matmul(
                &mut dw,
                (self.co, rows, cols),
                false,
                View::rows(gn, cols),
                cv,
                par,
            );
            let wt = View::transposed(w, rows);
            matmul(
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

/// Element types with a per-thread column buffer kept across calls, so that building an image's column
/// matrix does not allocate (and page in) a fresh one each time.
trait ColScratch: WithDType {
    /// Runs `f` on a buffer of `len` values (contents unspecified).
    fn with_col<R>(len: usize, f: impl FnOnce(&mut [Self]) -> R) -> R;
}

macro_rules! col_scratch {
    ($t:ty, $name:ident) => {
        thread_local! {
            static $name: std::cell::RefCell<Vec<$t>> = const { std::cell::RefCell::new(Vec::new()) };
        }

        impl ColScratch for $t {
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
        }
    };
}

col_scratch!(f32, COL_F32);
col_scratch!(f64, COL_F64);

/// The convolution as a candle op (see the module documentation).
struct Conv {
    stride: usize,
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
        let geo = Geometry::new(xl.shape(), wl.shape(), self.stride)?;
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
        let geo = Geometry::new(x.shape(), w.shape(), self.stride)?;
        let (dx, dw, db) = match x.dtype() {
            candle_core::DType::F32 => geo.backward_tensors::<f32>(x, w, b, g)?,
            candle_core::DType::F64 => geo.backward_tensors::<f64>(x, w, b, g)?,
            d => candle_core::bail!("the CPU convolution takes f32 or f64, got {d:?}"),
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Values and all three gradients against candle's own conv2d and autograd, for 1x1 and 3x3 kernels,
    /// strides 1 and 2, non-square inputs, images smaller than the kernel, batches on both sides of the
    /// thread count, and a loss that weights every output differently.
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
            // wide enough for the shifted backward
            (3, 1, 2, 5, 9),
            (3, 1, 4, 9, 8),
            (5, 1, 1, 3, 16),
        ];
        // a bias per channel, or per image and channel
        for ((k, stride, n, h, wd), per_image) in
            cases.into_iter().flat_map(|c| [(c, false), (c, true)])
        {
            let x = Var::randn(0f64, 1.0, (n, 3, h, wd), &dev).unwrap();
            let w = Var::randn(0f64, 1.0, (5, 3, k, k), &dev).unwrap();
            let b = if !per_image {
                Var::randn(0f64, 1.0, 5, &dev).unwrap()
            } else {
                Var::randn(0f64, 1.0, (n, 5), &dev).unwrap()
            };
            let r = Tensor::randn(0f64, 1.0, (n, 5, h / stride, wd / stride), &dev).unwrap();
            let ours = conv2d(&x, &w, &b, stride).unwrap();
            let bias = match b.rank() {
                1 => b.reshape((1, 5, 1, 1)).unwrap(),
                _ => b.reshape((n, 5, 1, 1)).unwrap(),
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
                    "k {k} stride {stride} n {n} per-image bias {per_image}: gradient differs by {d}"
                );
            }
        }
    }

    /// The two stride-1 backward forms agree image by image, on widths either side of the switch
    /// between them and on images smaller than the kernel.
    #[test]
    fn shifted_backward_matches_column_backward() {
        let mut rng = crate::rng::Rng::new(7);
        for (k, c, co, h, w) in [
            (3, 3, 5, 6, 4),
            (3, 2, 4, 1, 1),
            (3, 4, 2, 5, 9),
            (5, 3, 2, 3, 16),
            (1, 3, 4, 2, 3),
        ] {
            let geo = Geometry {
                n: 1,
                c,
                h,
                w,
                co,
                k,
                stride: 1,
                ho: h,
                wo: w,
            };
            let normal = |rng: &mut crate::rng::Rng, len| {
                (0..len).map(|_| rng.normal()).collect::<Vec<f64>>()
            };
            let (x, wt, g) = (
                normal(&mut rng, c * h * w),
                normal(&mut rng, co * c * k * k),
                normal(&mut rng, co * h * w),
            );
            let (mut dx_s, mut dx_c) = (vec![0.0; c * h * w], vec![0.0; c * h * w]);
            let dw_s = geo.backward_shifted(&x, &wt, &g, &mut dx_s, Parallelism::None);
            let dw_c = geo.backward_columns(&x, &wt, &g, &mut dx_c, Parallelism::None);
            for (a, b) in geo.untangle_taps(&dw_s).iter().zip(&dw_c) {
                assert!((a - b).abs() < 1e-12, "dw, k {k} {h}x{w}");
            }
            for (a, b) in dx_s.iter().zip(&dx_c) {
                assert!((a - b).abs() < 1e-12, "dx, k {k} {h}x{w}");
            }
        }
    }

    #[test]
    fn rejects_unsupported_shapes_and_types() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((5, 3, 3, 3), DType::F64, &dev).unwrap();
        let b = Tensor::zeros(5, DType::F64, &dev).unwrap();
        let odd = Tensor::zeros((1, 3, 5, 5), DType::F64, &dev).unwrap();
        assert!(conv2d(&odd, &w, &b, 2).is_err());
        let wrong_c = Tensor::zeros((1, 4, 6, 6), DType::F64, &dev).unwrap();
        assert!(conv2d(&wrong_c, &w, &b, 1).is_err());
        let x = Tensor::zeros((2, 3, 6, 6), DType::F64, &dev).unwrap();
        for bad in [(4, 5), (2, 4)] {
            let b = Tensor::zeros(bad, DType::F64, &dev).unwrap();
            assert!(conv2d(&x, &w, &b, 1).is_err());
        }
        let half = Tensor::zeros((1, 3, 6, 6), DType::F16, &dev).unwrap();
        assert!(conv2d(&half, &w.to_dtype(DType::F16).unwrap(), &b, 1).is_err());
    }
}

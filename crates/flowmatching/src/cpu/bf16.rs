//! bf16 matrix products on AVX-512 BF16: C = A B (+ C) with A and B rounded to bfloat16 (round to
//! nearest even) and every product accumulated in f32, as PyTorch's CPU autocast and oneDNN do.
//!
//! One instruction, `vdpbf16ps`, multiplies 16 pairs of bf16 values and adds each pair's two products
//! to one f32 lane: acc_j += a_{2p} b_{2p, j} + a_{2p+1} b_{2p+1, j}. So k is walked in pairs: B is
//! packed as panels of [`NR`] columns, each k-pair a row of NR (b_{2p, j}, b_{2p+1, j}) words, and A as
//! blocks of [`MR`] rows, each k-pair one (a_{i, 2p}, a_{i, 2p+1}) word broadcast across the lanes. A
//! register tile of MR x NR f32 accumulators (24 of the 32 vector registers) takes one k-pair per
//! step. B is packed once per ([`KC`] x [`NC`]) block and read from cache by every row block; threads
//! split the rows.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use gemm::Parallelism;
use rayon::prelude::*;

use super::linalg::View;

/// Rows of a register tile.
const MR: usize = 12;
/// Columns of a register tile (two vectors of 16 f32).
const NR: usize = 32;
/// Depth of a packed block (k values; a multiple of 2).
const KC: usize = 512;
/// Columns of a packed block (a multiple of NR).
const NC: usize = 1024;

/// Whether this CPU runs the bf16 kernel (AVX-512 F and BF16, detected at run time).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub(crate) fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
#[cfg(test)]
pub(crate) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// f32 rounded to the nearest bf16 value.
#[cfg(test)]
pub(crate) fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// Two bf16 values in one word, the first in the low half (the pair order of `vdpbf16ps`).
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// Where the packed A block keeps pair p of row i: at p * sp + i * si (words).
#[derive(Clone, Copy)]
struct ALayout {
    sp: usize,
    si: usize,
}

/// dst (m x n, row-major) = lhs (m x k) rhs (k x n) in bf16 with f32 accumulation, added to dst's
/// values if `accumulate`. The caller checks [`available`] first.
pub(crate) fn matmul(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    lhs: View<f32>,
    rhs: View<f32>,
    par: Parallelism,
) {
    assert!(available(), "the bf16 kernel needs AVX-512 BF16");
    assert!(dst.len() >= m * n && lhs.fits(m, k) && rhs.fits(k, n));
    if !accumulate {
        dst[..m * n].fill(0.0);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    let threads = match par {
        Parallelism::Rayon(t) if t > 1 && m >= 2 * MR => t.min(m / MR),
        _ => 1,
    };
    // Rows per thread, whole tiles.
    let rows = m.div_ceil(threads).div_ceil(MR) * MR;
    let mut packed_b = vec![0u32; KC / 2 * NC];
    let mut packed_a = vec![vec![0u32; MR * KC / 2]; threads];
    for jc in (0..n).step_by(NC) {
        let nc = NC.min(n - jc);
        for pc in (0..k).step_by(KC) {
            let kc = KC.min(k - pc);
            let pairs = kc.div_ceil(2);
            pack_b(&mut packed_b, rhs, pc, kc, jc, nc);
            let b = &packed_b;
            let block = |(chunk, a): (&mut [f32], &mut Vec<u32>), first: usize| {
                let m_here = chunk.len() / n;
                for ir in (0..m_here).step_by(MR) {
                    let mr = MR.min(m_here - ir);
                    let layout = pack_a(a, lhs, first + ir, mr, pc, kc);
                    for jr in (0..nc).step_by(NR) {
                        let nr = NR.min(nc - jr);
                        let panel = &b[jr / NR * (pairs * NR)..];
                        let c = &mut chunk[ir * n + jc + jr..];
                        // SAFETY: `available` was checked above; the packed block holds `pairs`
                        // k-pairs of MR rows at `layout` and the panel `pairs` rows of NR words; the
                        // tile writes mr rows of nr values at stride n inside `chunk`.
                        unsafe { tile(pairs, a, layout, panel, c, n, mr, nr) };
                    }
                }
            };
            let dst = &mut dst[..m * n];
            if threads > 1 {
                dst.par_chunks_mut(rows * n)
                    .zip(packed_a.par_iter_mut())
                    .enumerate()
                    .for_each(|(i, c)| block(c, i * rows));
            } else {
                block((dst, &mut packed_a[0]), 0);
            }
        }
    }
}

/// Packs rhs[pc..pc + kc, jc..jc + nc] into panels of NR columns: panel q, k-pair p, column j at
/// q * (pairs * NR) + p * NR + j. Columns past nc and the odd k row past kc are zero.
fn pack_b(out: &mut [u32], rhs: View<f32>, pc: usize, kc: usize, jc: usize, nc: usize) {
    let pairs = kc.div_ceil(2);
    let (data, rs, cs) = rhs.parts();
    for (q, j0) in (0..nc).step_by(NR).enumerate() {
        let panel = &mut out[q * pairs * NR..(q + 1) * pairs * NR];
        let width = NR.min(nc - j0);
        let col = jc + j0;
        if cs == 1 {
            // Rows of B are contiguous: each k-pair interleaves two row pieces.
            for p in 0..pairs {
                let r0 = &data[(pc + 2 * p) * rs + col..][..width];
                let r1 = (2 * p + 1 < kc).then(|| &data[(pc + 2 * p + 1) * rs + col..][..width]);
                interleave(&mut panel[p * NR..(p + 1) * NR], r0, r1);
            }
        } else if rs == 1 {
            // Columns of B are contiguous: each column is a run of k-pairs.
            let mut words = [0u32; KC / 2];
            for j in 0..NR {
                if j >= width {
                    for p in 0..pairs {
                        panel[p * NR + j] = 0;
                    }
                    continue;
                }
                pairs_of(&mut words[..pairs], &data[(col + j) * cs + pc..][..kc]);
                for p in 0..pairs {
                    panel[p * NR + j] = words[p];
                }
            }
        } else {
            for p in 0..pairs {
                for j in 0..NR {
                    panel[p * NR + j] = match j < width {
                        false => 0,
                        true => {
                            let hi = match 2 * p + 1 < kc {
                                true => rhs.at(pc + 2 * p + 1, col + j),
                                false => 0.0,
                            };
                            pair(rhs.at(pc + 2 * p, col + j), hi)
                        }
                    };
                }
            }
        }
    }
}

/// Packs lhs[i0..i0 + mr, pc..pc + kc] (rows past mr zero) and says where each pair went.
fn pack_a(out: &mut [u32], lhs: View<f32>, i0: usize, mr: usize, pc: usize, kc: usize) -> ALayout {
    let pairs = kc.div_ceil(2);
    let (data, rs, cs) = lhs.parts();
    if cs == 1 {
        // Rows contiguous: row i's pairs in a run.
        for i in 0..MR {
            let run = &mut out[i * pairs..(i + 1) * pairs];
            match i < mr {
                true => pairs_of(run, &data[(i0 + i) * rs + pc..][..kc]),
                false => run.fill(0),
            }
        }
        return ALayout { sp: 1, si: pairs };
    }
    if rs == 1 {
        // Columns contiguous: each k-pair interleaves two column pieces.
        for p in 0..pairs {
            let r0 = &data[(pc + 2 * p) * cs + i0..][..mr];
            let r1 = (2 * p + 1 < kc).then(|| &data[(pc + 2 * p + 1) * cs + i0..][..mr]);
            interleave(&mut out[p * MR..(p + 1) * MR], r0, r1);
        }
    } else {
        for p in 0..pairs {
            for i in 0..MR {
                out[p * MR + i] = match i < mr {
                    false => 0,
                    true => {
                        let hi = match 2 * p + 1 < kc {
                            true => lhs.at(i0 + i, pc + 2 * p + 1),
                            false => 0.0,
                        };
                        pair(lhs.at(i0 + i, pc + 2 * p), hi)
                    }
                };
            }
        }
    }
    ALayout { sp: MR, si: 1 }
}

/// out[j] = pair(r0[j], r1[j]) (r1 absent: 0), zero past r0's length.
fn interleave(out: &mut [u32], r0: &[f32], r1: Option<&[f32]>) {
    let n = r0.len();
    let mut j = 0;
    #[cfg(target_arch = "x86_64")]
    while j < n {
        let len = 16.min(n - j);
        let hi = r1.map(|r| &r[j..j + len]);
        // SAFETY: the kernel's callers checked `available`; `len` values are read from r0[j..] and
        // r1[j..] and `len` words written to out[j..].
        unsafe { interleave16(&mut out[j..j + len], &r0[j..j + len], hi) };
        j += len;
    }
    for (jj, w) in out.iter_mut().enumerate().skip(j) {
        *w = match jj < n {
            true => pair(r0[jj], r1.map_or(0.0, |r| r[jj])),
            false => 0,
        };
    }
}

/// out[p] = pair(x[2p], x[2p + 1]) for the pairs of `x` (an odd last value pairs with 0).
fn pairs_of(out: &mut [u32], x: &[f32]) {
    let mut p = 0;
    #[cfg(target_arch = "x86_64")]
    while 2 * p + 32 <= x.len() {
        // SAFETY: as in `interleave`: 32 values read, 16 words written.
        unsafe { pairs16(&mut out[p..p + 16], &x[2 * p..2 * p + 32]) };
        p += 16;
    }
    for (pp, w) in out.iter_mut().enumerate().skip(p) {
        let hi = x.get(2 * pp + 1).copied().unwrap_or(0.0);
        *w = pair(x[2 * pp], hi);
    }
}

/// Up to sixteen pairs: out[j] = pair(r0[j], r1[j]) (r1 absent: 0) for j < r0.len().
///
/// # Safety
/// AVX-512 F, BW and BF16; r0 (and r1) and out hold the same number of values, at most 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave16(out: &mut [u32], r0: &[f32], r1: Option<&[f32]>) {
    let mask = (((1u32 << r0.len()) - 1) & 0xFFFF) as u16;
    let lo = _mm512_maskz_loadu_ps(mask, r0.as_ptr());
    let hi = match r1 {
        Some(r) => _mm512_maskz_loadu_ps(mask, r.as_ptr()),
        None => _mm512_setzero_ps(),
    };
    // Halves 0-15: bf16(lo), halves 16-31: bf16(hi); then word j = (half j, half 16 + j).
    let both: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
    let index = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let words = _mm512_permutexvar_epi16(index, both);
    _mm512_mask_storeu_epi32(out.as_mut_ptr() as *mut _, mask, words);
}

/// Sixteen pairs of consecutive values of x (32 values).
///
/// # Safety
/// AVX-512 F and BF16; x holds 32 values, out 16 words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pairs16(out: &mut [u32], x: &[f32]) {
    let a = _mm512_loadu_ps(x.as_ptr());
    let b = _mm512_loadu_ps(x.as_ptr().add(16));
    // Halves 0-15 from a, 16-31 from b: in memory order, so words are consecutive pairs.
    let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
    _mm512_storeu_si512(out.as_mut_ptr() as *mut _, h);
}

/// c[i * ldc + j] += sum_p a_pair(p, i) . b_pair(p, j) for i < mr, j < nr.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `a` holds the pairs of MR rows at `layout`, `b` pairs * NR words,
/// and `c` the mr rows of nr values at stride ldc.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    pairs: usize,
    a: &[u32],
    layout: ALayout,
    b: &[u32],
    c: &mut [f32],
    ldc: usize,
    mr: usize,
    nr: usize,
) {
    let ALayout { sp, si } = layout;
    debug_assert!(pairs >= 1 && a.len() > (pairs - 1) * sp + (MR - 1) * si);
    debug_assert!(b.len() >= pairs * NR);
    debug_assert!(mr >= 1 && nr >= 1 && c.len() > (mr - 1) * ldc + nr - 1);
    let mut acc = [_mm512_setzero_ps(); 2 * MR];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..pairs {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(bp.add(p * NR + 16) as *const _));
        let row = ap.add(p * sp);
        for i in 0..MR {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*row.add(i * si) as i32));
            acc[2 * i] = _mm512_dpbf16_ps(acc[2 * i], ai, b0);
            acc[2 * i + 1] = _mm512_dpbf16_ps(acc[2 * i + 1], ai, b1);
        }
    }
    let cp = c.as_mut_ptr();
    let lo = if nr >= 16 {
        0xFFFF
    } else {
        (1u32 << nr) as u16 - 1
    };
    let hi = if nr >= 32 {
        0xFFFF
    } else if nr > 16 {
        (1u32 << (nr - 16)) as u16 - 1
    } else {
        0
    };
    for i in 0..mr {
        let row = cp.add(i * ldc);
        let v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(lo, row), acc[2 * i]);
        _mm512_mask_storeu_ps(row, lo, v0);
        if hi != 0 {
            let v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(hi, row.add(16)), acc[2 * i + 1]);
            _mm512_mask_storeu_ps(row.add(16), hi, v1);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    _: usize,
    _: &[u32],
    _: ALayout,
    _: &[u32],
    _: &mut [f32],
    _: usize,
    _: usize,
    _: usize,
) {
    unreachable!("the bf16 kernel is x86-64 only")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn rounding_is_to_nearest_even() {
        // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even one (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(round_bf16(1.0 + 1.5 / 256.0), 1.0 + 2.0 / 256.0);
        assert_eq!(round_bf16(-2.5e-3), -from_bf16(to_bf16(2.5e-3)));
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        for x in [0.0f32, 1.0, -3.0, 0.5, 1.0 / 128.0] {
            assert_eq!(round_bf16(x), x, "{x} is a bf16 value");
        }
    }

    /// The product of the bf16-rounded inputs in f64: what the kernel computes up to f32 rounding of
    /// its accumulation.
    fn reference(a: View<f32>, b: View<f32>, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| round_bf16(a.at(i, p)) as f64 * round_bf16(b.at(p, j)) as f64)
                    .sum();
            }
        }
        c
    }

    #[test]
    fn products_match_the_rounded_inputs_product_at_every_shape_and_layout() {
        if !available() {
            eprintln!("no AVX-512 BF16 on this CPU: the kernel is not run");
            return;
        }
        let mut rng = Rng::new(1);
        // Edges of every block size: tiles (MR, NR), depth (odd k, KC), panels (NC), threads.
        for &(m, n, k) in &[
            (1, 1, 1),
            (5, 7, 3),
            (12, 32, 2),
            (13, 33, 17),
            (30, 70, 515),
            (25, 1030, 9),
            (100, 64, 1200),
        ] {
            let a = rng.normal_vec(m * k);
            let b = rng.normal_vec(k * n);
            let c0 = rng.normal_vec(m * n);
            // Row-major, transposed, and a general strided view (every second value of a buffer
            // twice the size) for each operand.
            let (a2, b2): (Vec<f32>, Vec<f32>) = (
                a.iter().flat_map(|&v| [v, f32::NAN]).collect(),
                b.iter().flat_map(|&v| [v, f32::NAN]).collect(),
            );
            for (transpose_a, transpose_b) in [(0, 0), (1, 0), (0, 1), (2, 1), (1, 2), (1, 1)] {
                let va = match transpose_a {
                    0 => View::rows(&a, k),
                    1 => View::transposed(&a, m),
                    _ => View::strided(&a2, 0, 2 * k, 2),
                };
                let vb = match transpose_b {
                    0 => View::rows(&b, n),
                    1 => View::transposed(&b, k),
                    _ => View::strided(&b2, 0, 2 * n, 2),
                };
                let want = reference(va, vb, (m, n, k));
                for (accumulate, par) in [(false, Parallelism::None), (true, Parallelism::Rayon(2))]
                {
                    let mut c = c0.clone();
                    matmul(&mut c, (m, n, k), accumulate, va, vb, par);
                    for i in 0..m * n {
                        let base = if accumulate { c0[i] as f64 } else { 0.0 };
                        let scale = (k as f64).sqrt() + base.abs();
                        let err = (c[i] as f64 - base - want[i]).abs();
                        assert!(
                            err < 1e-5 * scale,
                            "{m}x{n}x{k} ({transpose_a}, {transpose_b}, {accumulate}) at {i}: {} vs {}",
                            c[i] as f64 - base,
                            want[i]
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_error_against_f32_is_about_the_rounding_of_the_inputs() {
        if !available() {
            return;
        }
        let (m, n, k) = (64, 64, 256);
        let mut rng = Rng::new(2);
        let a = rng.normal_vec(m * k);
        let b = rng.normal_vec(k * n);
        let mut c = vec![0.0; m * n];
        matmul(
            &mut c,
            (m, n, k),
            false,
            View::rows(&a, k),
            View::rows(&b, n),
            Parallelism::None,
        );
        let exact: Vec<f64> = (0..m * n)
            .map(|ij| {
                (0..k)
                    .map(|p| a[ij / n * k + p] as f64 * b[p * n + ij % n] as f64)
                    .sum()
            })
            .collect();
        let rms = |v: &mut dyn Iterator<Item = f64>| {
            let (s, c) = v.fold((0.0, 0), |(s, c), x| (s + x * x, c + 1));
            (s / c as f64).sqrt()
        };
        let err = rms(&mut c.iter().zip(&exact).map(|(&x, &y)| x as f64 - y));
        let size = rms(&mut exact.iter().copied());
        // Each input carries a relative rounding error of at most 2^-9; products of independent
        // normals then err by about sqrt(2) 2^-9 / sqrt(3) of their size, in RMS.
        let rel = err / size;
        assert!(rel > 1e-4 && rel < 3e-3, "relative RMS error {rel}");
    }
}

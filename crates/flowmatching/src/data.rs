//! Training data: the built-in 2-D sets and in-memory tensors.
//!
//! A [`DataSource`] hands out minibatches drawn with a caller-supplied [`Rng`], so the data order is part
//! of the seeded, resumable stream.

use crate::error::{Error, Result};
use crate::rng::Rng;

/// Something that yields minibatches of flat rows.
pub trait DataSource: Send + Sync {
    /// Dimension of one example (flattened).
    fn dim(&self) -> usize;
    /// `n` examples, row-major (n x dim).
    fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f32>;
    /// A short description for logs and checkpoints.
    fn describe(&self) -> String;

    /// Number of classes when examples carry labels (0: unlabelled).
    fn num_classes(&self) -> usize {
        0
    }

    /// `n` examples and their labels (empty for unlabelled data), drawing exactly what [`sample`] draws.
    ///
    /// [`sample`]: DataSource::sample
    fn sample_labeled(&self, rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<u32>) {
        (self.sample(rng, n), vec![])
    }

    /// (channels, height, width) when the examples are images.
    fn image_shape(&self) -> Option<[usize; 3]> {
        None
    }

    /// `n` fixed (x0, x1) pairs, for data sets that are pairs (reflow); `None` for ordinary data.
    fn sample_pairs(&self, _rng: &mut Rng, _n: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        None
    }
}

/// Fixed pairs (x0, x1), e.g. noise and the ODE solution a trained model carries it to (reflow's
/// training data). Minibatches draw pairs uniformly with replacement and keep them together.
#[derive(Debug, Clone)]
pub struct PairedDataset {
    x0: Vec<f32>,
    x1: Vec<f32>,
    dim: usize,
    name: String,
}

impl PairedDataset {
    pub fn new(x0: Vec<f32>, x1: Vec<f32>, dim: usize, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if dim == 0 || x0.is_empty() || x0.len() != x1.len() || !x0.len().is_multiple_of(dim) {
            return Err(Error::Data(format!(
                "{name}: pairs need two equal, non-empty sets of {dim}-dimensional rows"
            )));
        }
        if x0.iter().chain(&x1).any(|v| !v.is_finite()) {
            return Err(Error::Data(format!("{name}: pairs contain NaN or Inf")));
        }
        Ok(Self { x0, x1, dim, name })
    }

    pub fn len(&self) -> usize {
        self.x0.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.x0.is_empty()
    }
}

impl DataSource for PairedDataset {
    fn dim(&self) -> usize {
        self.dim
    }

    fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        self.sample_pairs(rng, n).map(|p| p.1).unwrap_or_default()
    }

    fn describe(&self) -> String {
        format!("{} ({} pairs x {})", self.name, self.len(), self.dim)
    }

    fn sample_pairs(&self, rng: &mut Rng, n: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let d = self.dim;
        let (mut a, mut b) = (Vec::with_capacity(n * d), Vec::with_capacity(n * d));
        for _ in 0..n {
            let i = rng.below(self.len());
            a.extend_from_slice(&self.x0[i * d..(i + 1) * d]);
            b.extend_from_slice(&self.x1[i * d..(i + 1) * d]);
        }
        Some((a, b))
    }
}

/// The built-in 2-D distributions, sampled afresh for every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toy2d {
    /// flow_matching's checkerboard: 8 unit squares of [-2, 2)^2 where floor(x) + floor(y) is even,
    /// scaled by 1 / 0.45.
    Checkerboard,
    /// Eight Gaussians (std 0.5) on a circle of radius 4, scaled by 1 / 1.414 (FFJORD's set).
    EightGaussians,
    /// Two interleaved half circles with noise 0.1 (scikit-learn's moons), scaled by 2 and shifted.
    Moons,
    /// Two concentric circles (radii 1 and 0.5, noise 0.08), scaled by 3.
    Circles,
    /// Two interleaved spirals (FFJORD's set).
    TwoSpirals,
    /// Five curved arms (FFJORD's pinwheel).
    Pinwheel,
    /// The (x, z) plane of scikit-learn's swiss roll with noise 1, scaled by 1 / 5.
    SwissRoll,
}

impl Toy2d {
    pub const ALL: [Toy2d; 7] = [
        Toy2d::Checkerboard,
        Toy2d::EightGaussians,
        Toy2d::Moons,
        Toy2d::Circles,
        Toy2d::TwoSpirals,
        Toy2d::Pinwheel,
        Toy2d::SwissRoll,
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Toy2d::Checkerboard => "checkerboard",
            Toy2d::EightGaussians => "8gaussians",
            Toy2d::Moons => "moons",
            Toy2d::Circles => "circles",
            Toy2d::TwoSpirals => "2spirals",
            Toy2d::Pinwheel => "pinwheel",
            Toy2d::SwissRoll => "swissroll",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.name() == name)
    }

    /// One point.
    pub fn point(&self, rng: &mut Rng) -> [f64; 2] {
        use std::f64::consts::PI;
        match self {
            Toy2d::Checkerboard => {
                let x = rng.uniform() * 4.0 - 2.0;
                let y = rng.uniform() - 2.0 * rng.below(2) as f64 + x.floor().rem_euclid(2.0);
                [x / 0.45, y / 0.45]
            }
            Toy2d::EightGaussians => {
                let k = rng.below(8) as f64 * PI / 4.0;
                let (cx, cy) = (4.0 * k.cos(), 4.0 * k.sin());
                [
                    (cx + 0.5 * rng.normal()) / 1.414,
                    (cy + 0.5 * rng.normal()) / 1.414,
                ]
            }
            Toy2d::Moons => {
                let th = rng.uniform() * PI;
                let (x, y) = if rng.below(2) == 0 {
                    (th.cos(), th.sin())
                } else {
                    (1.0 - th.cos(), 0.5 - th.sin())
                };
                [
                    2.0 * (x + 0.1 * rng.normal()) - 1.0,
                    2.0 * (y + 0.1 * rng.normal()) - 0.2,
                ]
            }
            Toy2d::Circles => {
                let th = rng.uniform() * 2.0 * PI;
                let r = if rng.below(2) == 0 { 1.0 } else { 0.5 };
                [
                    3.0 * (r * th.cos() + 0.08 * rng.normal()),
                    3.0 * (r * th.sin() + 0.08 * rng.normal()),
                ]
            }
            Toy2d::TwoSpirals => {
                let n = rng.uniform().sqrt() * 540.0 * 2.0 * PI / 360.0;
                let sign = if rng.below(2) == 0 { 1.0 } else { -1.0 };
                let x = sign * (-n.cos() * n + rng.uniform() * 0.5);
                let y = sign * (n.sin() * n + rng.uniform() * 0.5);
                [x / 3.0 + 0.1 * rng.normal(), y / 3.0 + 0.1 * rng.normal()]
            }
            Toy2d::Pinwheel => {
                let (classes, rate) = (5.0, 0.25);
                let arm = rng.below(5) as f64 * 2.0 * PI / classes;
                let (r, tan) = (1.0 + 0.3 * rng.normal(), 0.1 * rng.normal());
                let angle = arm + rate * r.exp();
                let (c, s) = (angle.cos(), angle.sin());
                [2.0 * (r * c - tan * s), 2.0 * (r * s + tan * c)]
            }
            Toy2d::SwissRoll => {
                let t = 1.5 * PI * (1.0 + 2.0 * rng.uniform());
                [
                    (t * t.cos() + rng.normal()) / 5.0,
                    (t * t.sin() + rng.normal()) / 5.0,
                ]
            }
        }
    }
}

impl DataSource for Toy2d {
    fn dim(&self) -> usize {
        2
    }

    fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n)
            .flat_map(|_| self.point(rng).map(|v| v as f32))
            .collect()
    }

    fn describe(&self) -> String {
        self.name().to_string()
    }
}

/// A finite data set held in memory; minibatches are drawn uniformly with replacement.
///
/// Optionally labelled (class ids for conditioning) and shaped as images (C, H, W), with random
/// horizontal flips as augmentation.
#[derive(Debug, Clone)]
pub struct TensorDataset {
    data: Vec<f32>,
    dim: usize,
    name: String,
    labels: Option<(Vec<u32>, usize)>,
    image: Option<[usize; 3]>,
    hflip: bool,
}

impl TensorDataset {
    /// `data` is row-major n x dim. Rejects empty sets and non-finite values, naming the first bad row.
    pub fn new(data: Vec<f32>, dim: usize, name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        if dim == 0 || data.is_empty() {
            return Err(Error::Data(format!("{name}: the data set is empty")));
        }
        if !data.len().is_multiple_of(dim) {
            return Err(Error::Data(format!(
                "{name}: {} values do not form rows of {dim}",
                data.len()
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "{name}: row {} column {} is {} (NaN or Inf are not allowed)",
                i / dim,
                i % dim,
                data[i]
            )));
        }
        Ok(Self {
            data,
            dim,
            name,
            labels: None,
            image: None,
            hflip: false,
        })
    }

    /// Attaches one class id per row, each below `num_classes`.
    pub fn with_labels(mut self, labels: Vec<u32>, num_classes: usize) -> Result<Self> {
        if labels.len() != self.len() {
            return Err(Error::Data(format!(
                "{}: {} labels for {} examples",
                self.name,
                labels.len(),
                self.len()
            )));
        }
        if let Some(i) = labels.iter().position(|&l| l as usize >= num_classes) {
            return Err(Error::Data(format!(
                "{}: label {} of example {i} is not below the number of classes {num_classes}",
                self.name, labels[i]
            )));
        }
        self.labels = Some((labels, num_classes));
        Ok(self)
    }

    /// Declares the rows to be C x H x W images.
    pub fn with_image_shape(mut self, shape: [usize; 3]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.dim {
            return Err(Error::Data(format!(
                "{}: image shape {shape:?} does not hold rows of {} values",
                self.name, self.dim
            )));
        }
        self.image = Some(shape);
        Ok(self)
    }

    /// Flips each drawn image left-right with probability 1/2 (images only).
    pub fn with_hflip(mut self, on: bool) -> Result<Self> {
        if on && self.image.is_none() {
            return Err(Error::Config(format!(
                "{}: horizontal flips need image data",
                self.name
            )));
        }
        self.hflip = on;
        Ok(self)
    }

    pub fn labels(&self) -> Option<&[u32]> {
        self.labels.as_ref().map(|(l, _)| l.as_slice())
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn rows(&self) -> &[f32] {
        &self.data
    }
}

impl DataSource for TensorDataset {
    fn dim(&self) -> usize {
        self.dim
    }

    fn sample(&self, rng: &mut Rng, n: usize) -> Vec<f32> {
        self.sample_labeled(rng, n).0
    }

    fn sample_labeled(&self, rng: &mut Rng, n: usize) -> (Vec<f32>, Vec<u32>) {
        let mut out = Vec::with_capacity(n * self.dim);
        let mut labels = vec![];
        for _ in 0..n {
            let i = rng.below(self.len());
            let row = &self.data[i * self.dim..(i + 1) * self.dim];
            match self.image {
                Some([_, _, w]) if self.hflip && rng.below(2) == 1 => {
                    out.extend(row.chunks(w).flat_map(|line| line.iter().rev()));
                }
                _ => out.extend_from_slice(row),
            }
            if let Some((l, _)) = &self.labels {
                labels.push(l[i]);
            }
        }
        (out, labels)
    }

    fn describe(&self) -> String {
        format!("{} ({} x {})", self.name, self.len(), self.dim)
    }

    fn num_classes(&self) -> usize {
        self.labels.as_ref().map_or(0, |(_, k)| *k)
    }

    fn image_shape(&self) -> Option<[usize; 3]> {
        self.image
    }
}

/// Sequences of frames with one phone per frame (speech: log-mel frames and their aligned phones), of
/// unequal lengths, held in memory.
#[derive(Debug, Clone)]
pub struct SequenceDataset {
    name: String,
    frame_dim: usize,
    num_phones: usize,
    frames: Vec<Vec<f32>>,
    phones: Vec<Vec<u32>>,
}

impl SequenceDataset {
    /// `frames[i]` holds sequence i's T_i frames of `frame_dim` values, row-major; `phones[i]` its
    /// T_i phone ids, each below `num_phones`. Every value must be finite and no sequence empty.
    pub fn new(
        name: impl Into<String>,
        frame_dim: usize,
        num_phones: usize,
        frames: Vec<Vec<f32>>,
        phones: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let name = name.into();
        if frame_dim == 0 || frames.is_empty() || frames.len() != phones.len() {
            return Err(Error::Data(format!(
                "{name}: a sequence data set needs at least one sequence, a phone list per sequence \
                 and frames of at least one value ({} sequences, {} phone lists, {frame_dim} values \
                 a frame)",
                frames.len(),
                phones.len()
            )));
        }
        for (i, (f, p)) in frames.iter().zip(&phones).enumerate() {
            if p.is_empty() || f.len() != p.len() * frame_dim {
                return Err(Error::Data(format!(
                    "{name}: sequence {i} has {} values for {} phones of {frame_dim}-value frames",
                    f.len(),
                    p.len()
                )));
            }
            if let Some(&bad) = p.iter().find(|&&id| id as usize >= num_phones) {
                return Err(Error::Data(format!(
                    "{name}: sequence {i} has phone id {bad}, outside the {num_phones} phones"
                )));
            }
            if f.iter().any(|v| !v.is_finite()) {
                return Err(Error::Data(format!(
                    "{name}: sequence {i} holds a value that is not finite"
                )));
            }
        }
        Ok(Self {
            name,
            frame_dim,
            num_phones,
            frames,
            phones,
        })
    }

    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    pub fn frame_dim(&self) -> usize {
        self.frame_dim
    }

    pub fn num_phones(&self) -> usize {
        self.num_phones
    }

    /// Sequence i: its frames (row-major) and phones.
    pub fn sequence(&self, i: usize) -> (&[f32], &[u32]) {
        (&self.frames[i], &self.phones[i])
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({} sequences of {}-value frames, {} phones)",
            self.name,
            self.len(),
            self.frame_dim,
            self.num_phones
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::metrics::checkerboard_support;

    #[test]
    fn checkerboard_fills_its_eight_squares_evenly() {
        let pts = Toy2d::Checkerboard.sample(&mut Rng::new(0), 40_000);
        let s = checkerboard_support(&pts);
        assert_eq!(s.in_support_fraction, 1.0);
        assert!(s.max_square_deviation < 0.01, "{s:?}");
    }

    #[test]
    fn every_set_is_finite_and_reproducible() {
        for d in Toy2d::ALL {
            let a = d.sample(&mut Rng::new(5), 1000);
            assert!(
                a.iter().all(|v| v.is_finite() && v.abs() < 20.0),
                "{}",
                d.name()
            );
            assert_eq!(a, d.sample(&mut Rng::new(5), 1000));
            assert_eq!(Toy2d::from_name(d.name()), Some(d));
        }
    }

    #[test]
    fn tensor_dataset_rejects_bad_data() {
        assert!(TensorDataset::new(vec![], 2, "x").is_err());
        assert!(TensorDataset::new(vec![1.0, 2.0, 3.0], 2, "x").is_err());
        let e = TensorDataset::new(vec![1.0, 2.0, f32::NAN, 0.0], 2, "x").unwrap_err();
        assert!(e.to_string().contains("row 1 column 0"), "{e}");
        let d = TensorDataset::new(vec![1.0, 2.0, 3.0, 4.0], 2, "x").unwrap();
        let b = d.sample(&mut Rng::new(0), 5);
        assert!(b.chunks(2).all(|r| r == [1.0, 2.0] || r == [3.0, 4.0]));
        assert!(d.clone().with_labels(vec![0], 2).is_err());
        assert!(d.clone().with_labels(vec![0, 2], 2).is_err());
        assert!(d.clone().with_image_shape([1, 3, 1]).is_err());
        assert!(d.with_hflip(true).is_err());
    }

    /// Labels travel with their rows; flips mirror each image row and leave labels alone.
    #[test]
    fn labelled_images_flip_left_right() {
        // Two 1x2x3 images, labelled 0 and 1.
        let data: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let d = TensorDataset::new(data.clone(), 6, "img")
            .unwrap()
            .with_labels(vec![0, 1], 2)
            .unwrap()
            .with_image_shape([1, 2, 3])
            .unwrap()
            .with_hflip(true)
            .unwrap();
        assert_eq!(d.num_classes(), 2);
        let (x, y) = d.sample_labeled(&mut Rng::new(1), 200);
        let (mut flipped, mut plain) = (0, 0);
        for (row, &l) in x.chunks(6).zip(&y) {
            let orig = &data[l as usize * 6..l as usize * 6 + 6];
            let mirror: Vec<f32> = orig
                .chunks(3)
                .flat_map(|r| r.iter().rev().copied())
                .collect();
            if row == orig {
                plain += 1;
            } else {
                assert_eq!(row, &mirror[..]);
                flipped += 1;
            }
        }
        assert!(flipped > 60 && plain > 60, "{flipped} {plain}");
    }
}

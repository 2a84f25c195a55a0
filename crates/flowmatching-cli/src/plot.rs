//! PNG pictures: 2-D histograms of point sets, side by side; line plots; spectrograms.

use anyhow::Result;

/// The square window [lo, hi]^2 that holds the central 99.8% of `points` in both coordinates, with margin.
pub fn window(points: &[f32]) -> (f32, f32) {
    let mut v: Vec<f32> = points.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (-1.0, 1.0);
    }
    v.sort_by(f32::total_cmp);
    let lo = v[v.len() / 1000];
    let hi = v[v.len() - 1 - v.len() / 1000];
    let pad = 0.05 * (hi - lo).max(1e-3);
    (lo - pad, hi + pad)
}

/// A viridis-like colour for v in [0, 1].
fn colour(v: f32) -> [u8; 3] {
    const STOPS: [[f32; 3]; 5] = [
        [68., 1., 84.],
        [59., 82., 139.],
        [33., 145., 140.],
        [94., 201., 98.],
        [253., 231., 37.],
    ];
    let x = v.clamp(0.0, 1.0) * 4.0;
    let i = (x.floor() as usize).min(3);
    let f = x - i as f32;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f) as u8;
    }
    out
}

/// Pixels per histogram bin.
const CELL: u32 = 4;

/// One PNG with a 2-D histogram (`bins` x `bins`) per point set (first two coordinates), panels left
/// to right, all on the same window. Brightness is sqrt(count / max count).
pub fn histograms(sets: &[&[f32]], dim: usize, window: (f32, f32), bins: u32) -> Result<Vec<u8>> {
    let size = bins * CELL;
    let gap = 8;
    let width = sets.len() as u32 * size + (sets.len() as u32 - 1) * gap;
    let mut img = image::RgbImage::from_pixel(width, size, image::Rgb([255, 255, 255]));
    let (lo, hi) = window;
    for (k, pts) in sets.iter().enumerate() {
        let mut counts = vec![0u32; (bins * bins) as usize];
        for p in pts.chunks_exact(dim) {
            let (x, y) = (p[0], if dim > 1 { p[1] } else { 0.0 });
            let fx = (x - lo) / (hi - lo);
            let fy = (y - lo) / (hi - lo);
            if (0.0..1.0).contains(&fx) && (0.0..1.0).contains(&fy) {
                let (i, j) = ((fx * bins as f32) as u32, ((1.0 - fy) * bins as f32) as u32);
                counts[(j.min(bins - 1) * bins + i.min(bins - 1)) as usize] += 1;
            }
        }
        let max = counts.iter().copied().max().unwrap_or(1).max(1) as f32;
        let x0 = k as u32 * (size + gap);
        for j in 0..size {
            for i in 0..size {
                let c = counts[((j / CELL) * bins + i / CELL) as usize] as f32;
                img.put_pixel(x0 + i, j, image::Rgb(colour((c / max).sqrt())));
            }
        }
    }
    png(&img)
}

/// Draws the paths of up to `max_paths` samples (first two coordinates) through `frames` (each frame a
/// flat N x dim state), coloured from noise (dark) to data (yellow), on a white 600 x 600 canvas.
pub fn trajectories(frames: &[Vec<f32>], dim: usize, max_paths: usize) -> Result<Vec<u8>> {
    let size = 600u32;
    let mut img = image::RgbImage::from_pixel(size, size, image::Rgb([255, 255, 255]));
    let all: Vec<f32> = frames.iter().flatten().copied().collect();
    let (lo, hi) = window(&all);
    let to_px = |v: f32| ((v - lo) / (hi - lo) * (size - 1) as f32).round() as i64;
    let n = frames.first().map_or(0, |f| f.len() / dim);
    for i in 0..n.min(max_paths) {
        for (k, pair) in frames.windows(2).enumerate() {
            let c = colour(k as f32 / frames.len().max(2) as f32);
            let (a, b) = (&pair[0][i * dim..], &pair[1][i * dim..]);
            let y = |p: &[f32]| if dim > 1 { p[1] } else { 0.0 };
            line(
                &mut img,
                (to_px(a[0]), size as i64 - 1 - to_px(y(a))),
                (to_px(b[0]), size as i64 - 1 - to_px(y(b))),
                c,
            );
        }
    }
    png(&img)
}

/// Bresenham's line, clipped to the image.
fn line(img: &mut image::RgbImage, (mut x0, mut y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        if x0 >= 0 && y0 >= 0 && (x0 as u32) < img.width() && (y0 as u32) < img.height() {
            img.put_pixel(x0 as u32, y0 as u32, image::Rgb(c));
        }
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// The embedded font for plot labels (DejaVu Sans Mono, Bitstream Vera licence: assets/DejaVu-LICENSE.txt).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded and known to parse; a failure would only lose the labels.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

/// A tick label: three significant digits, scientific notation outside [0.01, 100000).
fn number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(0.01..100_000.0).contains(&a) {
        format!("{v:.1e}")
    } else {
        let digits = (2 - a.log10().floor() as i32).max(0) as usize;
        format!("{v:.digits$}")
    }
}

/// One named series of (x, y) points.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Distinct colours for up to eight series.
const PALETTE: [(u8, u8, u8); 8] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
];

/// A line plot with axes, labels and a legend, as PNG. `log_x`/`log_y` use log10 axes.
pub fn line_plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_x: bool,
    log_y: bool,
) -> Result<Vec<u8>> {
    use plotters::prelude::*;
    register_font();
    let (w, h) = (800u32, 500u32);
    let mut buf = vec![255u8; (w * h * 3) as usize];
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| {
            x.is_finite() && y.is_finite() && (!log_x || *x > 0.0) && (!log_y || *y > 0.0)
        })
        .collect();
    let tx = |x: f64| if log_x { x.log10() } else { x };
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let (mut x0, mut x1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(tx(p.0)), a.1.max(tx(p.0)))
    });
    let (mut y0, mut y1) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(ty(p.1)), a.1.max(ty(p.1)))
    });
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0).max(1e-6);
    (y0, y1) = (y0 - pad, y1 + pad);
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        let draw = || -> std::result::Result<(), Box<dyn std::error::Error + '_>> {
            let mut chart = ChartBuilder::on(&root)
                .caption(title, ("sans-serif", 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(70)
                .build_cartesian_2d(x0..x1, y0..y1)?;
            let fmt_x = move |v: &f64| number(if log_x { 10f64.powf(*v) } else { *v });
            let fmt_y = move |v: &f64| number(if log_y { 10f64.powf(*v) } else { *v });
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .x_label_formatter(&fmt_x)
                .y_label_formatter(&fmt_y)
                .label_style(("sans-serif", 13))
                .draw()?;
            for (i, s) in series.iter().enumerate() {
                let (r, g, b) = PALETTE[i % PALETTE.len()];
                let colour = RGBColor(r, g, b);
                let data: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .filter(|(x, y)| {
                        x.is_finite()
                            && y.is_finite()
                            && (!log_x || *x > 0.0)
                            && (!log_y || *y > 0.0)
                    })
                    .map(|&(x, y)| (tx(x), ty(y)))
                    .collect();
                chart
                    .draw_series(LineSeries::new(data.clone(), colour.stroke_width(2)))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
                chart.draw_series(data.into_iter().map(|p| Circle::new(p, 3, colour.filled())))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(BLACK)
                .label_font(("sans-serif", 14))
                .draw()?;
            root.present()?;
            Ok(())
        };
        draw().map_err(|e| anyhow::anyhow!("drawing '{title}': {e}"))?;
    }
    let img = image::RgbImage::from_raw(w, h, buf).expect("buffer of the right size");
    png(&img)
}

/// Log-mel spectrograms (`frames x bands`, frame-major) stacked top to bottom on one colour scale
/// (the 1st to 99th percentile of all values), low bands at the bottom, 3 pixels a band and 2 a frame;
/// white lines mark frames `span.0` and `span.1`.
pub fn spectrograms(
    panels: &[&[f32]],
    bands: usize,
    span: Option<(usize, usize)>,
) -> Result<Vec<u8>> {
    let frames = panels.first().map_or(0, |p| p.len() / bands.max(1));
    if frames == 0 || panels.iter().any(|p| p.len() != frames * bands) {
        anyhow::bail!("spectrogram panels must be non-empty and of one size");
    }
    let mut all: Vec<f32> = panels.iter().flat_map(|p| p.iter().copied()).collect();
    all.sort_by(f32::total_cmp);
    let (lo, hi) = (all[all.len() / 100], all[all.len() - 1 - all.len() / 100]);
    let (fx, by, gap) = (2u32, 3u32, 6u32);
    let (w, ph) = (frames as u32 * fx, bands as u32 * by);
    let h = panels.len() as u32 * ph + (panels.len() as u32 - 1) * gap;
    let mut img = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (k, p) in panels.iter().enumerate() {
        let top = k as u32 * (ph + gap);
        for f in 0..frames {
            for b in 0..bands {
                let v = (p[f * bands + b] - lo) / (hi - lo).max(1e-6);
                let c = image::Rgb(colour(v));
                for dx in 0..fx {
                    for dy in 0..by {
                        let y = top + ph - 1 - (b as u32 * by + dy);
                        img.put_pixel(f as u32 * fx + dx, y, c);
                    }
                }
            }
        }
        if let Some((a, b)) = span {
            for f in [a, b] {
                let x = (f as u32 * fx).min(w - 1);
                for y in top..top + ph {
                    img.put_pixel(x, y, image::Rgb([255, 255, 255]));
                }
            }
        }
    }
    png(&img)
}

/// `img` encoded as PNG.
pub fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut bytes = std::io::Cursor::new(vec![]);
    img.write_to(&mut bytes, image::ImageFormat::Png)?;
    Ok(bytes.into_inner())
}

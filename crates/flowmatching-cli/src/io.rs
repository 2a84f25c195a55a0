//! File formats: .npy and CSV point sets, atomic writes, and resolving `--data`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::write_atomic;
use flowmatching::data::{DataSource, TensorDataset, Toy2d};

use crate::images;
use flowmatching::rng::Rng;

/// Reads an N x D array of f32 or f64 from a .npy file (C or Fortran order).
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, usize)> {
    let (data, shape) = read_npy_array(path)?;
    if shape.len() != 2 {
        bail!(
            "{}: expected a 2-D array (N x D), got shape {shape:?}",
            path.display()
        );
    }
    Ok((data, shape[1]))
}

/// Reads a float32 / float64 array of any rank (or a uint8 array, scaled to [-1, 1] as image pixels),
/// in C order, with its shape.
pub fn read_npy_array(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_npy(&bytes, &path.display().to_string())
}

/// [`read_npy_array`] on bytes in memory (`name` appears in errors).
pub fn parse_npy(bytes: &[u8], name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
    let npy = npyz::NpyFile::new(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid .npy file ({e})", name))?;
    let shape: Vec<usize> = npy.shape().iter().map(|&s| s as usize).collect();
    let fortran = npy.order() == npyz::Order::Fortran;
    let npyz::DType::Plain(ts) = npy.dtype() else {
        bail!(
            "{}: structured arrays are not supported; save a plain float array",
            name
        );
    };
    let bad_dtype = || {
        anyhow::anyhow!(
            "{}: dtype {ts} is not supported; use float32, float64 (or uint8 for images)",
            name
        )
    };
    // The header's promise must fit in the file before anything is allocated for it.
    let promised = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(ts.num_bytes().unwrap_or(1).max(1)));
    if promised.is_none_or(|b| b > bytes.len()) {
        bail!(
            "{}: header says shape {shape:?} of {ts}, more than the file's {} bytes hold",
            name,
            bytes.len()
        );
    }
    let data: Vec<f32> = match (ts.type_char(), ts.num_bytes()) {
        (npyz::TypeChar::Float, Some(4)) => npy.into_vec::<f32>(),
        (npyz::TypeChar::Float, Some(8)) => npy
            .into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        (npyz::TypeChar::Uint, Some(1)) => npy
            .into_vec::<u8>()
            .map(|v| v.into_iter().map(crate::images::to_unit).collect()),
        _ => return Err(bad_dtype()),
    }
    .map_err(|e| anyhow::anyhow!("{}: truncated or unreadable data ({e})", name))?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| anyhow::anyhow!("{}: shape {shape:?} overflows", name))?;
    if data.len() != count {
        bail!(
            "{}: header says shape {shape:?} but the file holds {} values",
            name,
            data.len()
        );
    }
    if !fortran || shape.len() < 2 {
        return Ok((data, shape));
    }
    // Fortran order: the first index varies fastest. Reorder to C order.
    let mut c = vec![0f32; count];
    let mut idx = vec![0usize; shape.len()];
    for v in data {
        let mut off = 0;
        for (i, &d) in idx.iter().zip(&shape) {
            off = off * d + i;
        }
        c[off] = v;
        for (i, &d) in idx.iter_mut().zip(&shape) {
            *i += 1;
            if *i < d {
                break;
            }
            *i = 0;
        }
    }
    Ok((c, shape))
}

/// Writes an f32 (or f64) array of the given shape as .npy, atomically (creating the parent folder).
pub fn write_npy<T: npyz::AutoSerialize + Copy>(
    path: &Path,
    data: &[T],
    shape: &[usize],
) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent)?;
    }
    use npyz::WriterBuilder;
    let shape: Vec<u64> = shape.iter().map(|&s| s as u64).collect();
    let mut buf = vec![];
    {
        let mut w = npyz::WriteOptions::new()
            .default_dtype()
            .shape(&shape)
            .writer(&mut buf)
            .begin_nd()?;
        w.extend(data.iter().copied())?;
        w.finish()?;
    }
    write_atomic(path, &buf)?;
    Ok(())
}

/// Reads a CSV of numbers (comma, semicolon, tab or space separated); a first line that is not numeric is
/// taken as a header.
pub fn read_csv(path: &Path) -> Result<(Vec<f32>, usize)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_csv(&text, &path.display().to_string())
}

/// [`read_csv`] on text in memory (`name` appears in errors).
pub fn parse_csv(text: &str, name: &str) -> Result<(Vec<f32>, usize)> {
    let path = std::path::Path::new(name);
    let mut data = vec![];
    let mut dim = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line
            .split([',', ';', '\t', ' '])
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        let parsed: Result<Vec<f32>, _> = fields.iter().map(|f| f.parse::<f32>()).collect();
        let row = match parsed {
            Ok(r) => r,
            Err(_) if dim.is_none() && data.is_empty() => continue, // header
            Err(_) => bail!(
                "{}: line {} is not a row of numbers: '{line}'",
                path.display(),
                i + 1
            ),
        };
        match dim {
            None => dim = Some(row.len()),
            Some(d) if d != row.len() => {
                bail!(
                    "{}: line {} has {} columns, earlier lines have {d}",
                    path.display(),
                    i + 1,
                    row.len()
                )
            }
            _ => {}
        }
        data.extend(row);
    }
    let Some(dim) = dim else {
        bail!("{}: no data rows", path.display())
    };
    Ok((data, dim))
}

/// How to open image data.
#[derive(Debug, Clone, Default)]
pub struct DataOptions {
    /// Where Fashion-MNIST's IDX files are (default: Debian's package folder).
    pub data_dir: Option<std::path::PathBuf>,
    /// Random horizontal flips (images only).
    pub hflip: bool,
    /// Resize a folder of images to this square size.
    pub image_size: Option<usize>,
}

/// `--data`: a built-in 2-D set by name, or a .npy / .csv file.
pub fn open_data(spec: &str) -> Result<Box<dyn DataSource>> {
    open_data_with(spec, &DataOptions::default())
}

/// `--data` with image options: also `fashion-mnist` (its training half), `fashion-mnist:test`, a folder
/// of images (sub-folders are classes), or a .npy of images (N x H x W or N x C x H x W).
pub fn open_data_with(spec: &str, o: &DataOptions) -> Result<Box<dyn DataSource>> {
    if let Some(toy) = Toy2d::from_name(spec) {
        if o.hflip {
            bail!("--hflip needs image data; '{spec}' is a 2-D point set");
        }
        return Ok(Box::new(toy));
    }
    let image = |ds: TensorDataset| -> Result<Box<dyn DataSource>> {
        Ok(Box::new(ds.with_hflip(o.hflip)?))
    };
    if is_image_spec(spec) {
        return image(open_image_set(spec, o)?);
    }
    let path = Path::new(spec);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let ds = match ext.as_deref() {
        Some("npy") => npy_set(path, spec)?,
        Some("csv") | Some("txt") | Some("tsv") => {
            let (data, dim) = read_csv(path)?;
            TensorDataset::new(data, dim, spec)?
        }
        _ => {
            let names: Vec<&str> = Toy2d::ALL.iter().map(|d| d.name()).collect();
            bail!(
                "--data '{spec}' is neither a built-in data set ({}, fashion-mnist) nor a .npy or .csv \
                 file or a folder of images",
                names.join(", ")
            )
        }
    };
    if o.hflip {
        image(ds)
    } else {
        Ok(Box::new(ds))
    }
}

/// Whether `spec` names image data by itself (Fashion-MNIST or a folder).
fn is_image_spec(spec: &str) -> bool {
    spec.starts_with("fashion-mnist") || Path::new(spec).is_dir()
}

/// Image data as an in-memory set: `fashion-mnist[:train|:test]`, a folder of images, or a .npy of
/// N x [C x] H x W images.
pub fn open_image_set(spec: &str, o: &DataOptions) -> Result<TensorDataset> {
    match spec {
        "fashion-mnist" | "fashion-mnist:train" => {
            return images::fashion_mnist(o.data_dir.as_deref(), images::Split::Train)
        }
        "fashion-mnist:test" => {
            return images::fashion_mnist(o.data_dir.as_deref(), images::Split::Test)
        }
        s if s.starts_with("fashion-mnist") => {
            bail!("unknown Fashion-MNIST split '{s}': use fashion-mnist, fashion-mnist:train or fashion-mnist:test")
        }
        _ => {}
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(images::image_folder(path, o.image_size)?.0);
    }
    let ds = npy_set(path, spec)?;
    if ds.image_shape().is_none() {
        bail!(
            "{spec}: expected images (N x H x W or N x C x H x W), got points of {} values",
            ds.dim()
        );
    }
    Ok(ds)
}

/// A .npy file as points (N x D) or images (N x H x W, N x C x H x W).
fn npy_set(path: &Path, spec: &str) -> Result<TensorDataset> {
    let (data, shape) = read_npy_array(path)?;
    Ok(match shape[..] {
        [_, d] => TensorDataset::new(data, d, spec)?,
        [_, h, w] => TensorDataset::new(data, h * w, spec)?.with_image_shape([1, h, w])?,
        [_, c, h, w] => TensorDataset::new(data, c * h * w, spec)?.with_image_shape([c, h, w])?,
        _ => bail!("{spec}: expected N x D points or N x [C x] H x W images, got shape {shape:?}"),
    })
}

/// The rows of a data file (`None` for a built-in set).
pub fn file_rows(spec: &str) -> Result<Option<Vec<f32>>> {
    if Toy2d::from_name(spec).is_some() {
        return Ok(None);
    }
    let path = Path::new(spec);
    Ok(Some(
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("npy") => read_npy(path)?.0,
            _ => read_csv(path)?.0,
        },
    ))
}

/// Creates the output folder, failing clearly when it cannot be written.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))
}

/// Writes JSON atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    write_atomic(path, &bytes)?;
    Ok(())
}

/// Up to `n` images from an image set, uniformly dequantized: each pixel byte b becomes
/// (b + u) / 128 - 1 with u ~ U[0, 1), so the data have a density and bits/dim use the scale 2/256.
pub fn dequantized_images(
    spec: &str,
    opts: &DataOptions,
    n: Option<usize>,
    seed: u64,
) -> Result<(Vec<f32>, usize)> {
    let ds = open_image_set(spec, opts)?;
    let dim = ds.dim();
    let take = n.unwrap_or(ds.len()).min(ds.len());
    let mut rng = Rng::new(seed).fork(201);
    let rows = ds.rows()[..take * dim]
        .iter()
        .map(|&v| ((images::to_byte(v) as f64 + rng.uniform()) / 128.0 - 1.0) as f32)
        .collect();
    Ok((rows, dim))
}

/// Up to `n` points from `spec`: the first rows of a file, or fresh draws from a built-in set.
pub fn points(spec: &str, n: Option<usize>, seed: u64) -> Result<(Vec<f32>, usize)> {
    let data = open_data(spec)?;
    let dim = data.dim();
    let rows = match (n, file_rows(spec)?) {
        (_, Some(all)) => {
            let take = n.unwrap_or(all.len() / dim).min(all.len() / dim);
            all[..take * dim].to_vec()
        }
        (n, None) => data.sample(&mut Rng::new(seed).fork(200), n.unwrap_or(10_000)),
    };
    if rows.is_empty() {
        bail!("no points to evaluate");
    }
    Ok((rows, dim))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("fm-io-{}-{name}", std::process::id()))
    }

    #[test]
    fn npy_round_trip() {
        let p = tmp("a.npy");
        write_npy(&p, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        assert_eq!(
            read_npy(&p).unwrap(),
            (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3)
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn csv_with_header() {
        let p = tmp("a.csv");
        std::fs::write(&p, "x,y\n1,2\n3, 4\n").unwrap();
        assert_eq!(read_csv(&p).unwrap(), (vec![1.0, 2.0, 3.0, 4.0], 2));
        std::fs::write(&p, "x,y\n1,2\n3\n").unwrap();
        assert!(read_csv(&p).unwrap_err().to_string().contains("line 3"));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn unknown_data_is_explained() {
        let e = open_data("nonsense").err().unwrap().to_string();
        assert!(e.contains("checkerboard"), "{e}");
    }
}

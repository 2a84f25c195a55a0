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

/// An f32 (or f64) array of the given shape as the bytes of a .npy file.
pub fn npy_bytes<T: npyz::AutoSerialize + Copy>(data: &[T], shape: &[usize]) -> Result<Vec<u8>> {
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
    Ok(buf)
}

/// Reads a CSV of numbers (comma, semicolon, tab or space separated, numbers optionally quoted, a UTF-8
/// byte-order mark ignored); the first line may be one header line of names. Says on stderr how many
/// rows and columns it read.
pub fn read_csv(path: &Path) -> Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text ({e})", path.display()))?;
    let (data, dim) = parse_csv(&text, &path.display().to_string())?;
    eprintln!(
        "{}: {} rows of {dim} columns",
        path.display(),
        data.len() / dim
    );
    Ok((data, dim))
}

/// [`read_csv`] on text in memory (`name` appears in errors). Blank lines and lines starting with `#`
/// are skipped.
pub fn parse_csv(text: &str, name: &str) -> Result<(Vec<f32>, usize)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut data = vec![];
    let mut dim = None;
    let mut header_allowed = true;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line
            .split([',', ';', '\t', ' '])
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(unquote)
            .collect();
        let parsed: Result<Vec<f32>, _> = fields.iter().map(|f| f.parse::<f32>()).collect();
        let first = std::mem::replace(&mut header_allowed, false);
        let row = match parsed {
            Ok(r) => r,
            Err(_) if first => continue, // the header
            Err(_) => bail!(
                "{name}: line {} is not a row of numbers: '{line}' (only the first line may be a \
                 header)",
                i + 1
            ),
        };
        match dim {
            None => dim = Some(row.len()),
            Some(d) if d != row.len() => {
                bail!(
                    "{name}: line {} has {} columns, earlier lines have {d}",
                    i + 1,
                    row.len()
                )
            }
            _ => {}
        }
        data.extend(row);
    }
    let Some(dim) = dim else {
        bail!("{name}: no data rows")
    };
    Ok((data, dim))
}

/// A field without one pair of surrounding double or single quotes.
fn unquote(f: &str) -> &str {
    for q in ['"', '\''] {
        if let Some(inner) = f.strip_prefix(q).and_then(|g| g.strip_suffix(q)) {
            return inner.trim();
        }
    }
    f
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
    let ds = file_set(spec)?;
    if o.hflip {
        image(ds)
    } else {
        Ok(Box::new(ds))
    }
}

/// A .npy or .csv file as a data set.
fn file_set(spec: &str) -> Result<TensorDataset> {
    let path = Path::new(spec);
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    Ok(match ext.as_deref() {
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
    })
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

/// The folders of `dir` and above it that do not exist yet, deepest first (what creating it makes).
pub fn missing_folders(dir: &Path) -> Vec<std::path::PathBuf> {
    dir.ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_path_buf)
        .collect()
}

/// Creates the output folder, failing clearly when it cannot be written.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output folder {}", dir.display()))
}

/// `value` as pretty-printed JSON with a final newline.
pub fn json_bytes<T: serde::Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(value)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Writes JSON atomically (for files that are not a command's declared [`crate::outputs::Outputs`]:
/// the progressive results of a report folder).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    write_atomic(path, &json_bytes(value)?)?;
    Ok(())
}

/// A JSON file read into `T`; the error names the file.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{} is not valid here", path.display()))
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
    let (rows, dim) = match Toy2d::from_name(spec) {
        Some(toy) => (
            toy.sample(&mut Rng::new(seed).fork(200), n.unwrap_or(10_000)),
            toy.dim(),
        ),
        None => {
            let ds = file_set(spec)?;
            let (all, dim) = (ds.rows(), ds.dim());
            let take = n.unwrap_or(all.len() / dim).min(all.len() / dim);
            (all[..take * dim].to_vec(), dim)
        }
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
        let bytes = npy_bytes(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        let (data, shape) = parse_npy(&bytes, "a.npy").unwrap();
        assert_eq!(
            (data, shape),
            (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3])
        );
    }

    #[test]
    fn csv_dialects() {
        let rows = |t: &str| parse_csv(t, "t.csv");
        let want = (vec![1.0, 2.0, 3.0, 4.0], 2);
        assert_eq!(rows("\u{feff}1,2\n3,4\n").unwrap(), want, "BOM");
        assert_eq!(
            rows("\u{feff}x,y\n1,2\n3,4\n").unwrap(),
            want,
            "BOM and header"
        );
        assert_eq!(rows("\"1\",\"2\"\n'3';'4'\n").unwrap(), want, "quoted");
        assert_eq!(rows("\"x\",\"y\"\n\"1\",\"2\"\n3\t4\r\n").unwrap(), want);
        assert_eq!(rows("# comment\n\nx y\n1 2\n3 4\n").unwrap(), want);
        let e = rows("title\nx,y\n1,2\n").unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("header"), "{e}");
        let e = rows("1,2\nx,y\n").unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        assert!(rows("x,y\n")
            .unwrap_err()
            .to_string()
            .contains("no data rows"));
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

//! File formats: .npy and CSV point sets, atomic writes, and resolving `--data`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::write_atomic;
use flowmatching::data::{DataSource, TensorDataset, Toy2d};

/// Reads an N x D array of f32 or f64 from a .npy file (C or Fortran order).
pub fn read_npy(path: &Path) -> Result<(Vec<f32>, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..])
        .map_err(|e| anyhow::anyhow!("{}: not a valid .npy file ({e})", path.display()))?;
    let shape = npy.shape().to_vec();
    if shape.len() != 2 {
        bail!(
            "{}: expected a 2-D array (N x D), got shape {shape:?}",
            path.display()
        );
    }
    let (n, d) = (shape[0] as usize, shape[1] as usize);
    let fortran = npy.order() == npyz::Order::Fortran;
    let npyz::DType::Plain(ts) = npy.dtype() else {
        bail!(
            "{}: structured arrays are not supported; save a plain float array",
            path.display()
        );
    };
    let bad_dtype = || {
        anyhow::anyhow!(
            "{}: dtype {ts} is not supported; use float32 or float64",
            path.display()
        )
    };
    if ts.type_char() != npyz::TypeChar::Float {
        return Err(bad_dtype());
    }
    let data: Vec<f32> = match ts.num_bytes() {
        Some(4) => npy.into_vec::<f32>(),
        Some(8) => npy
            .into_vec::<f64>()
            .map(|v| v.into_iter().map(|x| x as f32).collect()),
        _ => return Err(bad_dtype()),
    }
    .map_err(|e| anyhow::anyhow!("{}: truncated or unreadable data ({e})", path.display()))?;
    if data.len() != n * d {
        bail!(
            "{}: header says {n} x {d} but the file holds {} values",
            path.display(),
            data.len()
        );
    }
    if !fortran {
        return Ok((data, d));
    }
    let mut c = vec![0f32; n * d];
    for i in 0..n {
        for j in 0..d {
            c[i * d + j] = data[j * n + i];
        }
    }
    Ok((c, d))
}

/// Writes an f32 array of the given shape as .npy, atomically.
pub fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
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

/// `--data`: a built-in 2-D set by name, or a .npy / .csv file.
pub fn open_data(spec: &str) -> Result<Box<dyn DataSource>> {
    if let Some(toy) = Toy2d::from_name(spec) {
        return Ok(Box::new(toy));
    }
    let path = Path::new(spec);
    let (data, dim) = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("npy") => read_npy(path)?,
        Some("csv") | Some("txt") | Some("tsv") => read_csv(path)?,
        _ => {
            let names: Vec<&str> = Toy2d::ALL.iter().map(|d| d.name()).collect();
            bail!(
                "--data '{spec}' is neither a built-in data set ({}) nor a .npy or .csv file",
                names.join(", ")
            )
        }
    };
    Ok(Box::new(TensorDataset::new(data, dim, spec)?))
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

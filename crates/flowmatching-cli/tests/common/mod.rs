//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_flowmatching"))
}

pub fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("fm-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A bad invocation: non-zero exit, a one-line `error:` naming the problem, no panic.
pub fn assert_clean_failure(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert!(err.contains(needle), "expected '{needle}' in: {err}");
}

/// A hand-made .npy (version 1.0, C order) with any descriptor, shape and payload, independent of our
/// writer.
pub fn write_npy_raw(path: &Path, descr: &str, shape: &str, payload: &[u8]) {
    let mut h =
        format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}").into_bytes();
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((h.len() as u16).to_le_bytes());
    bytes.extend(h);
    bytes.extend(payload);
    std::fs::write(path, bytes).unwrap();
}

/// N x 2 little-endian float64 points as .npy.
pub fn write_npy_f64(path: &Path, rows: &[[f64; 2]]) {
    let payload: Vec<u8> = rows
        .iter()
        .flatten()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    write_npy_raw(path, "<f8", &format!("({}, 2)", rows.len()), &payload);
}

pub fn read_npy_len(path: &Path) -> usize {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    (bytes.len() - 10 - hlen) / 4
}

/// The values of a little-endian float32 (`<f4`) or float64 (`<f8`) .npy file, as f64.
pub fn read_npy_values(path: &Path) -> Vec<f64> {
    let bytes = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = String::from_utf8_lossy(&bytes[10..10 + hlen]);
    let payload = &bytes[10 + hlen..];
    if header.contains("'<f8'") {
        payload
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    } else {
        assert!(header.contains("'<f4'"), "unexpected dtype in {header}");
        payload
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect()
    }
}

/// A tiny Fashion-MNIST look-alike in the IDX layout: 8x8 images of two classes (a bright left or right
/// half), gzip-free (the loader takes both).
pub fn fake_fashion(dir: &Path, split: &str, n: usize) {
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, 8, 8] {
        images.extend(d.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((n as u32).to_be_bytes());
    for i in 0..n {
        let class = (i % 2) as u8;
        for _y in 0..8 {
            for x in 0..8 {
                let on = (x < 4) == (class == 0);
                images.push(if on {
                    200 + (i % 50) as u8
                } else {
                    (i % 30) as u8
                });
            }
        }
        labels.push(class);
    }
    std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), images).unwrap();
    std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), labels).unwrap();
}

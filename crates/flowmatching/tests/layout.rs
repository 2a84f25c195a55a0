//! The library's layout, checked: its top-level modules import only modules below them in the layer
//! order of lib.rs (so there is no import cycle), the CPU kernels stay private, and no function is
//! longer than a screenful or two.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The top-level modules from the bottom up: each may import only modules before it.
const LAYERS: &[&str] = &[
    "error",
    "rng",
    "device",
    "precision",
    "tensor",
    "field",
    "cpu",
    "params",
    "optim",
    "path",
    "timesteps",
    "nn",
    "solver",
    "guidance",
    "empirical",
    "objective",
    "infill",
    "assignment",
    "coupling",
    "data",
    "likelihood",
    "train",
    "checkpoint",
    "audio",
    "speech",
    "sample",
    "reflow",
    "eval",
    "experiments",
];

/// The longest function body allowed, in lines.
const MAX_FUNCTION_LINES: usize = 150;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every library source file (test-only files left out), with its top-level module.
fn sources() -> Vec<(String, PathBuf)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let p = entry.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = vec![];
    walk(&src(), &mut files);
    files.sort();
    files
        .into_iter()
        .filter(|p| {
            !matches!(
                p.file_name().unwrap().to_str(),
                Some("tests.rs" | "testing.rs")
            )
        })
        .filter_map(|p| {
            let rel = p.strip_prefix(src()).unwrap();
            let first = rel.components().next()?.as_os_str().to_str()?.to_string();
            let top = first.trim_end_matches(".rs").to_string();
            (top != "lib").then_some((top, p))
        })
        .collect()
}

/// The code of a file without its test module and without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or("");
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules a piece of code names through `crate::`.
fn imports(code: &str) -> Vec<String> {
    let mut out = vec![];
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = code[i + 7..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && name != "Result" && name != "Error" {
            out.push(name);
        }
    }
    out
}

#[test]
fn every_module_imports_only_lower_layers() {
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);
    let mut bad = BTreeMap::new();
    for (top, path) in sources() {
        let Some(r) = rank(&top) else {
            panic!("module {top} is not in LAYERS: place it in the layer order");
        };
        for m in imports(&code(&path)) {
            match rank(&m) {
                Some(q) if q < r => {}
                Some(_) if m == top => {}
                _ => {
                    bad.entry(path.display().to_string())
                        .or_insert_with(Vec::new)
                        .push(m);
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports of a module at the same or a higher layer: {bad:#?}"
    );
}

#[test]
fn lib_declares_the_layers_and_keeps_cpu_private() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    for m in LAYERS {
        assert!(
            lib.contains(&format!("mod {m};")),
            "lib.rs does not declare {m}"
        );
    }
    assert!(
        lib.contains("\nmod cpu;"),
        "the CPU kernels must stay private"
    );
    for (_, path) in sources() {
        let text = code(&path);
        assert!(
            !text.contains("std::env::var"),
            "{} reads the environment: configuration comes from the caller",
            path.display()
        );
    }
}

/// The line count of each function body in `code` (from its `fn` line to the closing brace).
fn function_lengths(code: &str) -> Vec<(String, usize)> {
    let lines: Vec<&str> = code.lines().collect();
    let mut out = vec![];
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let is_fn = ["fn ", "pub fn ", "pub(crate) fn ", "pub(super) fn "]
            .iter()
            .any(|p| t.starts_with(p));
        if !is_fn {
            continue;
        }
        let mut depth = 0i64;
        let mut opened = false;
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    ';' if !opened && depth == 0 => break,
                    _ => {}
                }
            }
            if opened && depth == 0 {
                out.push((t.chars().take(60).collect(), j - i + 1));
                break;
            }
            if !opened && l.trim_end().ends_with(';') {
                break;
            }
        }
    }
    out
}

#[test]
fn no_function_is_longer_than_the_limit() {
    let mut long = vec![];
    for (_, path) in sources() {
        for (f, n) in function_lengths(&code(&path)) {
            if n > MAX_FUNCTION_LINES {
                long.push(format!("{}: {f} ({n} lines)", path.display()));
            }
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FUNCTION_LINES} lines: {long:#?}"
    );
}

#[test]
fn the_checks_see_what_they_check() {
    assert_eq!(
        imports("use crate::nn::Model; my_crate::y; crate::Result"),
        ["nn"]
    );
    let f = "fn a() {\n    b();\n}\nfn c();\n";
    assert_eq!(function_lengths(f), [("fn a() {".to_string(), 3)]);
}

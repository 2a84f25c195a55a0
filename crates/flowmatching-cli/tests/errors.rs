//! The bad-input catalogue of docs/errors.md, one case per entry: each bad invocation must exit non-zero
//! with a one-line `error:` naming the problem, never panic, and leave no output or temporary file
//! behind. Plus the two durability tests: a full disk and SIGKILL during checkpoint saves.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// One catalogue entry: an id (as in docs/errors.md), the arguments, a phrase the message must contain,
/// and paths that must not exist afterwards.
struct Case {
    id: &'static str,
    args: Vec<String>,
    needle: &'static str,
    absent: Vec<PathBuf>,
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_string()
}

fn case(id: &'static str, args: &[&str], needle: &'static str, absent: &[&Path]) -> Case {
    Case {
        id,
        args: args.iter().map(|a| a.to_string()).collect(),
        needle,
        absent: absent.iter().map(|p| p.to_path_buf()).collect(),
    }
}

fn train_small(out: &Path, hidden: &str) {
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "2",
        "--hidden",
        hidden,
        "--depth",
        "2",
        "--batch-size",
        "8",
        "--out",
        &s(out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A copy of checkpoint folder `from` with checkpoint.json edited by `edit`.
fn edited(from: &Path, to: &Path, edit: impl Fn(&mut serde_json::Value)) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    let p = to.join("checkpoint.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).unwrap()).unwrap();
}

fn weights_of(dir: &Path) -> PathBuf {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("checkpoint.json")).unwrap()).unwrap();
    dir.join(v["weights_file"].as_str().unwrap())
}

/// Every entry under `dir`: file contents, symbolic-link targets, folders.
fn tree(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut found = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let t = e.file_type().unwrap();
            let v = if t.is_symlink() {
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes()
            } else if t.is_dir() {
                stack.push(p.clone());
                b"<folder>".to_vec()
            } else {
                std::fs::read(&p).unwrap()
            };
            found.insert(p, v);
        }
    }
    found
}

/// Files whose names mark an unfinished atomic write.
fn temporaries(dir: &Path) -> Vec<PathBuf> {
    let mut found = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if e.file_name().to_string_lossy().contains(".tmp") {
                found.push(p);
            }
        }
    }
    found
}

fn catalogue(d: &Path) -> Vec<Case> {
    // Fixtures: two small 2-D checkpoints of different widths, an image checkpoint, data files.
    let good = d.join("good");
    train_small(&good, "8");
    let wide = d.join("wide");
    train_small(&wide, "16");
    let fashion = d.join("fashion");
    std::fs::create_dir_all(&fashion).unwrap();
    fake_fashion(&fashion, "train", 16);
    fake_fashion(&fashion, "t10k", 8);
    let img = d.join("img");
    let o = run(&[
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        &s(&fashion),
        "--unet",
        "tiny",
        "--base-channels",
        "8",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        &s(&img),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A folder an ablation claimed (its run.json, here not a valid record).
    let claimed = d.join("claimed");
    std::fs::create_dir_all(&claimed).unwrap();
    std::fs::write(claimed.join("run.json"), "{}").unwrap();
    let unclaimed = d.join("unclaimed");

    let junk = d.join("junk.npy");
    std::fs::write(&junk, b"not an npy at all").unwrap();
    let ints = d.join("ints.npy");
    write_npy_raw(&ints, "<i4", "(2, 2)", &[0; 16]);
    let rank5 = d.join("rank5.npy");
    write_npy_raw(&rank5, "<f4", "(1, 1, 1, 1, 2)", &[0; 8]);
    let short = d.join("short.npy");
    write_npy_raw(&short, "<f4", "(1000, 2)", &[0; 16]);
    let nan = d.join("nan.csv");
    std::fs::write(&nan, "1,2\nnan,3\n").unwrap();
    let inf = d.join("inf.csv");
    std::fs::write(&inf, "1,2\n3,inf\n").unwrap();
    let empty = d.join("empty.csv");
    std::fs::write(&empty, "x,y\n").unwrap();
    let three = d.join("three.csv");
    std::fs::write(&three, "1,2,3\n4,5,6\n").unwrap();
    let ragged = d.join("ragged.csv");
    std::fs::write(&ragged, "1,2\n3,4,5\n").unwrap();
    let badmagic = d.join("badmagic");
    std::fs::create_dir_all(&badmagic).unwrap();
    fake_fashion(&badmagic, "train", 4);
    std::fs::write(badmagic.join("train-images-idx3-ubyte"), b"PK\x03\x04zip").unwrap();
    let cut = d.join("cut");
    std::fs::create_dir_all(&cut).unwrap();
    fake_fashion(&cut, "train", 4);
    let imgs = std::fs::read(cut.join("train-images-idx3-ubyte")).unwrap();
    std::fs::write(
        cut.join("train-images-idx3-ubyte"),
        &imgs[..imgs.len() - 10],
    )
    .unwrap();
    let folder = d.join("folder");
    std::fs::create_dir_all(folder.join("cat")).unwrap();
    std::fs::write(folder.join("cat").join("a.png"), b"not a png").unwrap();
    let nothing = d.join("nothing");
    std::fs::create_dir_all(&nothing).unwrap();

    let truncated = d.join("truncated");
    edited(&good, &truncated, |_| {});
    let w = weights_of(&truncated);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let flipped = d.join("flipped");
    edited(&good, &flipped, |_| {});
    let w = weights_of(&flipped);
    let mut bytes = std::fs::read(&w).unwrap();
    bytes[100] ^= 0x10;
    std::fs::write(&w, bytes).unwrap();
    let notjson = d.join("notjson");
    edited(&good, &notjson, |_| {});
    std::fs::write(notjson.join("checkpoint.json"), b"{ \"step\": ").unwrap();
    // Another architecture: the config of the 8-wide run, the (valid, checksummed) tensors of the
    // 16-wide one.
    let other = d.join("other");
    let wide_meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wide.join("checkpoint.json")).unwrap()).unwrap();
    edited(&good, &other, |v| {
        v["weights_file"] = wide_meta["weights_file"].clone();
        v["weights_crc32"] = wide_meta["weights_crc32"].clone();
    });
    std::fs::copy(weights_of(&wide), weights_of(&other)).unwrap();
    let newer = d.join("newer");
    edited(&good, &newer, |v| v["config"]["format_version"] = 99.into());
    let escape = d.join("escape");
    edited(&good, &escape, |v| {
        v["weights_file"] = "../wide/x.safetensors".into()
    });
    let badclf = d.join("clf.safetensors");
    std::fs::write(&badclf, b"\x08\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
    let afile = d.join("a-file");
    std::fs::write(&afile, b"").unwrap();

    let x0 = d.join("x0.npy");
    write_npy_f64(&x0, &[[0.0, 1.0], [1.0, 0.0]]);
    let dangling = d.join("dangling.npy");
    std::os::unix::fs::symlink(d.join("nowhere.npy"), &dangling).unwrap();
    let huge = d.join("huge.csv");
    std::fs::write(&huge, "1e30,-1e30\n-1e30,1e30\n3e30,2e30\n").unwrap();
    let headers = d.join("headers.csv");
    std::fs::write(&headers, "points\nx,y\n1,2\n").unwrap();
    let bomb = d.join("bomb");
    edited(&good, &bomb, |v| {
        v["config"]["model"]["hidden"] = 40_000.into()
    });
    let imgs = d.join("imgs");
    std::fs::create_dir_all(&imgs).unwrap();
    image::GrayImage::from_pixel(4, 4, image::Luma([128]))
        .save(imgs.join("a.png"))
        .unwrap();

    let out = d.join("out");
    let ck = out.join("checkpoint.json");
    let samples = d.join("samples.npy");
    let (g, im) = (s(&good), s(&img));
    let train = |data: &str| -> Vec<String> {
        [
            "train",
            "--data",
            data,
            "--steps",
            "2",
            "--hidden",
            "8",
            "--out",
            &s(&out),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let with = |mut base: Vec<String>, extra: &[&str]| -> Vec<String> {
        base.extend(extra.iter().map(|a| a.to_string()));
        base
    };
    let sample_from = |ck: &str, x0: &Path| -> Vec<String> {
        [
            "sample",
            "--checkpoint",
            ck,
            "--out",
            &s(&samples),
            "--x0",
            &s(x0),
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let c = |id: &'static str, args: Vec<String>, needle: &'static str, absent: &[&Path]| Case {
        id,
        args,
        needle,
        absent: absent.iter().map(|p| p.to_path_buf()).collect(),
    };
    vec![
        c(
            "E01",
            train(&s(&d.join("missing.npy"))),
            "cannot read",
            &[&ck],
        ),
        c("E02", train("nosuchset"), "neither a built-in", &[&ck]),
        c("E03", train(&s(&junk)), "not a valid .npy", &[&ck]),
        c("E04", train(&s(&ints)), "dtype", &[&ck]),
        c("E05", train(&s(&rank5)), "expected N x D points", &[&ck]),
        c("E06", train(&s(&short)), "more than the file", &[&ck]),
        c("E07", train(&s(&nan)), "NaN", &[&ck]),
        c("E08", train(&s(&inf)), "Inf", &[&ck]),
        c("E09", train(&s(&empty)), "no data rows", &[&ck]),
        c("E10", train(&s(&ragged)), "columns", &[&ck]),
        c(
            "E11",
            with(train("fashion-mnist"), &["--data-dir", &s(&badmagic)]),
            "magic",
            &[&ck],
        ),
        c(
            "E12",
            with(train("fashion-mnist"), &["--data-dir", &s(&cut)]),
            "promises",
            &[&ck],
        ),
        c(
            "E13",
            with(train("fashion-mnist"), &["--data-dir", &s(&nothing)]),
            "apt-get install dataset-fashion-mnist",
            &[&ck],
        ),
        c("E14", train(&s(&folder)), "not a readable image", &[&ck]),
        c("E15", train(&s(&nothing)), "no .png or .jpg", &[&ck]),
        case(
            "E16",
            &[
                "sample",
                "--checkpoint",
                &s(&nothing),
                "--out",
                &s(&samples),
            ],
            "checkpoint.json",
            &[&samples],
        ),
        case(
            "E17",
            &[
                "sample",
                "--checkpoint",
                &s(&truncated),
                "--out",
                &s(&samples),
            ],
            "truncated or corrupted",
            &[&samples],
        ),
        case(
            "E18",
            &[
                "sample",
                "--checkpoint",
                &s(&flipped),
                "--out",
                &s(&samples),
            ],
            "checksum",
            &[&samples],
        ),
        case(
            "E19",
            &[
                "sample",
                "--checkpoint",
                &s(&notjson),
                "--out",
                &s(&samples),
            ],
            "not a valid checkpoint file",
            &[&samples],
        ),
        case(
            "E20",
            &["sample", "--checkpoint", &s(&other), "--out", &s(&samples)],
            "another architecture",
            &[&samples],
        ),
        case(
            "E21",
            &["sample", "--checkpoint", &s(&newer), "--out", &s(&samples)],
            "newer",
            &[&samples],
        ),
        case(
            "E22",
            &["sample", "--checkpoint", &s(&escape), "--out", &s(&samples)],
            "plain file name",
            &[&samples],
        ),
        c("E23", with(train("moons"), &["--lr=-1"]), "lr", &[&ck]),
        c(
            "E24",
            with(train("moons"), &["--sigma-min", "1.5"]),
            "sigma_min",
            &[&ck],
        ),
        c(
            "E25",
            with(train("moons"), &["--batch-size", "0"]),
            "batch size",
            &[&ck],
        ),
        c(
            "E26",
            [
                "train",
                "--data",
                "moons",
                "--steps",
                "0",
                "--out",
                &s(&out),
            ]
            .iter()
            .map(|a| a.to_string())
            .collect(),
            "at least 1 step",
            &[&ck],
        ),
        c(
            "E27",
            with(train("moons"), &["--ema-decay", "1.5"]),
            "EMA decay",
            &[&ck],
        ),
        case(
            "E28",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--steps",
                "0",
                "--out",
                &s(&samples),
            ],
            "--steps must be at least 1",
            &[&samples],
        ),
        case(
            "E29",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--solver",
                "dopri5",
                "--rtol",
                "0",
                "--out",
                &s(&samples),
            ],
            "rtol must be positive",
            &[&samples],
        ),
        case(
            "E30",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--guidance",
                "2",
                "--out",
                &s(&samples),
            ],
            "class-conditional",
            &[&samples],
        ),
        case(
            "E31",
            &[
                "sample",
                "--checkpoint",
                &im,
                "--class",
                "10",
                "--num-samples",
                "2",
                "--out",
                &s(&samples),
            ],
            "does not exist",
            &[&samples],
        ),
        c(
            "E32",
            with(
                train("fashion-mnist"),
                &[
                    "--data-dir",
                    &s(&fashion),
                    "--label-dropout",
                    "1.5",
                    "--unet",
                    "tiny",
                ],
            ),
            "label dropout",
            &[&ck],
        ),
        case(
            "E33",
            &[
                "train",
                "--data",
                "moons",
                "--steps",
                "2",
                "--out",
                &s(&afile.join("sub")),
            ],
            "cannot create output folder",
            &[],
        ),
        c(
            "E34",
            with(train("moons"), &["--resume"]),
            "no usable checkpoint",
            &[&ck],
        ),
        case(
            "E35",
            &["train", "--data", "moons", "--steps", "2", "--out", &g],
            "already holds a checkpoint",
            &[],
        ),
        case(
            "E36",
            &[
                "train", "--data", "moons", "--steps", "1", "--resume", "--out", &g,
            ],
            "pass a larger --steps",
            &[],
        ),
        case(
            "E37",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--hutchinson",
                "0",
            ],
            "at least one probe",
            &[],
        ),
        case(
            "E38",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--out",
                &s(&d.join("samples.txt")),
            ],
            "must name a .npy",
            &[&d.join("samples.txt")],
        ),
        c(
            "E39",
            with(train("moons"), &["--hflip"]),
            "needs image data",
            &[&ck],
        ),
        c(
            "E40",
            with(train("moons"), &["--model", "unet"]),
            "needs image data",
            &[&ck],
        ),
        case(
            "E41",
            &[
                "image-eval",
                "--checkpoint",
                &im,
                "--classifier",
                &s(&badclf),
                "--data-dir",
                &s(&fashion),
                "--out",
                &s(&d.join("eval")),
            ],
            "not a readable classifier file",
            &[&d.join("eval").join("results.json")],
        ),
        c(
            "E42",
            with(
                train("moons"),
                &["--coupling", "sinkhorn", "--sinkhorn-reg", "0"],
            ),
            "Sinkhorn regularisation",
            &[&ck],
        ),
        c(
            "E43",
            with(train("moons"), &["--source", "nosuchset"]),
            "neither a built-in",
            &[&ck],
        ),
        c("E44", sample_from(&g, &three), "has 3 columns", &[&samples]),
        c(
            "E45",
            sample_from(&g, &nan),
            "non-finite value in row 1",
            &[&samples],
        ),
        c(
            "E46",
            sample_from(&im, &three),
            "for point models",
            &[&samples],
        ),
        case(
            "E47",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--num-samples",
                "8",
                "--per-point",
                &s(&d.join("logp.txt")),
            ],
            "must name a .npy",
            &[&d.join("logp.txt")],
        ),
        case(
            "E48",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--num-samples",
                "8",
                "--out",
                &s(&good.join("checkpoint.json")),
            ],
            "an input of this command",
            &[],
        ),
        case(
            "E49",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--out",
                &s(&samples),
                "--plot",
                &s(&weights_of(&good)),
            ],
            "an input of this command",
            &[&samples],
        ),
        case(
            "E50",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--out",
                &s(&samples),
                "--plot",
                &s(&samples),
            ],
            "name the same file",
            &[&samples],
        ),
        case(
            "E51",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--x0",
                &s(&x0),
                "--out",
                &s(&x0),
            ],
            "an input of this command",
            &[],
        ),
        case(
            "E52",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--num-samples",
                "8",
                "--out",
                "/dev/full",
            ],
            "not a regular file",
            &[],
        ),
        case(
            "E53",
            &["sample", "--checkpoint", &g, "--out", &s(&dangling)],
            "symbolic link to a missing file",
            &[],
        ),
        case(
            "E54",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--out",
                &s(&nothing),
            ],
            "is a folder",
            &[],
        ),
        c(
            "E55",
            with(train("moons"), &["--batch-size", "1000000000000"]),
            "lower --batch-size",
            &[&ck],
        ),
        case(
            "E56",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--num-samples",
                "1000000000000",
                "--out",
                &s(&samples),
            ],
            "lower --num-samples",
            &[&samples],
        ),
        case(
            "E57",
            &[
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--num-samples",
                "1000",
                "--hutchinson",
                "100000000000",
            ],
            "lower --batch-size or --hutchinson",
            &[],
        ),
        c(
            "E58",
            with(train(&s(&imgs)), &["--image-size", "1000000"]),
            "lower --image-size",
            &[&ck],
        ),
        case(
            "E59",
            &["sample", "--checkpoint", &s(&bomb), "--out", &s(&samples)],
            "another architecture",
            &[&samples],
        ),
        c(
            "E60",
            train(&s(&huge)),
            "no checkpoint was written",
            &[&out],
        ),
        c(
            "E61",
            with(train("moons"), &["--source", &s(&three)]),
            "must have the same dimension",
            &[&out],
        ),
        case(
            "E62",
            &[
                "eval",
                "--checkpoint",
                &g,
                "--data",
                &s(&three),
                "--num-samples",
                "2",
            ],
            "holds points of 3 dimensions",
            &[],
        ),
        c(
            "E63",
            train(&s(&headers)),
            "only the first line may be a header",
            &[&out],
        ),
        case(
            "E64",
            &[
                "train", "--data", "moons", "--steps", "5", "--lr", "0.01", "--resume", "--out", &g,
            ],
            "--lr gives 0.01 where the checkpoint has 0.001",
            &[],
        ),
        case(
            "E65",
            &[
                "train", "--data", "circles", "--steps", "5", "--resume", "--out", &g,
            ],
            "--data gives \"circles\" where the checkpoint has \"moons\"",
            &[],
        ),
        case(
            "E66",
            &[
                "sample",
                "--checkpoint",
                &im,
                "--num-samples",
                "2",
                "--plot",
                &s(&d.join("p.png")),
                "--out",
                &s(&samples),
            ],
            "for point models",
            &[&samples, &d.join("p.png")],
        ),
        case(
            "E67",
            &[
                "sample",
                "--checkpoint",
                &im,
                "--guidance",
                "1e30",
                "--out",
                &s(&samples),
            ],
            "must be between",
            &[&samples],
        ),
        c(
            "E68",
            with(train("moons"), &["--lr", "nan"]),
            "must be a finite number",
            &[&out],
        ),
        case(
            "E69",
            &[
                "classifier",
                "train",
                "--data-dir",
                &s(&fashion),
                "--out",
                &s(&fashion.join("clf.safetensors")),
            ],
            "inside the Fashion-MNIST folder",
            &[&fashion.join("clf.safetensors")],
        ),
        case(
            "E70",
            &[
                "train",
                "--data",
                &s(&three),
                "--steps",
                "5",
                "--resume",
                "--out",
                &g,
            ],
            "where the checkpoint's model takes 2-dimensional points",
            &[],
        ),
        c(
            "E71",
            with(train("moons"), &["--time-sampling", "mode:5"]),
            "mode time sampling needs a scale",
            &[&out],
        ),
        case(
            "E72",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--time-grid",
                "shift:0",
                "--out",
                &s(&samples),
            ],
            "shift must be positive",
            &[&samples],
        ),
        case(
            "E73",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--solver",
                "dopri5",
                "--time-grid",
                "shift:3",
                "--out",
                &s(&samples),
            ],
            "a time grid places fixed steps",
            &[&samples],
        ),
        case(
            "E74",
            &["ablate", "--data", "moons", "--out", &s(&claimed)],
            "holds an ablation already: --resume continues it",
            &[&claimed.join("report.md")],
        ),
        case(
            "E75",
            &[
                "ablate",
                "--data",
                "moons",
                "--resume",
                "--out",
                &s(&unclaimed),
            ],
            "holds no ablation to continue",
            &[&unclaimed],
        ),
        case(
            "E76",
            &[
                "ablate",
                "--data",
                "moons",
                "--resume",
                "--out",
                &s(&claimed),
            ],
            "is not the record of an ablation",
            &[&claimed.join("report.md")],
        ),
        case(
            "E77",
            &[
                "schedules",
                "--data",
                &s(&three),
                "--out",
                &s(&d.join("sch")),
            ],
            "schedules works on 2-D points or images",
            &[&d.join("sch")],
        ),
        case(
            "E78",
            &[
                "schedules",
                "--data",
                "fashion-mnist",
                "--data-dir",
                &s(&fashion),
                "--out",
                &s(&d.join("sch")),
            ],
            "pass --classifier",
            &[&d.join("sch")],
        ),
        case(
            "E79",
            &["schedules", "--data", "moons", "--out", &s(&claimed)],
            "holds a schedules study already: --resume continues it",
            &[&claimed.join("report.md")],
        ),
        case(
            "E80",
            &[
                "sample",
                "--checkpoint",
                &g,
                "--log-prob",
                "--precision",
                "bf16",
                "--out",
                &s(&samples),
            ],
            "likelihoods run in f32",
            &[&samples],
        ),
        c(
            "E82",
            with(train("moons"), &["--precision", "fp8"]),
            "use f32 or bf16",
            &[&out],
        ),
    ]
}

#[test]
fn every_catalogued_bad_input_fails_cleanly() {
    let d = tmpdir("errors");
    let cases = catalogue(&d);
    let before = temporaries(&d);
    assert!(before.is_empty(), "{before:?}");
    let fixtures = tree(&d);
    for c in &cases {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let o = run(&args);
        let err = stderr(&o);
        assert!(!o.status.success(), "{}: should fail: {err}", c.id);
        assert!(!err.contains("panicked"), "{}: panicked: {err}", c.id);
        assert!(err.contains("error:"), "{}: no error line: {err}", c.id);
        assert!(
            err.contains(c.needle),
            "{}: expected '{}' in: {err}",
            c.id,
            c.needle
        );
        for p in &c.absent {
            assert!(!p.exists(), "{}: {} was written", c.id, p.display());
        }
        let left = temporaries(&d);
        assert!(left.is_empty(), "{}: temporary files left: {left:?}", c.id);
        // Inputs byte-identical, nothing added: a failed command changes nothing.
        let after = tree(&d);
        if after != fixtures {
            let changed: Vec<_> = after
                .iter()
                .filter(|(p, v)| fixtures.get(*p) != Some(v))
                .map(|(p, _)| p)
                .chain(fixtures.keys().filter(|p| !after.contains_key(*p)))
                .collect();
            panic!("{}: the folder changed: {changed:?}", c.id);
        }
    }
    use std::os::unix::fs::FileTypeExt;
    let full = std::fs::metadata("/dev/full").unwrap().file_type();
    assert!(full.is_char_device(), "/dev/full was replaced");
    // The catalogue in docs/errors.md lists exactly these ids.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/errors.md"))
            .unwrap();
    let documented: Vec<&str> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| E"))
        .map(|l| &l[..2])
        .collect();
    let tested: Vec<&str> = cases.iter().map(|c| &c.id[1..]).collect();
    assert_eq!(documented, tested, "docs/errors.md and the tests disagree");
    let _ = std::fs::remove_dir_all(&d);
}

/// A full disk: the file-size limit (RLIMIT_FSIZE, with SIGXFSZ ignored so writes fail with EFBIG)
/// stops the first checkpoint save. The command must fail cleanly and leave no partial file.
#[test]
fn full_disk_leaves_no_partial_checkpoint() {
    let d = tmpdir("fulldisk");
    let out = d.join("run");
    let mut cmd = bin();
    cmd.args([
        "train",
        "--data",
        "moons",
        "--steps",
        "3",
        "--hidden",
        "64",
        "--depth",
        "2",
        "--batch-size",
        "8",
        "--out",
        &s(&out),
    ]);
    let o = limited(cmd, libc::RLIMIT_FSIZE, 16 * 1024)
        .output()
        .unwrap();

    assert_clean_failure(&o, "File too large");
    assert!(!out.join("checkpoint.json").exists());
    let left = temporaries(&d);
    assert!(left.is_empty(), "partial files left: {left:?}");
    let weights: Vec<_> = std::fs::read_dir(&out)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(weights.is_empty(), "files left: {weights:?}");
    let _ = std::fs::remove_dir_all(&d);
}

/// SIGKILL while `train` saves a checkpoint every step: whenever it dies, the folder still holds a
/// checkpoint that loads and samples (atomic rename of the tensor file, then of checkpoint.json, and
/// old tensor files removed only after the new checkpoint.json is in place).
#[test]
fn sigkill_during_saves_keeps_a_loadable_checkpoint() {
    let d = tmpdir("sigkill");
    let out = d.join("run");
    for (round, delay_ms) in [300u64, 450, 600, 750, 900].into_iter().enumerate() {
        let mut child = bin()
            .args([
                "train",
                "--data",
                "moons",
                "--steps",
                "100000",
                "--hidden",
                "256",
                "--depth",
                "3",
                "--batch-size",
                "64",
                "--checkpoint-every",
                "1",
                "--out",
                &s(&out),
            ])
            .args(if round > 0 {
                &["--resume"][..]
            } else {
                &[][..]
            })
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if !out.join("checkpoint.json").exists() {
            assert_eq!(round, 0, "a checkpoint existed before and is gone");
            continue;
        }
        let samples = d.join(format!("s{round}.npy"));
        let o = run(&[
            "sample",
            "--checkpoint",
            &s(&out),
            "--num-samples",
            "10",
            "--steps",
            "2",
            "--out",
            &s(&samples),
        ]);
        assert!(o.status.success(), "round {round}: {}", stderr(&o));
    }
    assert!(
        out.join("checkpoint.json").exists(),
        "no save ever completed"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The arguments of a small `train` run of `steps` steps.
fn small_train(steps: &'static str) -> [&'static str; 11] {
    [
        "train",
        "--data",
        "moons",
        "--steps",
        steps,
        "--hidden",
        "64",
        "--depth",
        "2",
        "--batch-size",
        "64",
    ]
}

/// A long `train` into `out`, returned once its loop has started, with the rest of its stderr.
fn start_long_training(out: &Path) -> (std::process::Child, impl Iterator<Item = String>) {
    use std::io::{BufRead, BufReader};
    let mut child = bin()
        .args(small_train("10000000"))
        .args(["--out", &s(out)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(|l| l.ok());
    // The loop installs its Ctrl-C handler right after announcing the run.
    let started = lines.by_ref().any(|l| l.starts_with("training on"));
    assert!(started, "train never started");
    (child, lines)
}

/// Sends SIGINT to `child` and returns its exit code and the rest of its stderr.
fn interrupt(
    mut child: std::process::Child,
    lines: impl Iterator<Item = String>,
) -> (Option<i32>, Vec<String>) {
    // SAFETY: sends SIGINT to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.collect();
    (child.wait().unwrap().code(), rest)
}

/// Ctrl-C during `train`: a checkpoint is saved and the exit status is 130 (not 0), so scripts can tell
/// an interrupted run from a finished one; `--resume` continues it.
#[test]
fn ctrl_c_saves_a_checkpoint_and_exits_130() {
    let d = tmpdir("sigint");
    let out = d.join("run");
    let (child, lines) = start_long_training(&out);
    std::thread::sleep(std::time::Duration::from_millis(800));
    let (code, rest) = interrupt(child, lines);
    assert_eq!(code, Some(130), "{rest:?}");
    assert!(
        rest.iter().any(|l| l.contains("interrupted at step")),
        "{rest:?}"
    );
    assert!(out.join("checkpoint.json").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// Two `train --out same` at once: the second is refused with a clear message while the first runs,
/// and the first finishes its run; afterwards the folder can be trained again (`--resume`).
#[test]
fn a_second_run_on_a_busy_folder_is_refused() {
    let d = tmpdir("lock");
    let out = d.join("run");
    let (first, lines) = start_long_training(&out);
    let second = bin()
        .args(small_train("20"))
        .args(["--out", &s(&out)])
        .output()
        .unwrap();
    assert_clean_failure(&second, "in use by another training run");
    assert_eq!(interrupt(first, lines).0, Some(130));
    assert!(
        !out.join(".lock").exists(),
        "the lock file outlived its run"
    );
    let o = bin()
        .args(small_train("20000000"))
        .args(["--out", &s(&out), "--resume", "--max-minutes", "0.001"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&d);
}

/// `cmd` with its resource limit `resource` set to `bytes` (and SIGXFSZ ignored, so that a write past
/// a file-size limit fails with EFBIG as on a full disk).
fn limited(
    mut cmd: std::process::Command,
    resource: libc::__rlimit_resource_t,
    bytes: u64,
) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: only async-signal-safe libc calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: bytes,
                rlim_max: bytes,
            };
            if libc::setrlimit(resource, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Absurd sizes under a 3 GB address-space limit: each is refused with the figure and the flag to
/// lower, in well under 5 seconds, before anything of that size is allocated (no allocation abort, no
/// OOM kill).
#[test]
fn absurd_sizes_are_refused_under_a_3_gb_limit() {
    let d = tmpdir("absurd");
    let good = d.join("good");
    train_small(&good, "8");
    let bomb = d.join("bomb");
    edited(&good, &bomb, |v| {
        v["config"]["model"]["hidden"] = 40_000.into()
    });
    let (g, out, samples) = (s(&good), s(&d.join("out")), s(&d.join("s.npy")));
    let b = s(&bomb);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "train",
                "--data",
                "moons",
                "--batch-size",
                "1000000000000",
                "--out",
                &out,
            ],
            "lower --batch-size",
        ),
        (
            vec![
                "train", "--data", "moons", "--hidden", "30000", "--out", &out,
            ],
            "the model's size",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                &g,
                "--num-samples",
                "1000000000000",
                "--out",
                &samples,
            ],
            "lower --num-samples",
        ),
        (
            vec![
                "sample",
                "--checkpoint",
                &g,
                "--num-samples",
                "10000000",
                "--trajectory",
                "--out",
                &samples,
            ],
            "lower --num-samples",
        ),
        (
            vec![
                "likelihood",
                "--checkpoint",
                &g,
                "--data",
                "moons",
                "--num-samples",
                "100",
                "--hutchinson",
                "1000000000",
            ],
            "lower --batch-size or --hutchinson",
        ),
        (
            vec!["sample", "--checkpoint", &b, "--out", &samples],
            "another architecture",
        ),
        (
            vec![
                "train", "--data", "moons", "--resume", "--steps", "10", "--out", &b,
            ],
            "another architecture",
        ),
    ];
    for (args, needle) in cases {
        let mut cmd = bin();
        cmd.args(&args);
        let start = std::time::Instant::now();
        let o = limited(cmd, libc::RLIMIT_AS, 3 << 30).output().unwrap();
        let seconds = start.elapsed().as_secs_f64();
        assert_clean_failure(&o, needle);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(seconds < 5.0, "{args:?} took {seconds:.1} s");
    }
    assert!(!d.join("out").exists() && !d.join("s.npy").exists());
    assert!(temporaries(&d).is_empty());
    let _ = std::fs::remove_dir_all(&d);
}

/// A command's outputs appear together or not at all: `sample --trajectory` whose trajectory cannot be
/// written (a file-size limit between the sizes of the samples and of the trajectory) leaves the
/// earlier run's samples and statistics as they were, and no temporary file. Temporary files that a
/// killed write left behind are removed by the next write of the same file.
#[test]
fn outputs_appear_together_or_not_at_all() {
    let d = tmpdir("together");
    let good = d.join("good");
    train_small(&good, "8");
    let (g, samples) = (s(&good), d.join("s.npy"));
    let sample = |extra: &[&str]| {
        let mut cmd = bin();
        cmd.args([
            "sample",
            "--checkpoint",
            &g,
            "--num-samples",
            "200",
            "--steps",
            "4",
        ])
        .args(["--out", &s(&samples)])
        .args(extra);
        cmd
    };
    let o = sample(&[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let before = tree(&d);
    // 200 x 2 f32 samples are 1.7 KB; 101 frames of them 160 KB.
    let o = limited(sample(&["--trajectory"]), libc::RLIMIT_FSIZE, 32 * 1024)
        .output()
        .unwrap();
    assert_clean_failure(&o, "File too large");
    assert_eq!(tree(&d), before, "a failed run changed its earlier outputs");
    // A temporary file of a killed writer (a process id that is not running) goes with the next write.
    let stale = d.join(".s.npy.tmp-4194303");
    std::fs::write(&stale, b"partial").unwrap();
    let o = sample(&["--trajectory"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "a stale temporary file survived");
    assert!(d.join("s.trajectory.npy").exists() && d.join("s.trajectory.png").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// An output that is a symbolic link: its target is replaced and the link stays a link.
#[test]
fn a_symbolic_link_output_is_followed() {
    let d = tmpdir("symlink");
    let good = d.join("good");
    train_small(&good, "8");
    let (real, link) = (d.join("real.npy"), d.join("link.npy"));
    std::fs::write(&real, b"old").unwrap();
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let o = run(&[
        "sample",
        "--checkpoint",
        &s(&good),
        "--num-samples",
        "10",
        "--steps",
        "2",
        "--out",
        &s(&link),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(read_npy_len(&real), 20);
    let _ = std::fs::remove_dir_all(&d);
}

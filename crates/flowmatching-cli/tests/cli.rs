//! End-to-end tests of the `flowmatching` binary: small runs, and bad input handled without panics.

mod common;
use common::*;

#[test]
fn train_then_sample_on_user_npy_and_resume() {
    let dir = tmpdir("npy");
    let data = dir.join("points.npy");
    let rows: Vec<[f64; 2]> = (0..64)
        .map(|i| [(i % 8) as f64 - 3.5, (i / 8) as f64 * 0.5])
        .collect();
    write_npy_f64(&data, &rows);
    let ck = dir.join("run");
    let (d, c) = (data.to_str().unwrap(), ck.to_str().unwrap());
    let common = [
        "--hidden",
        "16",
        "--depth",
        "2",
        "--batch-size",
        "32",
        "--checkpoint-every",
        "10",
    ];
    let o = bin()
        .args(["train", "--data", d, "--out", c, "--steps", "20"])
        .args(common)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(ck.join("checkpoint.json").exists());
    // a second plain train into the same folder refuses to overwrite it
    let o = bin()
        .args(["train", "--data", d, "--out", c, "--steps", "30"])
        .args(common)
        .output()
        .unwrap();
    assert_clean_failure(&o, "--resume");
    let o = bin()
        .args([
            "train", "--data", d, "--out", c, "--steps", "30", "--resume",
        ])
        .args(common)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(meta["step"], 30);

    let out = dir.join("s.npy");
    let png = dir.join("s.png");
    let o = run(&[
        "sample",
        "--checkpoint",
        c,
        "--out",
        out.to_str().unwrap(),
        "--plot",
        png.to_str().unwrap(),
        "--num-samples",
        "100",
        "--solver",
        "rk4",
        "--steps",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_npy_len(&out), 200);
    assert!(png.exists());
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("s.stats.json")).unwrap()).unwrap();
    assert_eq!(stats["stats"]["nfe"], 20);

    // adaptive sampling with per-sample control and a saved trajectory
    let adaptive = [
        "--solver",
        "dopri5",
        "--rtol",
        "1e-4",
        "--atol",
        "1e-4",
        "--per-sample",
    ];
    let o = bin()
        .args(["sample", "--checkpoint", c, "--num-samples", "30", "--out"])
        .arg(&out)
        .args(adaptive)
        .arg("--trajectory")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("s.trajectory.png").exists());
    assert_eq!(read_npy_len(&dir.join("s.trajectory.npy")), 101 * 30 * 2);
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("s.stats.json")).unwrap()).unwrap();
    assert!(stats["nfe_per_sample_mean"].as_f64().unwrap() > 0.0);
    // --x0: starting from the noise that run started from (the trajectory's first frame) gives its samples
    let traj = read_npy_values(&dir.join("s.trajectory.npy"));
    let x0 = dir.join("x0.npy");
    let start: Vec<[f64; 2]> = traj[..60].chunks(2).map(|r| [r[0], r[1]]).collect();
    write_npy_f64(&x0, &start);
    let again = dir.join("again.npy");
    let o = bin()
        .args(["sample", "--checkpoint", c, "--out"])
        .arg(&again)
        .arg("--x0")
        .arg(&x0)
        .args(adaptive)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_npy_values(&again), read_npy_values(&out));

    // likelihood, exact and Hutchinson, and the solver table
    let json = dir.join("ll.json");
    for extra in [&["--exact"][..], &["--hutchinson", "2"][..]] {
        let o = bin()
            .args([
                "likelihood",
                "--checkpoint",
                c,
                "--data",
                d,
                "--num-samples",
                "40",
                "--out",
            ])
            .arg(&json)
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        assert_eq!(r["num_points"], 40);
        assert!(r["nll_nats"].as_f64().unwrap().is_finite());
    }
    // --per-point: each point's log p, whose mean is minus the reported NLL
    let per_point = dir.join("logp.npy");
    let o = run(&[
        "likelihood",
        "--checkpoint",
        c,
        "--data",
        d,
        "--num-samples",
        "40",
        "--batch-size",
        "16",
        "--out",
        json.to_str().unwrap(),
        "--per-point",
        per_point.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log_p = read_npy_values(&per_point);
    assert_eq!(log_p.len(), 40);
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let mean = log_p.iter().sum::<f64>() / 40.0;
    assert!((mean + r["nll_nats"].as_f64().unwrap()).abs() < 1e-9);
    let o = run(&[
        "solvers",
        "--checkpoint",
        c,
        "--data",
        d,
        "--num-samples",
        "20",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("| Dopri5 |"));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn csv_data_is_accepted() {
    let dir = tmpdir("csv");
    let data = dir.join("p.csv");
    std::fs::write(&data, "x,y\n0,1\n1,0\n2,2\n").unwrap();
    let o = run(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        dir.join("r").to_str().unwrap(),
        "--steps",
        "3",
        "--hidden",
        "8",
        "--batch-size",
        "4",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_fails_cleanly() {
    let dir = tmpdir("bad");
    let out = dir.join("o");
    let o = out.to_str().unwrap();
    assert_clean_failure(
        &run(&["train", "--data", "nosuchset", "--out", o]),
        "neither a built-in",
    );
    assert_clean_failure(
        &run(&["train", "--data", "/no/such/file.npy", "--out", o]),
        "cannot read",
    );
    let junk = dir.join("junk.npy");
    std::fs::write(&junk, b"not an npy").unwrap();
    assert_clean_failure(
        &run(&["train", "--data", junk.to_str().unwrap(), "--out", o]),
        "not a valid .npy",
    );
    let nan = dir.join("nan.csv");
    std::fs::write(&nan, "1,2\nnan,3\n").unwrap();
    assert_clean_failure(
        &run(&["train", "--data", nan.to_str().unwrap(), "--out", o]),
        "NaN",
    );
    let empty = dir.join("empty.csv");
    std::fs::write(&empty, "").unwrap();
    assert_clean_failure(
        &run(&["train", "--data", empty.to_str().unwrap(), "--out", o]),
        "no data rows",
    );
    assert_clean_failure(
        &run(&["train", "--data", "moons", "--out", o, "--lr=-1"]),
        "lr",
    );
    assert_clean_failure(
        &run(&["train", "--data", "moons", "--out", o, "--sigma-min", "1.5"]),
        "sigma_min",
    );
    assert_clean_failure(
        &run(&["train", "--data", "moons", "--out", o, "--batch-size", "0"]),
        "batch size",
    );
    assert_clean_failure(
        &run(&["train", "--data", "moons", "--out", o, "--hidden", "0"]),
        "hidden",
    );
    assert_clean_failure(
        &run(&["train", "--data", "moons", "--out", o, "--steps", "ten"]),
        "invalid value",
    );
    assert_clean_failure(
        &run(&["sample", "--checkpoint", dir.to_str().unwrap()]),
        "checkpoint.json",
    );
    assert!(
        !out.join("checkpoint.json").exists(),
        "no checkpoint may be written by a failed run"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn corrupted_checkpoint_is_refused() {
    let dir = tmpdir("corrupt");
    let ck = dir.join("run");
    let c = ck.to_str().unwrap();
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--out",
        c,
        "--steps",
        "2",
        "--hidden",
        "8",
        "--batch-size",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ck.join("checkpoint.json")).unwrap()).unwrap();
    let w = ck.join(meta["weights_file"].as_str().unwrap());
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let out = dir.join("s.npy");
    let o = run(&["sample", "--checkpoint", c, "--out", out.to_str().unwrap()]);
    assert_clean_failure(&o, "checksum");
    assert!(!out.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn help_explains_the_commands() {
    let o = run(&["--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for word in ["demo", "train", "sample", "t = 0 is noise"] {
        assert!(text.contains(word), "{word} missing from --help: {text}");
    }
}

/// `--precision bf16` trains and samples through the bf16 products where the CPU has AVX-512 BF16,
/// says so in the checkpoint and the metrics, and elsewhere runs f32 with a note.
#[test]
fn bf16_demo_and_sampling() {
    let dir = tmpdir("bf16");
    let out = dir.join("demo");
    let o = run(&[
        "demo",
        "--steps",
        "300",
        "--num-samples",
        "500",
        "--precision",
        "bf16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let ck = std::fs::read_to_string(out.join("checkpoint.json")).unwrap();
    assert!(
        ck.contains("\"precision\": \"bf16\""),
        "the run's configuration records it"
    );
    let has_units = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .contains("avx512_bf16");
    let want = if has_units { "bf16" } else { "f32" };
    assert_eq!(metrics["precision"], want);
    if !has_units {
        assert!(stderr(&o).contains("has no AVX-512 BF16"), "{}", stderr(&o));
    }
    let samples = dir.join("s.npy");
    let o = run(&[
        "sample",
        "--checkpoint",
        out.to_str().unwrap(),
        "--num-samples",
        "100",
        "--precision",
        "bf16",
        "--out",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // Resuming with another precision is refused: a resumed run keeps its configuration.
    let o = run(&[
        "train",
        "--data",
        "checkerboard",
        "--resume",
        "--precision",
        "f32",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "--precision gives");
}

/// The schedules study end to end on 2-D data: every cell in results.json, the verdicts in the report,
/// and an interrupted run continued without training finished variants again.
#[test]
fn schedules_quick_smoke() {
    let dir = tmpdir("schedules");
    let out = dir.join("report");
    let args = [
        "schedules",
        "--quick",
        "--steps",
        "40",
        "--num-samples",
        "200",
        "--data",
        "moons",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let variants = r["variants"].as_array().unwrap();
    let names: Vec<&str> = variants
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["uniform", "logit-normal", "mode"],
        "no guidance on unlabelled data"
    );
    for v in variants {
        assert_eq!(
            v["cells"].as_array().unwrap().len(),
            3 * 2 * 4,
            "grids x solvers x NFE"
        );
    }
    assert_eq!(r["variants"][1]["time_sampling"]["kind"], "logit_normal");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for want in [
        "shift:3",
        "edm:7",
        "mode",
        "lowest energy distance per column",
    ] {
        assert!(md.contains(want), "{want} missing from the report:\n{md}");
    }
    for f in ["trainings.png", "grids.png", "samples-uniform.png"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let o = run(&args);
    assert_clean_failure(&o, "holds a schedules study already: --resume continues it");
    // An interrupted run: one variant's results gone; --resume trains only that one.
    std::fs::remove_file(out.join("results").join("mode.json")).unwrap();
    let o = run(&[&args[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("already measured").count(), 2);
    assert_eq!(stderr(&o).matches("schedules: training").count(), 1);
    let mut other = args.to_vec();
    other[3] = "41";
    let o = run(&[&other[..], &["--resume"]].concat());
    assert_clean_failure(
        &o,
        "was started with other settings (data moons, seed 0, 40 steps",
    );
}

/// The ablation end to end at a toy size: every file of the report is written and the report names all
/// five objectives.
#[test]
fn ablate_quick_smoke() {
    let dir = tmpdir("ablate");
    let out = dir.join("report");
    let args = [
        "ablate",
        "--preset",
        "quick",
        "--steps",
        "60",
        "--data",
        "moons",
        "--out",
        out.to_str().unwrap(),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = std::fs::read_to_string(out.join("results.json")).unwrap();
    // The folder holds a run now: a fresh run refuses it, --resume needs the same settings, and
    // resuming a finished run measures nothing again.
    let o = run(&args);
    assert_clean_failure(&o, "holds an ablation already: --resume continues it");
    let o = run(&[&args[..], &["--resume", "--seed", "1"]].concat());
    assert_clean_failure(&o, "was started with other settings (data moons, seed 0");
    let o = run(&[&args[..], &["--resume"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stderr(&o).matches("already measured").count(), 5);
    let again = std::fs::read_to_string(out.join("results.json")).unwrap();
    let without_seconds = |t: &str| -> String {
        t.lines()
            .filter(|l| !l.trim_start().starts_with("\"seconds\""))
            .collect()
    };
    assert_eq!(without_seconds(&again), without_seconds(&first));
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    for name in [
        "DDPM",
        "score matching",
        "ScoreFlow",
        "FM-diffusion",
        "FM-OT",
        "Reproduced",
    ] {
        assert!(md.contains(name), "{name} missing from the report");
    }
    for f in [
        "nfe-during-training.png",
        "error-vs-nfe.png",
        "samples-fm-ot.png",
        "marginal-paths-fm-ot.png",
        "results.json",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Images end to end: a class-conditional U-Net trained on IDX data, guided samples with a grid, the
/// classifier, and the FD / accuracy report; plus the errors a user meets on the way.
#[test]
fn images_train_sample_classify_and_evaluate() {
    let d = tmpdir("images");
    let data = d.join("fashion");
    std::fs::create_dir_all(&data).unwrap();
    fake_fashion(&data, "train", 64);
    fake_fashion(&data, "t10k", 32);
    let dd = data.to_str().unwrap();
    let ck = d.join("run");
    let o = run(&[
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
        "--unet",
        "tiny",
        "--base-channels",
        "8",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::read_to_string(ck.join("checkpoint.json")).unwrap();
    assert!(
        meta.contains("\"unet\"") && meta.contains("\"num_classes\": 10"),
        "{meta}"
    );

    let samples = d.join("s.npy");
    let grid = d.join("grid.png");
    let o = run(&[
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--num-samples",
        "4",
        "--steps",
        "2",
        "--guidance",
        "2",
        "--out",
        samples.to_str().unwrap(),
        "--grid",
        grid.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read_npy_len(&samples), 4 * 64);
    let stats = std::fs::read_to_string(d.join("s.stats.json")).unwrap();
    // Midpoint, 2 steps, guided: 2 stages x 2 steps x 2 evaluations.
    assert!(stats.contains("\"nfe\": 8"), "{stats}");
    assert!(std::fs::metadata(&grid).unwrap().len() > 50);
    // Guidance only for t in [0.5, 1]: of the 4 calls (t = 0, 0.25, 0.5, 0.75) two are guided.
    let o = run(&[
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--num-samples",
        "4",
        "--steps",
        "2",
        "--guidance",
        "2",
        "--guidance-interval",
        "0.5,1",
        "--out",
        samples.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = std::fs::read_to_string(d.join("s.stats.json")).unwrap();
    assert!(stats.contains("\"nfe\": 6"), "{stats}");
    assert!(stats.contains("guidance_interval"), "{stats}");

    let clf = d.join("clf.safetensors");
    let o = run(&[
        "classifier",
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--out",
        clf.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("test accuracy"));

    let report = d.join("eval");
    let o = run(&[
        "image-eval",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--classifier",
        clf.to_str().unwrap(),
        "--data-dir",
        dd,
        "--num-samples",
        "20",
        "--guidance",
        "0,2",
        "--steps",
        "2",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = std::fs::read_to_string(report.join("results.json")).unwrap();
    assert!(
        r.contains("fd_gaussian_vs_test") && r.contains("class_accuracy"),
        "{r}"
    );
    assert!(report.join("samples-w2.png").exists() && report.join("report.md").exists());

    // The five-way ablation on images: U-Net, FD at every budget, grids; adaptive solves capped to stay
    // fast (the report must say so), and a clear error without a classifier.
    let abl = d.join("ablate");
    let mut args = vec![
        "ablate",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
        "--preset",
        "quick",
        "--steps",
        "2",
        "--num-samples",
        "6",
        "--base-channels",
        "8",
        "--max-adaptive-steps",
        "3",
        "--out",
        abl.to_str().unwrap(),
    ];
    let o = run(&args);
    assert_clean_failure(&o, "--classifier");
    args.extend(["--classifier", clf.to_str().unwrap()]);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(abl.join("report.md")).unwrap();
    for want in [
        "U-Net",
        "FD @ 4 NFE",
        "bits/dim",
        "FM-OT",
        "ScoreFlow",
        "capped",
    ] {
        assert!(
            md.contains(want),
            "{want} missing from the image ablation report:\n{md}"
        );
    }
    assert!(
        !md.contains("conditional-paths"),
        "path figures are 2-D only"
    );
    for f in [
        "samples-fm-ot.png",
        "samples-ddpm.png",
        "nfe-during-training.png",
    ] {
        assert!(abl.join(f).exists(), "{f} missing");
    }

    // The schedules study on images: three time samplings, three grids, and the guidance comparison
    // on a class-conditional model at equal NFE budgets.
    let sched = d.join("schedules");
    let o = run(&[
        "schedules",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
        "--quick",
        "--steps",
        "2",
        "--num-samples",
        "6",
        "--classifier",
        clf.to_str().unwrap(),
        "--out",
        sched.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sched.join("results.json")).unwrap())
            .unwrap();
    let variants = r["variants"].as_array().unwrap();
    assert_eq!(
        variants.len(),
        4,
        "three time samplings and the conditional model"
    );
    let guided = variants[3]["guided"].as_array().unwrap();
    assert_eq!(guided.len(), 9, "three modes at three budgets");
    for c in guided {
        let (nfe, budget) = (c["nfe"].as_u64().unwrap(), c["budget"].as_u64().unwrap());
        assert!(nfe <= budget && 2 * nfe > budget, "{c}");
        let acc = c["accuracy"].as_f64().unwrap();
        assert!(
            (0.0..=1.0).contains(&acc) && c["fd"].as_f64().unwrap().is_finite(),
            "{c}"
        );
    }
    let md = std::fs::read_to_string(sched.join("report.md")).unwrap();
    for want in [
        "Guidance interval",
        "logit-normal",
        "edm:7",
        "Which option wins where",
    ] {
        assert!(
            md.contains(want),
            "{want} missing from the schedules report:\n{md}"
        );
    }
    assert!(sched.join("guidance.png").exists() && sched.join("samples-conditional.png").exists());

    // Errors: guidance out of range, a class that does not exist, guidance on a 2-D model, missing data.
    let o = run(&[
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--class",
        "12",
        "--num-samples",
        "2",
        "--out",
        samples.to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "class 12 does not exist");
    let o = run(&[
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        d.join("nowhere").to_str().unwrap(),
        "--steps",
        "1",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "apt-get install dataset-fashion-mnist");
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--model",
        "unet",
        "--steps",
        "1",
        "--out",
        d.join("y").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "needs image data");
    let o = run(&[
        "train",
        "--data",
        "fashion-mnist",
        "--data-dir",
        dd,
        "--label-dropout",
        "1.5",
        "--unet",
        "tiny",
        "--steps",
        "1",
        "--out",
        d.join("z").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "label dropout");
    let _ = std::fs::remove_dir_all(&d);
}

/// Couplings end to end at toy size: OT-coupled training from a data source, eval, one reflow round.
#[test]
fn coupling_source_eval_and_reflow() {
    let d = tmpdir("couple");
    let ck = d.join("ot");
    let c = ck.to_str().unwrap();
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--source",
        "8gaussians",
        "--coupling",
        "ot",
        "--steps",
        "20",
        "--hidden",
        "16",
        "--depth",
        "2",
        "--batch-size",
        "32",
        "--out",
        c,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::read_to_string(ck.join("checkpoint.json")).unwrap();
    assert!(
        meta.contains("\"source\": \"8gaussians\"") && meta.contains("\"kind\": \"ot\""),
        "{meta}"
    );
    let report = d.join("eval.json");
    let o = run(&[
        "eval",
        "--checkpoint",
        c,
        "--num-samples",
        "200",
        "--out",
        report.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = std::fs::read_to_string(&report).unwrap();
    assert!(
        r.contains("straightness") && r.contains("euler_steps"),
        "{r}"
    );
    let re = d.join("reflow");
    let o = run(&[
        "reflow",
        "--checkpoint",
        c,
        "--pairs",
        "100",
        "--solver-steps",
        "4",
        "--steps",
        "10",
        "--out",
        re.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta = std::fs::read_to_string(re.join("checkpoint.json")).unwrap();
    assert!(meta.contains("reflow pairs of") && meta.contains("\"kind\": \"independent\""));
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--coupling",
        "sinkhorn",
        "--sinkhorn-reg",
        "0",
        "--out",
        d.join("x").to_str().unwrap(),
    ]);
    assert_clean_failure(&o, "Sinkhorn regularisation");
    let _ = std::fs::remove_dir_all(&d);
}

/// Training-time sampling and sampling-time grids end to end: `train --time-sampling` is recorded in
/// checkpoint.json (and absent for uniform, so older checkpoints read as uniform), `sample
/// --time-grid` places the steps and is recorded in the statistics, and a grid changes the samples
/// from the same noise while keeping the NFE.
#[test]
fn time_sampling_and_time_grids() {
    let d = tmpdir("timesteps");
    let run_dir = d.join("ln");
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "30",
        "--hidden",
        "16",
        "--depth",
        "2",
        "--batch-size",
        "64",
        "--time-sampling",
        "logit-normal:0.5,1",
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("checkpoint.json")).unwrap()).unwrap();
    assert_eq!(
        meta["config"]["train"]["time_sampling"],
        serde_json::json!({"kind": "logit_normal", "m": 0.5, "s": 1.0})
    );
    let uniform = d.join("u");
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "2",
        "--hidden",
        "8",
        "--depth",
        "1",
        "--out",
        uniform.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(uniform.join("checkpoint.json")).unwrap();
    assert!(!text.contains("time_sampling"), "{text}");
    let sample = |grid: &str, out: &str| {
        let o = run(&[
            "sample",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--num-samples",
            "50",
            "--solver",
            "euler",
            "--steps",
            "6",
            "--time-grid",
            grid,
            "--out",
            d.join(out).to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let stats: serde_json::Value = serde_json::from_slice(
            &std::fs::read(d.join(out.replace(".npy", ".stats.json"))).unwrap(),
        )
        .unwrap();
        (read_npy_values(&d.join(out)), stats)
    };
    let (a, sa) = sample("uniform", "a.npy");
    let (b, sb) = sample("shift:3", "b.npy");
    assert_eq!(sa["stats"]["nfe"], sb["stats"]["nfe"]);
    assert_eq!(
        sb["time_grid"],
        serde_json::json!({"kind": "shift", "s": 3.0})
    );
    assert_ne!(a, b, "the grid did not change the steps");
    let _ = std::fs::remove_dir_all(&d);
}

/// `sample --as-scheduler`: an OT (sigma_min 0) model seen on its own scheduler gives its own samples;
/// seen on the cosine path it integrates other paths to samples of the same kind; the statistics say
/// which scheduler was used.
#[test]
fn sampling_on_another_scheduler() {
    let d = tmpdir("as-scheduler");
    let ck = d.join("ot");
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "200",
        "--hidden",
        "32",
        "--depth",
        "2",
        "--batch-size",
        "256",
        "--sigma-min",
        "0",
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let sample = |extra: &[&str], out: &str| {
        let mut args = vec![
            "sample",
            "--checkpoint",
            ck.to_str().unwrap(),
            "--num-samples",
            "200",
            "--steps",
            "20",
        ];
        args.extend(extra);
        let path = d.join(out);
        args.extend(["--out", path.to_str().unwrap()]);
        let o = run(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        read_npy_values(&path)
    };
    let own = sample(&[], "own.npy");
    let same = sample(&["--as-scheduler", "ot"], "same.npy");
    let gap = own
        .iter()
        .zip(&same)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        gap < 1e-4,
        "the OT model on its own scheduler moved by {gap}"
    );
    let cosine = sample(&["--as-scheduler", "cosine"], "cos.npy");
    assert!(cosine.iter().all(|v| v.is_finite()));
    let mean =
        |v: &[f64], k: usize| v.iter().skip(k).step_by(2).sum::<f64>() / (v.len() / 2) as f64;
    for k in 0..2 {
        assert!(
            (mean(&own, k) - mean(&cosine, k)).abs() < 0.2,
            "coordinate {k}"
        );
    }
    let stats = std::fs::read_to_string(d.join("cos.stats.json")).unwrap();
    assert!(stats.contains("\"as_scheduler\": \"cosine\""), "{stats}");
    let _ = std::fs::remove_dir_all(&d);
}

/// `sample --log-prob`: the log-densities of one joint solve equal what `likelihood` computes for the
/// same samples by integrating back.
#[test]
fn log_prob_while_sampling_matches_likelihood() {
    let d = tmpdir("log-prob");
    let ck = d.join("m");
    let o = run(&[
        "train",
        "--data",
        "moons",
        "--steps",
        "100",
        "--hidden",
        "32",
        "--depth",
        "2",
        "--batch-size",
        "256",
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let s = d.join("s.npy");
    let tol = ["--rtol", "1e-6", "--atol", "1e-6"];
    let mut args = vec![
        "sample",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--num-samples",
        "50",
        "--solver",
        "dopri5",
        "--log-prob",
        "--out",
        s.to_str().unwrap(),
    ];
    args.extend(tol);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let joint = read_npy_values(&d.join("s.logp.npy"));
    assert_eq!(joint.len(), 50);
    let back = d.join("back.npy");
    let mut args = vec![
        "likelihood",
        "--checkpoint",
        ck.to_str().unwrap(),
        "--data",
        s.to_str().unwrap(),
        "--exact",
        "--per-point",
        back.to_str().unwrap(),
    ];
    args.extend(tol);
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let back = read_npy_values(&back);
    for (a, b) in joint.iter().zip(&back) {
        assert!((a - b).abs() < 1e-3, "{a} vs {b}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

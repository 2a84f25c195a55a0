//! Memory bounds, checked before allocating: what a command is about to allocate (estimated from its
//! sizes) against what this process can get (the smallest of the memory the kernel reports available,
//! the address-space limit `ulimit -v` leaves, and the cgroup's limit). A command that would not fit is
//! refused with both figures and the flag to lower, instead of aborting in the allocator or being
//! killed by the OOM killer.

use anyhow::{bail, Result};
use flowmatching::coupling::Coupling;
use flowmatching::nn::ModelConfig;
use flowmatching::train::RunConfig;

/// Bytes of an f32.
const F32: u128 = 4;

/// Memory this process can still allocate, and what limits it.
pub fn available() -> (u128, &'static str) {
    let mut best = (u128::MAX, "no limit found");
    let mut consider = |bytes: Option<u128>, what: &'static str| {
        if let Some(b) = bytes {
            if b < best.0 {
                best = (b, what);
            }
        }
    };
    consider(meminfo_available(), "available memory (MemAvailable)");
    consider(address_space_left(), "the address-space limit (ulimit -v)");
    consider(cgroup_left(), "the cgroup memory limit");
    best
}

/// Refuses when `need` bytes for `what` do not fit in the available memory; `advice` says what to
/// change ("lower --num-samples").
pub fn check(need: u128, what: &str, advice: &str) -> Result<()> {
    let (have, limit) = available();
    if need > have {
        bail!(
            "{what} would need about {} of memory, more than the {} this process can use ({limit}); \
             {advice}",
            human(need),
            human(have)
        );
    }
    Ok(())
}

/// Training `config`: weights, gradients, EMA and the two AdamW moments; a batch's activations (on the
/// host only when the model runs on the CPU); the cost matrix of an OT or Sinkhorn coupling.
pub fn training_bytes(config: &RunConfig, on_cpu: bool) -> u128 {
    // A sequence model trains on crops: its activations are those of the crop length.
    let cropped;
    let m = match (&config.model, config.train.crop_frames) {
        (flowmatching::nn::ModelConfig::Transformer(c), Some(f)) => {
            let mut c = *c;
            c.max_frames = c.max_frames.min(f);
            cropped = flowmatching::nn::ModelConfig::Transformer(c);
            &cropped
        }
        (m, _) => m,
    };
    let batch = config.train.batch_size as u128;
    let params = (6 * F32).saturating_mul(m.approx_params());
    let data = (8 * F32 * m.dim() as u128).saturating_mul(batch);
    let coupling = match config.train.coupling {
        Coupling::Independent => 0,
        _ => (3 * 8 * batch).saturating_mul(batch),
    };
    let activations = if on_cpu {
        batch.saturating_mul(m.activation_bytes_per_sample())
    } else {
        0
    };
    params
        .saturating_add(data)
        .saturating_add(coupling)
        .saturating_add(activations)
}

/// Integrating `n` samples of `model`, `batch` at a time (`stages`: solver states kept per step), plus
/// `frames` recorded states of every sample; network activations on the host only when the model
/// runs on the CPU.
pub fn sampling_bytes(
    model: &ModelConfig,
    n: usize,
    batch: usize,
    stages: usize,
    frames: usize,
    on_cpu: bool,
) -> u128 {
    let dim = model.dim() as u128;
    let batch = batch.min(n) as u128;
    let outputs = (3 * F32 * dim)
        .saturating_mul(n as u128)
        .saturating_mul(1 + 2 * frames as u128);
    let states = (F32 * dim * (stages as u128 + 4)).saturating_mul(batch);
    let activations = if on_cpu {
        batch.saturating_mul(model.inference_bytes_per_sample())
    } else {
        0
    };
    outputs.saturating_add(states).saturating_add(activations)
}

/// Bytes as a person reads them (1.5 GB, 20 TB, ...).
pub fn human(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["bytes", "KB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} bytes")
    } else if v >= 1000.0 {
        format!("{v:.3e} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `MemAvailable` of /proc/meminfo.
fn meminfo_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The address-space limit less what the process already maps.
fn address_space_left() -> Option<u128> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmSize:"))?;
    let used: u128 = line.split_whitespace().nth(1)?.parse::<u128>().ok()? * 1024;
    Some((lim.rlim_cur as u128).saturating_sub(used))
}

/// cgroup v2: memory.max less what the cgroup uses, its reclaimable page cache (inactive_file of
/// memory.stat) not counted, for this process's cgroup.
fn cgroup_left() -> Option<u128> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u128 = read("memory.max")?.trim().parse().ok()?;
    let current: u128 = read("memory.current")?.trim().parse().ok()?;
    let cache: u128 = read("memory.stat")
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("inactive_file "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0);
    Some(max.saturating_sub(current.saturating_sub(cache)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_write_them() {
        assert_eq!(human(512), "512 bytes");
        assert_eq!(human(1_500_000_000), "1.5 GB");
        assert_eq!(human(16_000_000_000_000), "16.0 TB");
    }

    #[test]
    fn some_memory_is_available_and_absurd_needs_are_refused() {
        let (have, _) = available();
        assert!(have > 1 << 20);
        let e = check(1 << 100, "a test", "lower --nothing")
            .unwrap_err()
            .to_string();
        assert!(e.contains("lower --nothing"), "{e}");
        check(1024, "a test", "--nothing").unwrap();
    }
}

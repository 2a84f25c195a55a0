//! The arithmetic of matrix products, and what the CPU offers for it.
//!
//! [`Precision::Bf16`] is mixed precision as PyTorch's autocast does it: weights, optimizer state,
//! element-wise work, reductions and the loss stay f32; matrix products round their inputs to
//! bfloat16 and accumulate in f32. On the CPU it runs where AVX-512 BF16 is detected at run time
//! ([`CpuUnits::bf16_matmul`]); elsewhere products stay f32 and the commands say so.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How matrix products round their inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// f32 inputs and accumulation.
    #[default]
    F32,
    /// Inputs rounded to bfloat16 (nearest even), products accumulated in f32.
    Bf16,
}

impl Precision {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::Config(format!(
                "unknown precision {s:?}: use f32 or bf16"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The precision the CPU kernels run: bf16 only where the CPU has the units for it.
    pub fn on_this_cpu(self) -> Self {
        match self {
            Precision::Bf16 if cpu_units().bf16_matmul() => Precision::Bf16,
            _ => Precision::F32,
        }
    }
}

/// The CPU's model name and the units that matter for matrix products, detected at run time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuUnits {
    /// `model name` of /proc/cpuinfo ("unknown" elsewhere).
    pub model: String,
    pub avx2: bool,
    pub avx512f: bool,
    pub avx512_bf16: bool,
    /// Intel AMX tiles with bf16 (reported; the kernels do not use them yet).
    pub amx_bf16: bool,
}

impl CpuUnits {
    /// Whether the bf16 matrix kernel runs here (AVX-512 F and BF16).
    pub fn bf16_matmul(&self) -> bool {
        self.avx512f && self.avx512_bf16
    }

    /// "AMD EPYC (AVX-512, AVX-512 BF16)" style summary.
    pub fn describe(&self) -> String {
        let units: Vec<&str> = [
            (self.avx2, "AVX2"),
            (self.avx512f, "AVX-512"),
            (self.avx512_bf16, "AVX-512 BF16"),
            (self.amx_bf16, "AMX-BF16"),
        ]
        .iter()
        .filter_map(|&(has, name)| has.then_some(name))
        .collect();
        format!("{} ({})", self.model, units.join(", "))
    }
}

/// This machine's CPU.
pub fn cpu_units() -> CpuUnits {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let has_flag = |f: &str| flags.split_whitespace().any(|x| x == f);
    #[cfg(target_arch = "x86_64")]
    let (avx2, avx512f, avx512_bf16) = (
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        is_x86_feature_detected!("avx512f"),
        is_x86_feature_detected!("avx512bf16"),
    );
    #[cfg(not(target_arch = "x86_64"))]
    let (avx2, avx512f, avx512_bf16) = (false, false, false);
    CpuUnits {
        model: field("model name").unwrap_or_else(|| "unknown".into()),
        avx2,
        avx512f,
        avx512_bf16,
        amx_bf16: has_flag("amx_bf16"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for p in [Precision::F32, Precision::Bf16] {
            assert_eq!(Precision::parse(p.name()).unwrap(), p);
            let json = serde_json::to_string(&p).unwrap();
            assert_eq!(json, format!("\"{}\"", p.name()));
        }
        let e = Precision::parse("fp8").unwrap_err().to_string();
        assert!(e.contains("use f32 or bf16"), "{e}");
        // f32 is f32 everywhere; bf16 falls back to f32 exactly where the units are missing.
        assert_eq!(Precision::F32.on_this_cpu(), Precision::F32);
        let want = if cpu_units().bf16_matmul() {
            Precision::Bf16
        } else {
            Precision::F32
        };
        assert_eq!(Precision::Bf16.on_this_cpu(), want);
        assert!(cpu_units().describe().contains('('));
    }
}

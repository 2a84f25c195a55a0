//! `flowmatching-bench`: our side of the benchmarks in bench/ (bench/run.py times the PyTorch peers on
//! the same workloads, interleaved, and reports the ratios).

mod args;
mod ot;
mod workloads;

use clap::Parser;

// The same allocator and setting as the `flowmatching` command (see its main.rs), so that the
// benchmark times what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option in mimalloc v3's `mi_option_e` (checked by the command's tests).
const MI_OPTION_PURGE_DELAY: i32 = 15;

fn main() {
    // SAFETY: sets one of mimalloc's documented options (thread-safe); -1 means "never purge".
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) }
    // `FLOWMATCHING_CONV=cpu|candle|gemm-backward` picks the convolution for A/B comparisons.
    if let Ok(name) = std::env::var("FLOWMATCHING_CONV") {
        match flowmatching::nn::ConvImpl::from_name(&name) {
            Ok(c) => flowmatching::nn::set_conv_impl(Some(c)),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        }
    }
    let args = args::BenchArgs::parse();
    if let Err(e) = workloads::run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

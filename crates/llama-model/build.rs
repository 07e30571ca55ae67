//! With the `cuda` feature, compiles `kernels/*.cu` to PTX with nvcc (as
//! candle-kernels does); the driver JIT-compiles it on first use. CPU builds
//! never run nvcc.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=kernels");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // PTX for the oldest architecture asked for; the driver JIT-compiles it for the GPU it finds.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let src = PathBuf::from("kernels/llama.cu");
    let ptx = out_dir.join("llama.ptx");
    let status = Command::new(&nvcc)
        .arg("--ptx")
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .args(["-O3", "-std=c++17", "--use_fast_math", "-o"])
        .arg(&ptx)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!("running {nvcc} (the cuda feature needs the CUDA toolkit): {e}")
        });
    assert!(status.success(), "nvcc failed on {}", src.display());
}

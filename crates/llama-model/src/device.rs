//! Device and dtype selection from the strings users type (`cuda:1`, `bf16`).

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{ModelError, Result};

/// Where the model runs. `Cuda` and `Metal` need the matching cargo feature;
/// without it, asking for them is a clear error rather than a silent CPU fallback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Metal(usize),
}

impl FromStr for DeviceSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        let (kind, ordinal) = match lower.split_once(':') {
            Some((k, n)) => (
                k.to_string(),
                n.parse::<usize>()
                    .map_err(|_| ModelError::UnknownDevice(s.to_string()))?,
            ),
            None => (lower.clone(), 0),
        };
        match kind.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(ordinal)),
            "metal" | "mps" => Ok(DeviceSpec::Metal(ordinal)),
            _ => Err(ModelError::UnknownDevice(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl DeviceSpec {
    pub fn open(&self) -> Result<Device> {
        let unavailable = |message: String| ModelError::DeviceUnavailable {
            device: self.to_string(),
            message,
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(unavailable(
                        "this binary was built without the `cuda` feature".into(),
                    ));
                }
                // One dedicated stream for every thread (the engine runs on its
                // own): all work is ordered on it whichever thread launches it.
                let device =
                    Device::new_cuda_with_stream(*n).map_err(|e| unavailable(e.to_string()))?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(cuda) = &device {
                    let keep = std::env::var("LLAMA_CUDA_EVENT_TRACKING").is_ok_and(|v| v == "1");
                    if !keep {
                        // SAFETY: event tracking orders uses of a buffer across
                        // streams; with a single stream there is nothing to order,
                        // and its event records and waits cost several µs per
                        // launch, which at batch 1 is most of a step.
                        unsafe { cuda.disable_event_tracking() };
                    }
                }
                Ok(device)
            }
            DeviceSpec::Metal(n) => {
                if !candle_core::utils::metal_is_available() {
                    return Err(unavailable(
                        "this binary was built without the `metal` feature".into(),
                    ));
                }
                Device::new_metal(*n).map_err(|e| unavailable(e.to_string()))
            }
        }
    }
}

/// Compute dtype of weights and KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeSpec {
    F32,
    F16,
    BF16,
}

impl FromStr for DTypeSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "float" => Ok(DTypeSpec::F32),
            "f16" | "float16" | "half" => Ok(DTypeSpec::F16),
            "bf16" | "bfloat16" => Ok(DTypeSpec::BF16),
            _ => Err(ModelError::UnknownDType(s.to_string())),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DTypeSpec::F32 => "f32",
            DTypeSpec::F16 => "f16",
            DTypeSpec::BF16 => "bf16",
        })
    }
}

impl DTypeSpec {
    pub fn dtype(&self) -> DType {
        match self {
            DTypeSpec::F32 => DType::F32,
            DTypeSpec::F16 => DType::F16,
            DTypeSpec::BF16 => DType::BF16,
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        self.dtype().size_in_bytes()
    }
}

/// `(free, total)` bytes of the memory `device` allocates from: the GPU's
/// for CUDA, the machine's (MemAvailable, MemTotal) for the CPU. `None` where
/// it cannot be read (Metal, or no /proc).
pub fn memory_info(device: &Device) -> Option<(u64, u64)> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let field = |name: &str| -> Option<u64> {
                let line = info.lines().find(|l| l.starts_with(name))?;
                Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
            };
            Some((field("MemAvailable:")?, field("MemTotal:")?))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let stream = dev.cuda_stream();
            let (free, total) = stream.context().mem_get_info().ok()?;
            Some((free as u64, total as u64))
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_dtypes() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap(), DTypeSpec::BF16);
        assert!("f8".parse::<DTypeSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_feature_is_a_clear_error() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err();
        assert!(err.to_string().contains("cuda"), "{err}");
    }
}

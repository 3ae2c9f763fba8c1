//! Run-time device choice (`--device cpu|cuda:N`). The CPU backend is burn's flex; CUDA is
//! burn-cuda, compiled only with the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use crate::backend::GraftBackend;

/// A device named on the command line or in a config (`"cpu"`, `"cuda"`, `"cuda:N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(format!(
                    "unknown device '{s}' (expected cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

crate::serde_as_str!(DeviceSpec);

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

/// The CPU backend.
pub type Cpu = burn::backend::Flex;

/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Cuda = burn_cuda::Cuda;

/// Whether this build includes the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

impl DeviceSpec {
    /// # Errors
    /// When CUDA is asked for in a build without the `cuda` feature.
    pub fn check_available(self) -> Result<(), DeviceError> {
        match self {
            DeviceSpec::Cuda(_) if !CUDA_BUILT => Err(DeviceError::NotBuilt(self)),
            _ => Ok(()),
        }
    }
}

/// Work that runs on whichever backend a [`DeviceSpec`] names: [`run_on`] picks the backend
/// type once, so binaries never repeat the CPU/CUDA match.
pub trait OnDevice {
    type Output;
    /// Runs on backend `B` (the inner backend; training wraps it in `Autodiff` itself).
    fn run<B: GraftBackend>(self, device: B::Device) -> Self::Output
    where
        B::Device: Send + Sync;
}

/// A device this build cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "device '{0}' needs a build with CUDA support: rebuild with `cargo build --release --features cuda`"
    )]
    NotBuilt(DeviceSpec),
}

/// Runs `job` on the backend for `spec`.
///
/// # Errors
/// CUDA asked for in a build without the `cuda` feature.
pub fn run_on<J: OnDevice>(spec: DeviceSpec, job: J) -> Result<J::Output, DeviceError> {
    spec.check_available()?;
    match spec {
        DeviceSpec::Cpu => Ok(job.run::<Cpu>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Ok(job.run::<Cuda>(cuda_device(i))),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("check_available rejects cuda in builds without it"),
    }
}

/// The burn-cuda device for GPU `index`.
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> burn_cuda::CudaDevice {
    burn_cuda::CudaDevice::new(index)
}

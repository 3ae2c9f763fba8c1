//! Run-time device choice (`--device cpu|cuda:N|wgpu`). The CPU backend is burn's flex; CUDA is
//! burn-cuda, compiled only with the `cuda` feature; `wgpu` is burn-wgpu (Vulkan, Metal, DX12 or
//! WebGPU through wgpu), compiled only with the `wgpu` feature. Both GPU backends run the same
//! CubeCL kernels, so `wgpu` on Mesa's software Vulkan device (lavapipe) checks the GPU code
//! path on a machine without a GPU.

use std::fmt;
use std::str::FromStr;

use crate::backend::GraftBackend;

/// A device named on the command line or in a config (`"cpu"`, `"cuda"`, `"cuda:N"`, `"wgpu"`,
/// `"wgpu:N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    /// `None`: cubecl's default adapter (the most powerful one wgpu finds, a software device
    /// such as lavapipe where there is no GPU; `CUBECL_WGPU_DEFAULT_DEVICE` overrides it);
    /// `Some(i)`: the i-th discrete GPU.
    Wgpu(Option<usize>),
}

impl FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            "wgpu" => Ok(DeviceSpec::Wgpu(None)),
            _ => {
                let index = |prefix| s.strip_prefix(prefix).map(str::parse::<usize>);
                match (index("cuda:"), index("wgpu:")) {
                    (Some(Ok(i)), _) => Ok(DeviceSpec::Cuda(i)),
                    (_, Some(Ok(i))) => Ok(DeviceSpec::Wgpu(Some(i))),
                    _ => Err(format!(
                        "unknown device '{s}' (expected cpu, cuda, cuda:N, wgpu or wgpu:N)"
                    )),
                }
            }
        }
    }
}

crate::serde_as_str!(DeviceSpec);

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Wgpu(None) => f.write_str("wgpu"),
            DeviceSpec::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

/// The CPU backend.
pub type Cpu = burn::backend::Flex;

/// The CUDA backend.
#[cfg(feature = "cuda")]
pub type Cuda = burn_cuda::Cuda;

/// The CUDA backend's device.
#[cfg(feature = "cuda")]
pub type CudaDevice = burn_cuda::CudaDevice;

/// The wgpu backend.
#[cfg(feature = "wgpu")]
pub type Wgpu = burn_wgpu::Wgpu;

/// The wgpu backend's device.
#[cfg(feature = "wgpu")]
pub type WgpuDevice = burn_wgpu::WgpuDevice;

/// Whether this build includes the CUDA backend.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Whether this build includes the wgpu backend.
pub const WGPU_BUILT: bool = cfg!(feature = "wgpu");

impl DeviceSpec {
    /// # Errors
    /// When a GPU backend is asked for in a build without its feature.
    pub fn check_available(self) -> Result<(), DeviceError> {
        match self {
            DeviceSpec::Cuda(_) if !CUDA_BUILT => Err(DeviceError::NotBuilt(self, "cuda")),
            DeviceSpec::Wgpu(_) if !WGPU_BUILT => Err(DeviceError::NotBuilt(self, "wgpu")),
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
    /// The device and the cargo feature that builds its backend.
    #[error("device '{0}' needs a build with its backend: rebuild with `cargo build --release --features {1}`")]
    NotBuilt(DeviceSpec, &'static str),
}

/// Runs `job` on the backend for `spec`.
///
/// # Errors
/// A GPU backend asked for in a build without its feature.
pub fn run_on<J: OnDevice>(spec: DeviceSpec, job: J) -> Result<J::Output, DeviceError> {
    spec.check_available()?;
    match spec {
        DeviceSpec::Cpu => Ok(job.run::<Cpu>(Default::default())),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => Ok(job.run::<Cuda>(cuda_device(i))),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("check_available rejects cuda in builds without it"),
        #[cfg(feature = "wgpu")]
        DeviceSpec::Wgpu(i) => Ok(job.run::<Wgpu>(wgpu_device(i))),
        #[cfg(not(feature = "wgpu"))]
        DeviceSpec::Wgpu(_) => unreachable!("check_available rejects wgpu in builds without it"),
    }
}

/// The burn-cuda device for GPU `index`.
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> CudaDevice {
    configure_cubecl();
    CudaDevice::new(index)
}

/// The burn-wgpu device: cubecl's default adapter, or the `index`-th discrete GPU.
#[cfg(feature = "wgpu")]
pub fn wgpu_device(index: Option<usize>) -> WgpuDevice {
    configure_cubecl();
    match index {
        None => WgpuDevice::DefaultDevice,
        Some(i) => WgpuDevice::DiscreteGpu(i),
    }
}

/// Sets cubecl's runtime configuration before the first GPU device is made, keeping what the
/// user's `cubecl.toml` and `CUBECL_*` variables set otherwise:
///
/// - **One stream per device.** cubecl 0.10 gives each thread its own stream on a device and
///   orders their work itself. Used from several threads at once (tests in parallel; a
///   server's engine while an adapter is uploaded), that ordering gave wrong values on wgpu:
///   two threads each running tiny models got logits off by up to 5 where either alone matched
///   transformers to 1e-5, and one stream (`[streaming] max_streams = 1`) fixed it. graft's
///   device work is one ordered sequence of passes, so one stream costs it nothing.
/// - **Autotune results in graft's cache** (`$GRAFT_CACHE/cubecl`) where the config leaves
///   cubecl's default, which writes them under the `target/` of the nearest Cargo project
///   above the working directory.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn configure_cubecl() {
    use cubecl_runtime::config::cache::CacheConfig;
    use cubecl_runtime::config::{CubeClRuntimeConfig, RuntimeConfig};
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Read before taking the lock: reading the file does not touch the global.
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.streaming.max_streams = 1;
        if matches!(config.autotune.cache, CacheConfig::Target) {
            config.autotune.cache = CacheConfig::File(crate::cache::cache_dir().join("cubecl"));
        }
        let mut global = CubeClRuntimeConfig::storage().lock();
        if global.is_none() {
            *global = Some(std::sync::Arc::new(config));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse_and_print_back() {
        for (text, spec) in [
            ("cpu", DeviceSpec::Cpu),
            ("cuda:1", DeviceSpec::Cuda(1)),
            ("wgpu", DeviceSpec::Wgpu(None)),
            ("wgpu:2", DeviceSpec::Wgpu(Some(2))),
        ] {
            assert_eq!(text.parse::<DeviceSpec>(), Ok(spec));
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("cuda".parse::<DeviceSpec>(), Ok(DeviceSpec::Cuda(0)));
        for bad in ["gpu", "wgpu:", "wgpu:x", "cuda:-1", "vulkan"] {
            let e = bad.parse::<DeviceSpec>().expect_err(bad);
            assert!(
                e.contains(&format!("'{bad}'")) && e.contains("wgpu:N"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_backend_not_built_in_names_its_feature() {
        let wgpu = DeviceSpec::Wgpu(None).check_available();
        assert_eq!(wgpu.is_ok(), WGPU_BUILT);
        if let Err(e) = wgpu {
            assert!(e.to_string().contains("--features wgpu"), "{e}");
        }
        let cuda = DeviceSpec::Cuda(0).check_available();
        assert_eq!(cuda.is_ok(), CUDA_BUILT);
        if let Err(e) = cuda {
            assert!(e.to_string().contains("--features cuda"), "{e}");
        }
    }
}

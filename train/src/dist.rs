//! Data-parallel training over MPI, the launcher every cluster speaks (`mpirun`, Slurm's
//! `srun`, Kubeflow's MPIJob). Every rank holds the same adapter and optimizer state; each step
//! takes `N × gradient_accumulation_steps` micro-batches from the one seeded order, rank `r`
//! computes the gradients of micro-batches `r, r + N, …` normalized by the whole step's token
//! count, and a sum all-reduce gives every rank the gradient a single process accumulating all
//! of them would have (the LoRA gradients are small: megabytes, once per step). Clipping and
//! AdamW then run identically everywhere; only rank 0 writes the run directory.
//!
//! [`Group`] is the little the trainer needs from a communicator; [`Single`] is one process.
//! The MPI group is behind the `mpi` cargo feature (rsmpi, the Rust MPI bindings, over the
//! system's MPI library: OpenMPI or MPICH).

/// The processes training together.
pub trait Group {
    /// This process's index, 0 ..< size.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn size(&self) -> usize;
    /// Replaces `values` by their element-wise sum over all ranks.
    fn sum_f32(&self, values: &mut [f32]);
    /// Replaces `values` by their element-wise sum over all ranks.
    fn sum_f64(&self, values: &mut [f64]);
    /// Whether `fingerprint` is the same on every rank.
    fn all_equal(&self, fingerprint: u64) -> bool;

    /// Whether this rank writes the run directory, logs and reports.
    fn leads(&self) -> bool {
        self.rank() == 0
    }
}

/// One process alone.
pub struct Single;

impl Group for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) {}
    fn sum_f64(&self, _: &mut [f64]) {}
    fn all_equal(&self, _: u64) -> bool {
        true
    }
}

/// Environment variables an MPI launcher sets in each rank (OpenMPI's `mpirun`, PMI/PMIx for
/// MPICH's hydra and Slurm's `srun`).
const LAUNCHER_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"];

/// Why a data-parallel group cannot be formed.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error(
        "started by an MPI launcher ({0} is set) but this graft-train was built without the `mpi` \
         feature: each rank would train alone; build with `cargo build --release -p graft-train --features mpi`"
    )]
    NotBuiltWithMpi(&'static str),
    #[error("MPI could not be initialized (it was initialized before in this process)")]
    Init,
}

/// The group this process belongs to: MPI's world when an MPI launcher started it, else
/// [`Single`].
///
/// # Errors
/// Started by `mpirun` in a build without MPI, or MPI fails to initialize.
pub fn from_env() -> Result<Box<dyn Group>, DistError> {
    let launched = LAUNCHER_VARS
        .into_iter()
        .find(|v| std::env::var_os(v).is_some());
    match launched {
        None => Ok(Box::new(Single)),
        #[cfg(feature = "mpi")]
        Some(_) => Ok(Box::new(mpi_group::Mpi::init()?)),
        #[cfg(not(feature = "mpi"))]
        Some(var) => Err(DistError::NotBuiltWithMpi(var)),
    }
}

/// A 64-bit FNV-1a hash of the parameters' bits (to check that every rank holds the same
/// adapter).
pub fn fingerprint(params: &[Vec<f32>]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for v in params.iter().flatten() {
        for b in v.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

#[cfg(feature = "mpi")]
mod mpi_group {
    use mpi::collective::SystemOperation;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    use super::{DistError, Group};

    /// MPI's world communicator; finalizes MPI when dropped.
    pub struct Mpi {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    impl Mpi {
        pub fn init() -> Result<Self, DistError> {
            // Serialized: MPI is called from whichever thread trains, one call at a time.
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)
                .ok_or(DistError::Init)?;
            Ok(Self {
                world: universe.world(),
                _universe: universe,
            })
        }
    }

    impl Group for Mpi {
        fn rank(&self) -> usize {
            self.world.rank() as usize
        }
        fn size(&self) -> usize {
            self.world.size() as usize
        }
        fn sum_f32(&self, values: &mut [f32]) {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        fn sum_f64(&self, values: &mut [f64]) {
            let send = values.to_vec();
            self.world
                .all_reduce_into(&send[..], values, SystemOperation::sum());
        }
        fn all_equal(&self, fingerprint: u64) -> bool {
            let (mut lo, mut hi) = (0u64, 0u64);
            self.world
                .all_reduce_into(&fingerprint, &mut lo, SystemOperation::min());
            self.world
                .all_reduce_into(&fingerprint, &mut hi, SystemOperation::max());
            lo == hi
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_tell_parameters_apart_by_their_bits() {
        let a = vec![vec![1.0f32, 2.0], vec![3.0]];
        let mut b = a.clone();
        assert_eq!(fingerprint(&a), fingerprint(&b));
        b[1][0] = f32::from_bits(3.0f32.to_bits() + 1);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert!(Single.all_equal(7) && Single.leads() && Single.size() == 1);
    }
}

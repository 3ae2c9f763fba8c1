//! The trained values on the training device, and the only ways they cross to the host.
//!
//! A run keeps the adapter's A/B values, their summed gradients and AdamW's moments as tensors
//! of the model's device (the autodiff backend's inner backend) from the first step to the
//! last: micro-batches build their gradient leaves from them without a copy, gradients are
//! summed on the device, and the optimizer updates them there. Values go to the host only for
//! a checkpoint, the written adapter, or a data-parallel all-reduce, and come from it only at
//! the start (PEFT's initialization, or a checkpoint being resumed). Every such crossing goes
//! through [`Transfers`], which counts them, so a test can check that the count does not grow
//! with the number of micro-batches.

use std::sync::atomic::{AtomicUsize, Ordering};

use graft_core::burn::prelude::*;
use graft_core::burn::tensor::TensorData;

/// Tensors (one per A or B matrix, in optimizer order) on the device.
pub type Values<B> = Vec<Tensor<B, 2>>;

/// Counts of adapter-state tensors copied between host and device.
#[derive(Debug, Default)]
pub struct Transfers {
    to_device: AtomicUsize,
    to_host: AtomicUsize,
}

/// A snapshot of [`Transfers`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransferCounts {
    /// Tensors uploaded from the host.
    pub to_device: usize,
    /// Tensors read back to the host.
    pub to_host: usize,
}

/// A host vector whose length does not fit the tensor it is to become.
#[derive(Debug, thiserror::Error)]
#[error("'{name}' has {got} values, expected {want} (shape {shape:?})")]
pub struct ShapeMismatch {
    pub name: String,
    pub got: usize,
    pub want: usize,
    pub shape: [usize; 2],
}

impl Transfers {
    /// Uploads `host` values (named `names`, shaped `shapes`) to `device`.
    ///
    /// # Errors
    /// A vector's length is not its shape's size.
    pub fn upload<B: Backend>(
        &self,
        host: Vec<Vec<f32>>,
        names: &[String],
        shapes: &[[usize; 2]],
        device: &B::Device,
    ) -> Result<Values<B>, ShapeMismatch> {
        let out = host
            .into_iter()
            .zip(shapes)
            .zip(names)
            .map(|((v, &shape), name)| {
                if v.len() != shape[0] * shape[1] {
                    return Err(ShapeMismatch {
                        name: name.clone(),
                        got: v.len(),
                        want: shape[0] * shape[1],
                        shape,
                    });
                }
                Ok(Tensor::from_data(TensorData::new(v, shape), device))
            })
            .collect::<Result<Values<B>, _>>()?;
        self.to_device.fetch_add(out.len(), Ordering::Relaxed);
        Ok(out)
    }

    /// Reads `values` back to the host.
    pub fn download<B: Backend>(&self, values: &[Tensor<B, 2>]) -> Vec<Vec<f32>> {
        self.to_host.fetch_add(values.len(), Ordering::Relaxed);
        values
            .iter()
            .map(|t| {
                t.clone()
                    .into_data()
                    .convert::<f32>()
                    .to_vec::<f32>()
                    .expect("converted to f32")
            })
            .collect()
    }

    /// Records `to_device` tensors made on the host and uploaded by someone else (the
    /// adapter's initialization) and `to_host` read back by someone else (the PEFT writer).
    pub fn count(&self, to_device: usize, to_host: usize) {
        self.to_device.fetch_add(to_device, Ordering::Relaxed);
        self.to_host.fetch_add(to_host, Ordering::Relaxed);
    }

    pub fn counts(&self) -> TransferCounts {
        TransferCounts {
            to_device: self.to_device.load(Ordering::Relaxed),
            to_host: self.to_host.load(Ordering::Relaxed),
        }
    }
}

/// Scalars read back (per-sequence log-probability sums, squared-gradient sums), as f64.
pub fn to_f64<B: Backend>(t: Tensor<B, 1>) -> Vec<f64> {
    t.into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .expect("converted to f32")
        .into_iter()
        .map(f64::from)
        .collect()
}

/// The element-wise sums of each pair (on the device; `acc`'s buffers are reused where the
/// backend can).
pub fn add<B: Backend>(acc: Values<B>, more: Values<B>) -> Values<B> {
    acc.into_iter().zip(more).map(|(a, m)| a + m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_core::device::Cpu;

    #[test]
    fn crossings_are_counted_and_bad_lengths_named() {
        let t = Transfers::default();
        let dev = Default::default();
        let names = ["a".to_string(), "b".to_string()];
        let v = t
            .upload::<Cpu>(
                vec![vec![1.0; 6], vec![2.0; 2]],
                &names,
                &[[2, 3], [2, 1]],
                &dev,
            )
            .expect("fits");
        assert_eq!(t.download(&v), vec![vec![1.0; 6], vec![2.0; 2]]);
        let e = t
            .upload::<Cpu>(vec![vec![1.0; 5]], &names[..1], &[[2, 3]], &dev)
            .expect_err("5 values for 2×3");
        assert_eq!(e.to_string(), "'a' has 5 values, expected 6 (shape [2, 3])");
        assert_eq!(
            t.counts(),
            TransferCounts {
                to_device: 2,
                to_host: 2
            }
        );
    }
}

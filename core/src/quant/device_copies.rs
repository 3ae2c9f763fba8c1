//! A packed weight's storage as uploaded to accelerator devices: made by a GPU backend the
//! first time the weight meets that device, shared by every clone and row view of the weight
//! (they share its storage), and freed with the last of them. The CPU backend never makes one.

use std::any::Any;
use std::sync::{Arc, Mutex};

/// The device copies of one storage, each some backend's own type.
#[derive(Default)]
pub(crate) struct DeviceCopies(Mutex<Vec<Arc<dyn Any + Send + Sync>>>);

impl std::fmt::Debug for DeviceCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.lock().map_or(0, |v| v.len());
        write!(f, "DeviceCopies({n})")
    }
}

impl DeviceCopies {
    /// The copy of type `T` that `is_for` accepts (the one for a given device), made by `make`
    /// the first time. Two threads asking at once may both make one; the first stored wins.
    #[cfg(any(feature = "wgpu", feature = "cuda", test))]
    pub(crate) fn get_or_make<T: Any + Send + Sync>(
        &self,
        is_for: impl Fn(&T) -> bool,
        make: impl FnOnce() -> T,
    ) -> Arc<T> {
        let find = |v: &[Arc<dyn Any + Send + Sync>]| {
            v.iter()
                .filter_map(|c| Arc::clone(c).downcast::<T>().ok())
                .find(|c| is_for(c))
        };
        if let Some(c) = find(
            &self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        ) {
            return c;
        }
        // made outside the lock: an upload can take a while
        let made = Arc::new(make());
        let mut copies = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = find(&copies) {
            return c;
        }
        copies.push(made.clone());
        made
    }

    /// How many copies exist (one per device the weight has met).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.lock().map_or(0, |v| v.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_copy_per_device_made_once() {
        let copies = DeviceCopies::default();
        let mut made = 0;
        let a = copies.get_or_make(
            |c: &(u32, &str)| c.0 == 0,
            || {
                made += 1;
                (0u32, "first")
            },
        );
        let again = copies.get_or_make(|c: &(u32, &str)| c.0 == 0, || (0u32, "second"));
        assert_eq!((made, a.1, again.1), (1, "first", "first"));
        let other = copies.get_or_make(|c: &(u32, &str)| c.0 == 1, || (1u32, "other"));
        assert_eq!(other.1, "other");
        // another type is another backend's copy
        let f = copies.get_or_make(|_: &f32| true, || 2.5f32);
        assert_eq!((*f, copies.len()), (2.5, 3));
    }
}

//! Process-wide settings of the C heap for processes that train.
//!
//! A training step frees and allocates the same large buffers (activations, their gradients,
//! packed inputs) every step. With glibc's defaults a buffer above a sliding threshold (from
//! 128 KiB) is mapped fresh from the kernel and unmapped when freed, and free memory at the top
//! of the heap is handed back to the kernel as soon as it passes twice that threshold, so each
//! step pays page faults and zero-filled pages for memory it held a moment before: on
//! `resnet18` width ¼ at density 0.01 a sixth of the step went to the kernel's page-fault and
//! unmap paths and to zero-filling. [`keep_freed_memory`] keeps buffers below 32 MiB on the
//! heap and keeps up to 32 MiB of freed memory at its top (128 MiB measured no faster, and a
//! lower mapping threshold, 8 MiB, made `resnet18` width 1 slower: its activations are
//! larger). Peak RSS, the figure memory budgets are about, moves by a few MiB (`resnet18` ¼ at
//! d = 0.01: 92.8 → 94.5 MiB); what changes is that freed memory stays with the process for
//! its next step.
//!
//! `fedtiny-sim` and the coordinator apply the settings first thing in `main`; the client only
//! with `--keep-freed-memory`, since a client's resident memory is what its budget is about:
//! real client processes training the `cnn` peaked 14 MiB higher with them (dense 123.9 →
//! 138.3 MiB, FedTiny at d = 0.01 103.8 → 117.4 MiB). A lower trim threshold that kept the
//! clients' peak (8 MiB) made `resnet18` width 1 a third slower than glibc's defaults, whose
//! freed activations are larger than that.

use std::ffi::OsString;

/// Largest allocation served from the heap rather than by its own mapping.
pub const MMAP_THRESHOLD: usize = 32 << 20;

/// Free memory at the top of the heap kept rather than handed back to the kernel.
pub const TRIM_THRESHOLD: usize = 32 << 20;

/// Applies the settings above to this process's allocator (glibc on Linux; elsewhere there is
/// nothing to set), unless the environment already tunes it (glibc's `GLIBC_TUNABLES` with a
/// `glibc.malloc.` setting, or a `MALLOC_*_` variable): a setting made there wins. Call it once,
/// early in `main`. Returns whether the allocator took the settings.
pub fn keep_freed_memory() -> bool {
    if tuned_by_environment(std::env::vars_os()) {
        return false;
    }
    imp::keep_freed_memory()
}

/// Whether the variables tune glibc's allocator.
fn tuned_by_environment(vars: impl Iterator<Item = (OsString, OsString)>) -> bool {
    vars.into_iter().any(|(k, v)| {
        let (k, v) = (k.to_string_lossy(), v.to_string_lossy());
        (k == "GLIBC_TUNABLES" && v.contains("glibc.malloc."))
            || (k.starts_with("MALLOC_") && k.ends_with('_'))
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod imp {
    use super::{MMAP_THRESHOLD, TRIM_THRESHOLD};

    #[allow(unsafe_code)]
    pub(super) fn keep_freed_memory() -> bool {
        let (Ok(mmap), Ok(trim)) = (
            libc::c_int::try_from(MMAP_THRESHOLD),
            libc::c_int::try_from(TRIM_THRESHOLD),
        ) else {
            return false;
        };
        // SAFETY: `mallopt` only changes the allocator's tuning parameters; glibc serialises it
        // with allocations, and both values are within the ranges it accepts (it returns 0 and
        // changes nothing otherwise).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
mod imp {
    pub(super) fn keep_freed_memory() -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_in_the_environment_win() {
        let env = |pairs: &[(&str, &str)]| {
            let v: Vec<(OsString, OsString)> =
                pairs.iter().map(|(k, v)| (k.into(), v.into())).collect();
            tuned_by_environment(v.into_iter())
        };
        assert!(!env(&[("PATH", "/bin"), ("MALLOC", "x")]));
        assert!(!env(&[("GLIBC_TUNABLES", "glibc.rtld.nns=2")]));
        assert!(env(&[("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")]));
        assert!(env(&[("MALLOC_TRIM_THRESHOLD_", "1")]));
        assert!(env(&[
            ("MALLOC_ARENA_MAX", "2"),
            ("MALLOC_MMAP_THRESHOLD_", "1")
        ]));
    }

    #[test]
    fn glibc_takes_the_settings() {
        if tuned_by_environment(std::env::vars_os()) {
            return;
        }
        let glibc = cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(keep_freed_memory(), glibc);
        // Large buffers still allocate and free (from the heap now).
        let big = vec![1.0f32; (MMAP_THRESHOLD / 4) / 2];
        assert_eq!(big.iter().sum::<f32>(), big.len() as f32);
    }
}

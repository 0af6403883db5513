//! The process peak RSS can be reset, so that a later reading covers only what ran after the
//! reset (the experiment resets it at each run's start). Its own test binary: no other test
//! allocates alongside it.
#![allow(clippy::unwrap_used)]

use fedtiny_common::cost::{peak_rss_bytes, reset_peak_rss};

#[cfg(target_os = "linux")]
#[test]
fn a_reset_forgets_the_peak_of_memory_already_freed() {
    const MIB: u64 = 1 << 20;
    let before = peak_rss_bytes().unwrap();
    // 96 MiB, every page touched, then freed (a large allocation goes back to the OS).
    let mut big = vec![0u8; 96 << 20];
    for i in (0..big.len()).step_by(4096) {
        big[i] = 1;
    }
    std::hint::black_box(&big);
    drop(big);
    let peak = peak_rss_bytes().unwrap();
    assert!(peak >= before + 90 * MIB, "{before} → {peak}");
    assert!(reset_peak_rss(), "the OS refused the reset");
    let after = peak_rss_bytes().unwrap();
    assert!(after + 80 * MIB < peak, "{peak} → {after} after the reset");
}

//! Chunking and reassembly: random chunk sizes, retried repeats, the fetch path, and arbitrary
//! push sequences.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

use fedtiny_proto::chunk::{ChunkError, Reassembly, chunk_at, chunks, crc32};
use proptest::prelude::*;

proptest! {
    #[test]
    fn random_chunk_sizes_with_retries_reassemble(
        payload in prop::collection::vec(any::<u8>(), 0..5000),
        sizes in prop::collection::vec(1usize..700, 1..40),
        retries in prop::collection::vec(any::<bool>(), 1..40),
    ) {
        let mut r = Reassembly::new(payload.len() as u64, crc32(&payload), 5000).unwrap();
        let mut offset = 0usize;
        let mut k = 0usize;
        while offset < payload.len() {
            let size = sizes[k % sizes.len()];
            let end = (offset + size).min(payload.len());
            let data = &payload[offset..end];
            r.push(offset as u64, data).unwrap();
            if retries[k % retries.len()] {
                // The acknowledgement was lost and the client sends the same chunk again.
                r.push(offset as u64, data).unwrap();
                prop_assert_eq!(r.received_bytes(), end as u64);
            }
            offset = end;
            k += 1;
        }
        prop_assert!(r.is_complete());
        prop_assert_eq!(r.finish().unwrap(), payload);
    }

    #[test]
    fn chunks_helper_round_trips(
        payload in prop::collection::vec(any::<u8>(), 0..5000),
        max_chunk in 1usize..2000,
    ) {
        let mut r = Reassembly::new(payload.len() as u64, crc32(&payload), 1 << 20).unwrap();
        for (offset, data) in chunks(&payload, max_chunk) {
            prop_assert!(data.len() <= max_chunk);
            r.push(offset, data).unwrap();
        }
        prop_assert_eq!(r.finish().unwrap(), payload);
    }

    #[test]
    fn fetching_with_varying_sizes_round_trips(
        payload in prop::collection::vec(any::<u8>(), 1..5000),
        first in 1usize..3000,
        sizes in prop::collection::vec(1usize..900, 1..20),
    ) {
        // The task header carries the first chunk; the client fetches the rest from where its
        // reassembly ends, with whatever size the server grants.
        let mut r = Reassembly::new(payload.len() as u64, crc32(&payload), 1 << 20).unwrap();
        r.push(0, chunk_at(&payload, 0, first).unwrap()).unwrap();
        let mut k = 0;
        while !r.is_complete() {
            let data = chunk_at(&payload, r.received_bytes(), sizes[k % sizes.len()]).unwrap();
            r.push(r.received_bytes(), data).unwrap();
            k += 1;
        }
        prop_assert_eq!(r.finish().unwrap(), payload);
    }

    #[test]
    fn arbitrary_push_sequences_never_panic(
        len in 0u64..300,
        pushes in prop::collection::vec((0u64..400, prop::collection::vec(any::<u8>(), 0..80)), 0..20),
    ) {
        let mut r = Reassembly::new(len, 0, 256).ok();
        if let Some(r) = r.as_mut() {
            for (offset, data) in &pushes {
                let before = r.received_bytes();
                if r.push(*offset, data).is_err() {
                    prop_assert_eq!(r.received_bytes(), before);
                }
                prop_assert!(r.received_bytes() <= len);
            }
        }
        if let Some(r) = r {
            match r.finish() {
                Ok(bytes) => {
                    prop_assert_eq!(bytes.len() as u64, len);
                    prop_assert_eq!(crc32(&bytes), 0);
                }
                Err(e) => {
                    let expected =
                        matches!(e, ChunkError::Incomplete { .. } | ChunkError::CrcMismatch { .. });
                    prop_assert!(expected, "unexpected error {:?}", e);
                }
            }
        } else {
            prop_assert!(len > 256);
        }
    }

    #[test]
    fn a_corrupted_chunk_fails_the_crc(
        payload in prop::collection::vec(any::<u8>(), 1..3000),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let mut corrupt = payload.clone();
        corrupt[at.index(payload.len())] ^= xor;
        let mut r = Reassembly::new(payload.len() as u64, crc32(&payload), 1 << 20).unwrap();
        for (offset, data) in chunks(&corrupt, 512) {
            r.push(offset, data).unwrap();
        }
        let is_crc_mismatch = matches!(r.finish(), Err(ChunkError::CrcMismatch { .. }));
        prop_assert!(is_crc_mismatch);
    }
}

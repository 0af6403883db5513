//! Splitting payloads into chunks and reassembling them under size limits.
//!
//! Task and result payloads can be far larger than one gRPC message (tonic refuses messages over
//! 4 MiB unless both ends raise the limit), so they travel as byte ranges addressed by offset.
//! The receiver knows the total length and CRC-32 up front (from the task header or the submit
//! request) and accepts the ranges strictly in order through a [`Reassembly`].
//!
//! Decisions:
//! - Chunks must arrive in order, without gaps or overlaps. Calls are retried, so an exact
//!   repeat of the last chunk is accepted and ignored; a repeat with different bytes is an error.
//! - The expected length is checked against a maximum before anything is allocated, and no chunk
//!   may reach past the expected length.
//! - The CRC is IEEE CRC-32 (the zlib/PNG one), computed incrementally as chunks arrive.

/// A chunk size that stays well under tonic's default 4 MiB message limit.
pub const DEFAULT_MAX_CHUNK_BYTES: usize = 1 << 20;

/// Why a chunk or a reassembled payload was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The announced payload is larger than the receiver accepts.
    #[error("payload of {expected_len} bytes exceeds the limit of {max_total}")]
    TooLarge {
        /// The announced length.
        expected_len: u64,
        /// The receiver's limit.
        max_total: u64,
    },
    /// A chunk starts after the end of what was received (a chunk is missing).
    #[error("chunk at offset {offset} leaves a gap: {received} bytes received so far")]
    Gap {
        /// The chunk's offset.
        offset: u64,
        /// Bytes received so far.
        received: u64,
    },
    /// A chunk starts before the end of what was received and is not a repeat of the last chunk.
    #[error("chunk of {len} bytes at offset {offset} overlaps the {received} bytes received")]
    Overlap {
        /// The chunk's offset.
        offset: u64,
        /// The chunk's length.
        len: u64,
        /// Bytes received so far.
        received: u64,
    },
    /// A repeat of the last chunk whose bytes differ from the first time.
    #[error("chunk at offset {offset} was sent again with different bytes")]
    ConflictingRepeat {
        /// The chunk's offset.
        offset: u64,
    },
    /// A chunk reaches past the announced payload length.
    #[error(
        "chunk of {len} bytes at offset {offset} reaches past the payload's {expected_len} bytes"
    )]
    PastEnd {
        /// The chunk's offset.
        offset: u64,
        /// The chunk's length.
        len: u64,
        /// The announced length.
        expected_len: u64,
    },
    /// A chunk without bytes.
    #[error("empty chunk at offset {offset}")]
    Empty {
        /// The chunk's offset.
        offset: u64,
    },
    /// A requested range starts past the end of the payload.
    #[error("offset {offset} is past the payload's {len} bytes")]
    OffsetOutOfRange {
        /// The requested offset.
        offset: u64,
        /// The payload's length.
        len: u64,
    },
    /// The payload was finished before all of it arrived.
    #[error("payload incomplete: {received} of {expected_len} bytes")]
    Incomplete {
        /// Bytes received.
        received: u64,
        /// The announced length.
        expected_len: u64,
    },
    /// The reassembled payload does not have the announced CRC-32.
    #[error("payload CRC-32 is {actual:#010x}, expected {expected:#010x}")]
    CrcMismatch {
        /// The announced CRC-32.
        expected: u32,
        /// The CRC-32 of the bytes received.
        actual: u32,
    },
}

/// The byte ranges of `payload` in chunks of at most `max_chunk` bytes (at least 1), as
/// `(offset, bytes)`. An empty payload has no chunks.
pub fn chunks(payload: &[u8], max_chunk: usize) -> impl Iterator<Item = (u64, &[u8])> + '_ {
    let size = max_chunk.max(1);
    payload
        .chunks(size)
        .enumerate()
        .map(move |(i, c)| ((i * size) as u64, c))
}

/// The range a `FetchChunk` call asks for: at most `max_bytes` (at least 1) from `offset`. An
/// offset at the end of the payload gives an empty range; past it, an error.
pub fn chunk_at(payload: &[u8], offset: u64, max_bytes: usize) -> Result<&[u8], ChunkError> {
    let len = payload.len() as u64;
    let rest = usize::try_from(offset)
        .ok()
        .and_then(|start| payload.get(start..))
        .ok_or(ChunkError::OffsetOutOfRange { offset, len })?;
    Ok(&rest[..rest.len().min(max_bytes.max(1))])
}

/// Reassembles a payload of known length and CRC-32 from in-order chunks.
#[derive(Clone, Debug)]
pub struct Reassembly {
    expected_len: u64,
    crc32: u32,
    max_total: u64,
    received: Vec<u8>,
    /// Offset and length of the last chunk accepted, to recognise a retried repeat.
    last: Option<(usize, usize)>,
    crc: Crc32,
}

impl Reassembly {
    /// Starts reassembling a payload of `expected_len` bytes with CRC-32 `crc32`. Fails if the
    /// length exceeds `max_total`.
    pub fn new(expected_len: u64, crc32: u32, max_total: u64) -> Result<Self, ChunkError> {
        let too_large = ChunkError::TooLarge {
            expected_len,
            max_total,
        };
        if expected_len > max_total {
            return Err(too_large);
        }
        let len = usize::try_from(expected_len).map_err(|_| too_large)?;
        Ok(Reassembly {
            expected_len,
            crc32,
            max_total,
            received: Vec::with_capacity(len.min(4 * DEFAULT_MAX_CHUNK_BYTES)),
            last: None,
            crc: Crc32::new(),
        })
    }

    /// Accepts the chunk at `offset`: it must start where the received bytes end and not reach
    /// past the expected length; an exact repeat of the last chunk is accepted and ignored.
    pub fn push(&mut self, offset: u64, data: &[u8]) -> Result<(), ChunkError> {
        let received = self.received.len() as u64;
        let len = data.len() as u64;
        if data.is_empty() {
            return Err(ChunkError::Empty { offset });
        }
        if offset > received {
            return Err(ChunkError::Gap { offset, received });
        }
        if offset < received {
            return match self.last {
                Some((start, n)) if start as u64 == offset && n == data.len() => {
                    if self.received.get(start..start + n) == Some(data) {
                        Ok(())
                    } else {
                        Err(ChunkError::ConflictingRepeat { offset })
                    }
                }
                _ => Err(ChunkError::Overlap {
                    offset,
                    len,
                    received,
                }),
            };
        }
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.expected_len)
        {
            return Err(ChunkError::PastEnd {
                offset,
                len,
                expected_len: self.expected_len,
            });
        }
        self.last = Some((self.received.len(), data.len()));
        self.received.extend_from_slice(data);
        self.crc.update(data);
        Ok(())
    }

    /// Bytes received so far (where the next chunk starts).
    pub fn received_bytes(&self) -> u64 {
        self.received.len() as u64
    }

    /// The announced payload length.
    pub fn expected_len(&self) -> u64 {
        self.expected_len
    }

    /// The announced CRC-32.
    pub fn expected_crc32(&self) -> u32 {
        self.crc32
    }

    /// The limit this reassembly was created with.
    pub fn max_total(&self) -> u64 {
        self.max_total
    }

    /// Whether every byte has arrived.
    pub fn is_complete(&self) -> bool {
        self.received_bytes() == self.expected_len
    }

    /// The payload, once complete and with the announced CRC-32.
    pub fn finish(self) -> Result<Vec<u8>, ChunkError> {
        if !self.is_complete() {
            return Err(ChunkError::Incomplete {
                received: self.received_bytes(),
                expected_len: self.expected_len,
            });
        }
        let actual = self.crc.finish();
        if actual != self.crc32 {
            return Err(ChunkError::CrcMismatch {
                expected: self.crc32,
                actual,
            });
        }
        Ok(self.received)
    }
}

/// The IEEE CRC-32 (reflected polynomial `0xEDB88320`, as in zlib) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(data);
    c.finish()
}

/// An incremental IEEE CRC-32.
#[derive(Clone, Copy, Debug)]
pub struct Crc32 {
    state: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        Crc32::new()
    }
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 == 1 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

impl Crc32 {
    /// A CRC of no bytes yet.
    pub fn new() -> Self {
        Crc32 { state: !0 }
    }

    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        for &b in data {
            self.state =
                CRC_TABLE[((self.state ^ u32::from(b)) & 0xFF) as usize] ^ (self.state >> 8);
        }
    }

    /// The CRC of the bytes fed so far.
    pub fn finish(&self) -> u32 {
        !self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_test_vectors() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
        let mut c = Crc32::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xCBF4_3926);
    }

    #[test]
    fn chunks_cover_the_payload() {
        let p: Vec<u8> = (0..10).collect();
        let c: Vec<(u64, Vec<u8>)> = chunks(&p, 4).map(|(o, d)| (o, d.to_vec())).collect();
        assert_eq!(
            c,
            [
                (0, vec![0, 1, 2, 3]),
                (4, vec![4, 5, 6, 7]),
                (8, vec![8, 9])
            ]
        );
        assert_eq!(chunks(&[], 4).count(), 0);
        assert_eq!(chunks(&p, 0).count(), 10);
    }

    #[test]
    fn chunk_at_serves_ranges() {
        let p: Vec<u8> = (0..10).collect();
        assert_eq!(chunk_at(&p, 8, 4).unwrap(), [8, 9]);
        assert_eq!(chunk_at(&p, 2, 3).unwrap(), [2, 3, 4]);
        assert!(chunk_at(&p, 10, 3).unwrap().is_empty());
        assert_eq!(
            chunk_at(&p, 11, 3),
            Err(ChunkError::OffsetOutOfRange {
                offset: 11,
                len: 10
            })
        );
        assert!(chunk_at(&p, u64::MAX, 3).is_err());
    }

    #[test]
    fn reassembly_refuses_what_it_must() {
        let p: Vec<u8> = (0..10).collect();
        let crc = crc32(&p);
        assert_eq!(
            Reassembly::new(11, crc, 10).unwrap_err(),
            ChunkError::TooLarge {
                expected_len: 11,
                max_total: 10
            }
        );
        let mut r = Reassembly::new(10, crc, 10).unwrap();
        assert_eq!(r.push(0, &[]), Err(ChunkError::Empty { offset: 0 }));
        assert_eq!(
            r.push(4, &p[4..]),
            Err(ChunkError::Gap {
                offset: 4,
                received: 0
            })
        );
        r.push(0, &p[..4]).unwrap();
        r.push(0, &p[..4]).unwrap(); // a retried repeat
        assert_eq!(
            r.push(0, &[9, 9, 9, 9]),
            Err(ChunkError::ConflictingRepeat { offset: 0 })
        );
        assert!(matches!(
            r.push(2, &p[2..6]),
            Err(ChunkError::Overlap { .. })
        ));
        assert!(matches!(
            r.push(0, &p[..2]),
            Err(ChunkError::Overlap { .. })
        ));
        assert!(matches!(
            r.push(4, &[0; 7]),
            Err(ChunkError::PastEnd { .. })
        ));
        assert_eq!(r.received_bytes(), 4);
        assert!(matches!(
            r.clone().finish(),
            Err(ChunkError::Incomplete { received: 4, .. })
        ));
        r.push(4, &p[4..]).unwrap();
        r.push(4, &p[4..]).unwrap();
        assert!(r.is_complete());
        assert_eq!(r.finish().unwrap(), p);

        let mut bad = Reassembly::new(10, crc ^ 1, 10).unwrap();
        bad.push(0, &p).unwrap();
        assert!(matches!(bad.finish(), Err(ChunkError::CrcMismatch { .. })));

        assert_eq!(Reassembly::new(0, 0, 0).unwrap().finish().unwrap(), b"");
    }
}

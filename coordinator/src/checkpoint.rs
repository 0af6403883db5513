//! Checkpoints and model files, written atomically and verified on load.
//!
//! File layout: the 8-byte magic, a little-endian `u64` payload length, a little-endian `u32`
//! CRC-32 of the payload, then the payload, encoded with bincode 2 (this is the only module that
//! uses bincode, so the encoding can be swapped here alone). A file is written to a temporary
//! name, synced, then renamed over the target, so a crash never leaves a half-written
//! checkpoint; a truncated or corrupt file fails the length or CRC check and is refused before
//! any of it is used.
//!
//! Randomness needs no saved generator state: every random choice is derived from the run seed
//! and the round (client sampling, client training seeds), so the round number *is* the RNG
//! state.

use std::io::Write;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{CoordinatorError, Result};
use crate::global::GlobalModel;
use crate::metrics::RoundMetrics;

const CHECKPOINT_MAGIC: &[u8; 8] = b"FTCKPT01";
const MODEL_MAGIC: &[u8; 8] = b"FTMODEL1";
const HEADER: usize = 8 + 8 + 4;

/// Everything a run needs to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The run's resolved config (TOML), to refuse resuming a different run.
    pub config_toml: String,
    /// Rounds completed; the run resumes at `rounds_done + 1`.
    pub rounds_done: u64,
    /// The global model, masks and their version included.
    pub global: GlobalModel,
    /// Metrics of the completed rounds.
    pub history: Vec<RoundMetrics>,
    /// The strategy's own state (JSON text).
    pub strategy_state: String,
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
}

fn write_framed(path: &Path, magic: &[u8; 8], value: &impl Serialize) -> Result<()> {
    let payload = bincode::serde::encode_to_vec(value, bincode_config()).map_err(|e| {
        CoordinatorError::Checkpoint {
            path: path.to_path_buf(),
            message: format!("encoding: {e}"),
        }
    })?;
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(magic);
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    buf.extend_from_slice(&payload);
    let tmp = path.with_extension("tmp");
    let io = |e| CoordinatorError::io(&tmp, e);
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(&buf).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| CoordinatorError::io(path, e))
}

fn read_framed<T: DeserializeOwned>(path: &Path, magic: &[u8; 8]) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| CoordinatorError::io(path, e))?;
    let bad = |m: String| CoordinatorError::Checkpoint {
        path: path.to_path_buf(),
        message: m,
    };
    if bytes.len() < HEADER {
        return Err(bad(format!(
            "truncated: {} bytes, header needs {HEADER}",
            bytes.len()
        )));
    }
    if &bytes[..8] != magic {
        return Err(bad("not a fedtiny file of this kind (wrong magic)".into()));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[8..16]);
    let len = u64::from_le_bytes(len8);
    let mut crc4 = [0u8; 4];
    crc4.copy_from_slice(&bytes[16..20]);
    let crc = u32::from_le_bytes(crc4);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        return Err(bad(format!(
            "truncated or padded: payload is {} bytes, header says {len}",
            payload.len()
        )));
    }
    if crc32fast::hash(payload) != crc {
        return Err(bad("corrupt: CRC-32 mismatch".into()));
    }
    let (value, used) = bincode::serde::decode_from_slice(payload, bincode_config())
        .map_err(|e| bad(format!("decoding: {e}")))?;
    if used != payload.len() {
        return Err(bad("trailing bytes after the payload".into()));
    }
    Ok(value)
}

/// Writes a checkpoint atomically.
pub fn save(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    write_framed(path, CHECKPOINT_MAGIC, checkpoint)
}

/// Reads and verifies a checkpoint.
pub fn load(path: &Path) -> Result<Checkpoint> {
    read_framed(path, CHECKPOINT_MAGIC)
}

/// Exports a model (architecture, state and masks) atomically.
pub fn save_model(path: &Path, model: &GlobalModel) -> Result<()> {
    write_framed(path, MODEL_MAGIC, model)
}

/// Reads and verifies an exported model.
pub fn load_model(path: &Path) -> Result<GlobalModel> {
    read_framed(path, MODEL_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedtiny_common::models::{Arch, ModelSpec};

    fn sample() -> Checkpoint {
        let spec = ModelSpec::new(Arch::Cnn, [28, 28, 1], 10, 0.25).unwrap();
        Checkpoint {
            config_toml: "seed = 1".into(),
            rounds_done: 2,
            global: GlobalModel::initial(&spec, 3).unwrap(),
            history: Vec::new(),
            strategy_state: "null".into(),
        }
    }

    #[test]
    fn round_trip_and_every_kind_of_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt.bin");
        let c = sample();
        save(&path, &c).unwrap();
        assert_eq!(load(&path).unwrap(), c);
        let good = std::fs::read(&path).unwrap();

        let damaged = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            load(&path).unwrap_err().to_string()
        };
        assert!(damaged(&good[..good.len() / 2]).contains("truncated"));
        assert!(damaged(&good[..10]).contains("truncated"));
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(damaged(&flipped).contains("CRC"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(damaged(&magic).contains("magic"));
        // A model file is not a checkpoint.
        save_model(&path, &c.global).unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("magic"));
        assert_eq!(load_model(&path).unwrap(), c.global);
        assert!(!dir.path().join("ckpt.tmp").exists());
    }
}

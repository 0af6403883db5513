//! Binary masks over prunable tensors.
//!
//! A [`Mask`] is a packed bit vector with the element count of its tensor; a set bit keeps the
//! weight. A [`MaskSet`] names the masks of a model (by the weight's dotted name) and carries a
//! version that grows by one every time the set changes, so that peers can tell whether they hold
//! the current masks without comparing them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A packed bit mask: bit `i` set means element `i` is active (kept).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mask {
    len: usize,
    words: Vec<u64>,
    active: usize,
}

impl Mask {
    /// A mask of `len` elements, all active.
    pub fn ones(len: usize) -> Self {
        let mut words = vec![u64::MAX; len.div_ceil(64)];
        if !len.is_multiple_of(64)
            && let Some(last) = words.last_mut()
        {
            *last = (1u64 << (len % 64)) - 1;
        }
        Mask {
            len,
            words,
            active: len,
        }
    }

    /// A mask of `len` elements, none active.
    pub fn zeros(len: usize) -> Self {
        Mask {
            len,
            words: vec![0; len.div_ceil(64)],
            active: 0,
        }
    }

    /// A mask from a predicate over element indices.
    pub fn from_fn(len: usize, mut keep: impl FnMut(usize) -> bool) -> Self {
        let mut m = Mask::zeros(len);
        for i in 0..len {
            if keep(i) {
                m.words[i / 64] |= 1 << (i % 64);
                m.active += 1;
            }
        }
        m
    }

    /// A mask whose active elements are exactly `indices` (any order, duplicates rejected).
    pub fn from_indices(len: usize, indices: &[usize]) -> Result<Self> {
        let mut m = Mask::zeros(len);
        for &i in indices {
            if i >= len {
                return Err(Error::InvalidConfig(format!(
                    "mask index {i} out of range for {len} elements"
                )));
            }
            if m.get(i) {
                return Err(Error::InvalidConfig(format!("duplicate mask index {i}")));
            }
            m.set(i, true);
        }
        Ok(m)
    }

    /// A mask from packed little-endian words (bit `i` of the stream is element `i`). Bits past
    /// `len` must be zero.
    pub fn from_words(len: usize, words: Vec<u64>) -> Result<Self> {
        if words.len() != len.div_ceil(64) {
            return Err(Error::InvalidConfig(format!(
                "mask of {len} elements needs {} words, got {}",
                len.div_ceil(64),
                words.len()
            )));
        }
        if !len.is_multiple_of(64)
            && let Some(&last) = words.last()
            && last >> (len % 64) != 0
        {
            return Err(Error::InvalidConfig(
                "mask has bits set past its length".into(),
            ));
        }
        let active = words.iter().map(|w| w.count_ones() as usize).sum();
        Ok(Mask { len, words, active })
    }

    /// The packed words (bit `i` is element `i`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of elements covered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the mask covers no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of active (kept) elements.
    pub fn active(&self) -> usize {
        self.active
    }

    /// Fraction of elements kept; 1 for an empty mask.
    pub fn density(&self) -> f64 {
        if self.len == 0 {
            1.0
        } else {
            self.active as f64 / self.len as f64
        }
    }

    /// Whether element `i` is active. Out-of-range indices are inactive.
    #[inline]
    pub fn get(&self, i: usize) -> bool {
        i < self.len && (self.words[i / 64] >> (i % 64)) & 1 == 1
    }

    /// Sets element `i` (ignored when out of range).
    pub fn set(&mut self, i: usize, keep: bool) {
        if i >= self.len {
            return;
        }
        let bit = 1u64 << (i % 64);
        let w = &mut self.words[i / 64];
        let was = *w & bit != 0;
        if keep && !was {
            *w |= bit;
            self.active += 1;
        } else if !keep && was {
            *w &= !bit;
            self.active -= 1;
        }
    }

    /// Indices of the active elements, ascending.
    pub fn iter_active(&self) -> impl Iterator<Item = usize> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut bits = w;
            std::iter::from_fn(move || {
                if bits == 0 {
                    None
                } else {
                    let t = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    Some(wi * 64 + t)
                }
            })
        })
    }

    /// Zeroes every inactive element of `values` (which must have the mask's length).
    pub fn apply(&self, values: &mut [f32]) {
        debug_assert_eq!(values.len(), self.len);
        for (chunk, &w) in values.chunks_mut(64).zip(&self.words) {
            if w == u64::MAX {
                continue;
            }
            if w == 0 {
                chunk.fill(0.0);
                continue;
            }
            // Branch-free (a random mask would mispredict half the branches): the value's bits
            // and-ed with all ones where active, all zeros (+0.0) where not.
            for (j, v) in chunk.iter_mut().enumerate() {
                let keep = 0u32.wrapping_sub(((w >> j) & 1) as u32);
                *v = f32::from_bits(v.to_bits() & keep);
            }
        }
    }
}

/// Named masks of a model's prunable tensors, with a version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaskSet {
    /// Masks by the dotted name of their weight tensor.
    pub masks: BTreeMap<String, Mask>,
    /// Grows by one at every change; 0 for the first set.
    pub version: u64,
}

impl MaskSet {
    /// Overall density: active elements over all elements, across every mask.
    pub fn density(&self) -> f64 {
        let (a, n) = self.counts();
        if n == 0 { 1.0 } else { a as f64 / n as f64 }
    }

    /// (active, total) element counts across every mask.
    pub fn counts(&self) -> (usize, usize) {
        self.masks
            .values()
            .fold((0, 0), |(a, n), m| (a + m.active(), n + m.len()))
    }

    /// The mask of a tensor, if any.
    pub fn get(&self, name: &str) -> Option<&Mask> {
        self.masks.get(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ones_and_zeros() {
        for len in [0, 1, 63, 64, 65, 200] {
            let o = Mask::ones(len);
            assert_eq!(o.active(), len);
            assert_eq!(o.iter_active().count(), len);
            assert!(Mask::from_words(len, o.words().to_vec()).is_ok());
            let z = Mask::zeros(len);
            assert_eq!(z.active(), 0);
            assert_eq!(z.iter_active().count(), 0);
        }
    }

    #[test]
    fn from_words_rejects_stray_bits_and_bad_lengths() {
        assert!(Mask::from_words(3, vec![0b1000]).is_err());
        assert!(Mask::from_words(3, vec![0, 0]).is_err());
        assert!(Mask::from_words(3, vec![0b101]).is_ok());
    }

    proptest! {
        #[test]
        fn bits_round_trip(bits in proptest::collection::vec(any::<bool>(), 0..300)) {
            let m = Mask::from_fn(bits.len(), |i| bits[i]);
            prop_assert_eq!(m.active(), bits.iter().filter(|b| **b).count());
            let idx: Vec<usize> = m.iter_active().collect();
            let expect: Vec<usize> = (0..bits.len()).filter(|&i| bits[i]).collect();
            prop_assert_eq!(&idx, &expect);
            prop_assert_eq!(Mask::from_indices(bits.len(), &idx).unwrap(), m.clone());
            prop_assert_eq!(Mask::from_words(bits.len(), m.words().to_vec()).unwrap(), m.clone());
            // Active values keep their bits (NaN and −0 included); inactive ones become +0.
            let special = [1.5f32, -0.0, f32::NAN, -3.25, f32::INFINITY];
            let orig: Vec<f32> = (0..bits.len()).map(|i| special[i % special.len()]).collect();
            let mut v = orig.clone();
            m.apply(&mut v);
            for (i, x) in v.iter().enumerate() {
                let want = if bits[i] { orig[i].to_bits() } else { 0 };
                prop_assert_eq!(x.to_bits(), want);
            }
        }

        #[test]
        fn set_keeps_count(ops in proptest::collection::vec((0usize..100, any::<bool>()), 0..200)) {
            let mut m = Mask::zeros(100);
            let mut reference = [false; 100];
            for (i, b) in ops {
                m.set(i, b);
                reference[i] = b;
            }
            prop_assert_eq!(m.active(), reference.iter().filter(|b| **b).count());
        }
    }
}

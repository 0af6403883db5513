//! Wire-size report: the `cnn` on Fashion-MNIST shapes with random masks at density 0.1 and
//! 0.01. A train task without masks and a train result must cost at most 1.1 × the ideal
//! `4·d·P + 4·(dense elements)` bytes, where P counts the prunable weights.
//!
//! Run with `--nocapture` to see the numbers.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions unwrap too

mod support;

use fedtiny_common::codec::{self, Limits};
use fedtiny_proto::convert::{decode_result, decode_task, encode_result, encode_task};
use support::*;

#[test]
fn masked_cnn_payloads_cost_close_to_their_active_values() {
    for d in [0.1, 0.01] {
        let mut model = cnn(42);
        let masks = random_masks(&mut model, d, 5, 7);
        let state = model.state_dict();
        let prunable: usize = masks.masks.values().map(|m| m.len()).sum();
        let active: usize = masks.masks.values().map(|m| m.active()).sum();
        let dense: usize = state
            .entries
            .iter()
            .filter(|(name, _)| masks.get(name).is_none())
            .map(|(_, e)| e.values.len())
            .sum();
        let ideal = 4.0 * d * prunable as f64 + 4.0 * dense as f64;

        let task = train_task(&model, &masks, false);
        let task_bytes = encode_task(&task, Some(&masks)).unwrap();
        assert_eq!(
            decode_task(&task_bytes, Some(&masks), &Limits::default()).unwrap(),
            task
        );
        let result = train_result(&model, &masks);
        let result_bytes = encode_result(&result, &masks).unwrap();
        assert_eq!(
            decode_result(&result_bytes, &masks, 7, &Limits::default()).unwrap(),
            result
        );
        let masks_bytes: usize = codec::encode_masks(&masks)
            .masks
            .iter()
            .map(codec::mask_wire_bytes)
            .sum();
        let with_masks = encode_task(&train_task(&model, &masks, true), None)
            .unwrap()
            .len();

        println!(
            "d = {d}: P = {prunable}, active = {active}, dense elements = {dense}, \
             ideal 4dP + 4·dense = {ideal:.0} B; train task {} B ({:.3}×), train result {} B \
             ({:.3}×); masks {} B payload, task with masks {} B",
            task_bytes.len(),
            task_bytes.len() as f64 / ideal,
            result_bytes.len(),
            result_bytes.len() as f64 / ideal,
            masks_bytes,
            with_masks,
        );
        assert!(task_bytes.len() as f64 <= 1.1 * ideal);
        assert!(result_bytes.len() as f64 <= 1.1 * ideal);
    }
}

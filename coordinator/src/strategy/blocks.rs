//! Which tensors an adjustment round touches.
//!
//! Blocks: for a ResNet, its stages (`layer1` … `layer4`), the last one together with the
//! classifier; otherwise pairs of consecutive prunable tensors counted from the output (so the
//! classifier pairs with the last conv, and an odd tensor out is the first block). Block `B−1−(j
//! mod B)` is adjusted at the j-th adjustment: from the output back to the input, cycling with a
//! counter (not the round number, so every block is visited).

use crate::config::Granularity;

/// The groups of prunable tensors (in model order, input → output) for a granularity.
pub fn adjustment_groups(prunable: &[String], granularity: Granularity) -> Vec<Vec<String>> {
    match granularity {
        Granularity::Entire => vec![prunable.to_vec()],
        Granularity::Layer => prunable.iter().map(|n| vec![n.clone()]).collect(),
        Granularity::Block => {
            let stages: Vec<String> = ["layer1", "layer2", "layer3", "layer4"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let is_resnet = prunable.iter().any(|n| n.starts_with("layer1."));
            if is_resnet {
                let mut groups: Vec<Vec<String>> = stages
                    .iter()
                    .map(|s| {
                        prunable
                            .iter()
                            .filter(|n| n.starts_with(&format!("{s}.")))
                            .cloned()
                            .collect()
                    })
                    .filter(|g: &Vec<String>| !g.is_empty())
                    .collect();
                let others: Vec<String> = prunable
                    .iter()
                    .filter(|n| !stages.iter().any(|s| n.starts_with(&format!("{s}."))))
                    .cloned()
                    .collect();
                match groups.last_mut() {
                    Some(last) => last.extend(others),
                    None => groups.push(others),
                }
                groups
            } else {
                let mut groups: Vec<Vec<String>> =
                    prunable.rchunks(2).map(<[String]>::to_vec).collect();
                groups.reverse();
                groups
            }
        }
    }
}

/// The group adjusted at the `j`-th adjustment (0-based): from the output back to the input.
pub fn group_at(groups: &[Vec<String>], j: u64) -> &[String] {
    if groups.is_empty() {
        return &[];
    }
    let b = groups.len() as u64;
    &groups[(b - 1 - (j % b)) as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn resnet_stages_with_the_classifier_last_and_cycling_from_the_output() {
        let p = names(&[
            "layer1.0.conv1.weight",
            "layer1.1.conv2.weight",
            "layer2.0.conv1.weight",
            "layer2.0.shortcut.conv.weight",
            "layer3.0.conv1.weight",
            "layer4.1.conv2.weight",
            "fc.weight",
        ]);
        let g = adjustment_groups(&p, Granularity::Block);
        assert_eq!(g.len(), 4);
        assert_eq!(g[3], names(&["layer4.1.conv2.weight", "fc.weight"]));
        let visited: Vec<&str> = (0..8).map(|j| group_at(&g, j)[0].as_str()).collect();
        assert_eq!(
            visited,
            vec![
                "layer4.1.conv2.weight",
                "layer3.0.conv1.weight",
                "layer2.0.conv1.weight",
                "layer1.0.conv1.weight",
                "layer4.1.conv2.weight",
                "layer3.0.conv1.weight",
                "layer2.0.conv1.weight",
                "layer1.0.conv1.weight"
            ],
            "every stage is visited"
        );
    }

    #[test]
    fn pairs_from_the_output_and_other_granularities() {
        let p = names(&["conv2", "conv3", "conv4", "fc"]);
        let g = adjustment_groups(&p, Granularity::Block);
        assert_eq!(g, vec![names(&["conv2", "conv3"]), names(&["conv4", "fc"])]);
        let odd = names(&["conv2.weight", "fc1.weight", "fc2.weight"]);
        let g = adjustment_groups(&odd, Granularity::Block);
        assert_eq!(
            g,
            vec![
                names(&["conv2.weight"]),
                names(&["fc1.weight", "fc2.weight"])
            ]
        );
        assert_eq!(
            adjustment_groups(&odd, Granularity::Entire),
            vec![odd.clone()]
        );
        let l = adjustment_groups(&odd, Granularity::Layer);
        assert_eq!(group_at(&l, 0), &names(&["fc2.weight"])[..]);
        assert_eq!(group_at(&l, 2), &names(&["conv2.weight"])[..]);
    }
}

//! How a federated run divides a training split: the server's small labelled set first (FedTiny's
//! stage 0), then the clients' partitions of the rest. Every component (simulation, client
//! binary, coordinator) calls these functions with the run seed, so all agree on who holds what.

use rand::seq::SliceRandom;

use super::{DataError, Partitioner};
use crate::rng;

/// Splits training indices into the server set (`n_shots` per class, seeded) and the rest.
/// Classes with fewer samples contribute what they have.
pub fn server_split(
    labels: &[u8],
    classes: usize,
    n_shots: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut per_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(v) = per_class.get_mut(usize::from(l)) {
            v.push(i);
        }
    }
    let mut r = rng::derived(seed, "server-set", 0);
    let mut server = Vec::new();
    for v in &mut per_class {
        v.shuffle(&mut r);
        server.extend(v.iter().take(n_shots).copied());
    }
    server.sort_unstable();
    let mut rest = Vec::with_capacity(labels.len() - server.len());
    let mut s = server.iter().peekable();
    for i in 0..labels.len() {
        if s.peek() == Some(&&i) {
            s.next();
        } else {
            rest.push(i);
        }
    }
    (server, rest)
}

/// The clients' partitions of a training split's labels after removing the server set of
/// `n_shots` per class (0 = no server set): indices into the split, one list per client.
pub fn client_partitions(
    labels: &[u8],
    classes: usize,
    partitioner: &Partitioner,
    clients: usize,
    n_shots: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    let (_, rest) = server_split(labels, classes, n_shots, seed);
    let rest_labels: Vec<u8> = rest.iter().map(|&i| labels[i]).collect();
    let mut r = rng::derived(seed, "partition", 0);
    let parts = partitioner.split(&rest_labels, classes, clients, &mut r)?;
    Ok(parts
        .into_iter()
        .map(|p| p.into_iter().map(|i| rest[i]).collect())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_exclude_the_server_set_and_cover_the_rest() {
        let labels: Vec<u8> = (0..2000).map(|i| (i % 10) as u8).collect();
        let (server, _) = server_split(&labels, 10, 5, 9);
        let parts = client_partitions(&labels, 10, &Partitioner::Iid, 7, 5, 9).unwrap();
        let mut all: Vec<usize> = parts.concat();
        all.sort_unstable();
        assert_eq!(all.len(), 2000 - 50);
        assert!(all.windows(2).all(|w| w[0] < w[1]));
        assert!(server.iter().all(|s| all.binary_search(s).is_err()));
        let none = client_partitions(&labels, 10, &Partitioner::Iid, 7, 0, 9).unwrap();
        assert_eq!(none.concat().len(), 2000);
    }

    #[test]
    fn server_set_is_balanced_disjoint_and_seeded() {
        let labels: Vec<u8> = (0..1000).map(|i| (i % 10) as u8).collect();
        let (s, rest) = server_split(&labels, 10, 5, 3);
        assert_eq!(s.len(), 50);
        assert_eq!(s.len() + rest.len(), 1000);
        for c in 0..10u8 {
            assert_eq!(s.iter().filter(|&&i| labels[i] == c).count(), 5);
        }
        assert!(s.iter().all(|i| !rest.contains(i)));
        assert_eq!(server_split(&labels, 10, 5, 3), (s.clone(), rest));
        assert_ne!(server_split(&labels, 10, 5, 4).0, s);
    }
}

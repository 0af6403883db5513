//! Splitting a dataset's sample indices across federated clients.
//!
//! Decisions:
//! - A partition is a `Vec` with one index list per client; together the lists are a disjoint
//!   cover of `0..labels.len()` (every sample goes to exactly one client), and each list is sorted
//!   ascending, so a client's [`Dataset::subset`](super::Dataset::subset) keeps file order and
//!   partitions compare easily. Training shuffles per epoch anyway.
//! - All randomness comes from the caller's generator, so the same seed gives the same partition.
//! - [`Partitioner::Iid`]: shuffle all indices and deal them in contiguous runs; the first
//!   `len % clients` clients get one sample more, so sizes differ by at most one.
//! - [`Partitioner::Dirichlet`] follows the usual label-skew rule (as in NIID-Bench) exactly: for
//!   each class in order, draw `p ~ Dir(α·1_N)`, zero `p_j` for every client already holding at
//!   least `total / N` samples, renormalise, shuffle the class's indices and cut them at
//!   `floor(n_class · cumsum(p))`. The whole draw is repeated until every client has at least
//!   [`DIRICHLET_MIN_SAMPLES`] samples, at most [`DIRICHLET_MAX_ATTEMPTS`] times.
//!   The Dirichlet draw normalises Gamma(α, 1) draws. For α < 1 it works in log space,
//!   `ln G = ln Gamma(α + 1) + ln(U) / α` with `U ~ Uniform(0, 1]`, and exponentiates after
//!   subtracting the largest log among the clients still open, so tiny α (say 0.01) does not
//!   underflow to an all-zero vector; the result equals drawing, zeroing and renormalising.
//! - [`Partitioner::Shards`]: sort indices by label (stably), cut them into
//!   `clients · shards_per_client` contiguous shards whose sizes differ by at most one, shuffle
//!   the shards and deal `shards_per_client` of them to each client.

use rand::seq::SliceRandom;
use rand_distr::{Distribution, Gamma, Open01};

use super::DataError;
use crate::rng::Rng;

/// The fewest samples a client may end up with under [`Partitioner::Dirichlet`].
pub const DIRICHLET_MIN_SAMPLES: usize = 10;
/// How many times [`Partitioner::Dirichlet`] redraws before giving up.
pub const DIRICHLET_MAX_ATTEMPTS: usize = 1000;

/// How to split sample indices across clients. In configuration files it reads as
/// `{ kind = "iid" }`, `{ kind = "dirichlet", alpha = 0.5 }` or
/// `{ kind = "shards", shards_per_client = 2 }`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partitioner {
    /// Uniformly at random, equal sizes (±1).
    Iid,
    /// Label skew: per-class proportions drawn from a symmetric Dirichlet. Smaller `alpha`
    /// means more skew.
    Dirichlet {
        /// The concentration parameter, > 0.
        alpha: f64,
    },
    /// Pathological skew: each client gets a few label-sorted shards.
    Shards {
        /// Shards per client, ≥ 1.
        shards_per_client: usize,
    },
}

impl Partitioner {
    /// Checks the partitioner's own parameters: `alpha` finite and positive, at least one shard
    /// per client ([`DataError::InvalidArgument`] otherwise).
    pub fn validate(&self) -> Result<(), DataError> {
        match *self {
            Partitioner::Iid => Ok(()),
            Partitioner::Dirichlet { alpha } if !(alpha.is_finite() && alpha > 0.0) => {
                Err(DataError::InvalidArgument(format!(
                    "Dirichlet alpha must be finite and positive, got {alpha}"
                )))
            }
            Partitioner::Dirichlet { .. } => Ok(()),
            Partitioner::Shards {
                shards_per_client: 0,
            } => Err(DataError::InvalidArgument(
                "shards_per_client must be at least 1".into(),
            )),
            Partitioner::Shards { .. } => Ok(()),
        }
    }

    /// Splits `0..labels.len()` across `clients` clients; `classes` bounds the labels.
    ///
    /// Errors: [`DataError::InvalidArgument`] for zero clients, zero classes, a label
    /// `≥ classes`, `alpha` not finite and positive, or zero shards per client;
    /// [`DataError::Partition`] when there are fewer samples than clients (or shards), or when
    /// no Dirichlet draw gives every client enough samples.
    pub fn split(
        &self,
        labels: &[u8],
        classes: usize,
        clients: usize,
        rng: &mut Rng,
    ) -> Result<Vec<Vec<usize>>, DataError> {
        self.validate()?;
        if clients == 0 {
            return Err(DataError::InvalidArgument(
                "cannot partition data across 0 clients".into(),
            ));
        }
        if classes == 0 {
            return Err(DataError::InvalidArgument(
                "cannot partition data of 0 classes".into(),
            ));
        }
        if let Some((i, &l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| usize::from(l) >= classes)
        {
            return Err(DataError::InvalidArgument(format!(
                "label {l} at index {i} is not below the {classes} classes"
            )));
        }
        if labels.len() < clients {
            return Err(DataError::Partition(format!(
                "{} samples are too few for {clients} clients",
                labels.len()
            )));
        }
        let mut parts = match self {
            Partitioner::Iid => iid(labels.len(), clients, rng),
            Partitioner::Dirichlet { alpha } => dirichlet(labels, classes, clients, *alpha, rng)?,
            Partitioner::Shards { shards_per_client } => {
                shards(labels, clients, *shards_per_client, rng)?
            }
        };
        for p in &mut parts {
            p.sort_unstable();
        }
        Ok(parts)
    }
}

fn iid(len: usize, clients: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut all: Vec<usize> = (0..len).collect();
    all.shuffle(rng);
    let (base, extra) = (len / clients, len % clients);
    let mut rest = all.as_slice();
    (0..clients)
        .map(|k| {
            let (mine, tail) = rest.split_at(base + usize::from(k < extra));
            rest = tail;
            mine.to_vec()
        })
        .collect()
}

fn shards(
    labels: &[u8],
    clients: usize,
    per_client: usize,
    rng: &mut Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let len = labels.len();
    let count = clients
        .checked_mul(per_client)
        .filter(|&s| s <= len)
        .ok_or_else(|| {
            DataError::Partition(format!(
                "{len} samples are too few for {clients} clients × {per_client} shards"
            ))
        })?;
    let mut sorted: Vec<usize> = (0..len).collect();
    sorted.sort_by_key(|&i| labels[i]);
    let bounds = |s: usize| s * len / count;
    let mut order: Vec<usize> = (0..count).collect();
    order.shuffle(rng);
    Ok(order
        .chunks_exact(per_client)
        .map(|mine| {
            mine.iter()
                .flat_map(|&s| sorted[bounds(s)..bounds(s + 1)].iter().copied())
                .collect()
        })
        .collect())
}

/// Draws `ln G_j` for `G_j ~ Gamma(alpha, 1)`.
struct LogGamma {
    alpha: f64,
    gamma: Gamma<f64>,
    boosted: bool,
}

impl LogGamma {
    fn new(alpha: f64) -> Result<Self, DataError> {
        let boosted = alpha < 1.0;
        let shape = if boosted { alpha + 1.0 } else { alpha };
        let gamma = Gamma::new(shape, 1.0)
            .map_err(|e| DataError::InvalidArgument(format!("Dirichlet alpha {alpha}: {e}")))?;
        Ok(LogGamma {
            alpha,
            gamma,
            boosted,
        })
    }

    fn sample(&self, rng: &mut Rng) -> f64 {
        let g = self.gamma.sample(rng).ln();
        if self.boosted {
            // U in (0, 1): ln U is finite.
            let u: f64 = Open01.sample(rng);
            g + u.ln() / self.alpha
        } else {
            g
        }
    }
}

fn dirichlet(
    labels: &[u8],
    classes: usize,
    clients: usize,
    alpha: f64,
    rng: &mut Rng,
) -> Result<Vec<Vec<usize>>, DataError> {
    let total = labels.len();
    let too_few = |why: &str| {
        DataError::Partition(format!(
            "the data are too few for that many clients: Dirichlet(alpha = {alpha}) over \
             {clients} clients must give each at least {DIRICHLET_MIN_SAMPLES} of the {total} \
             samples, {why}"
        ))
    };
    if clients
        .checked_mul(DIRICHLET_MIN_SAMPLES)
        .is_none_or(|need| need > total)
    {
        return Err(too_few("which is impossible"));
    }
    let log_gamma = LogGamma::new(alpha)?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[usize::from(l)].push(i);
    }
    let mut logs = vec![0.0f64; clients];
    let mut p = vec![0.0f64; clients];
    for _ in 0..DIRICHLET_MAX_ATTEMPTS {
        let mut parts: Vec<Vec<usize>> = vec![Vec::new(); clients];
        for class in &mut by_class {
            for l in &mut logs {
                *l = log_gamma.sample(rng);
            }
            // Clients holding ≥ total / N samples get p = 0; exponentiate the others relative
            // to their largest log (so the largest is exactly 1 and the sum is ≥ 1).
            let open = |k: usize| parts[k].len() * clients < total;
            let max = (0..clients)
                .filter(|&k| open(k))
                .map(|k| logs[k])
                .fold(f64::NEG_INFINITY, f64::max);
            for k in 0..clients {
                p[k] = if open(k) { (logs[k] - max).exp() } else { 0.0 };
            }
            let sum: f64 = p.iter().sum();
            class.shuffle(rng);
            let n = class.len();
            let mut cum = 0.0;
            let mut start = 0;
            for k in 0..clients {
                let end = if k + 1 == clients {
                    n
                } else {
                    cum += p[k] / sum;
                    // `as` saturates; clamp keeps the cuts monotone whatever the rounding.
                    ((cum * n as f64) as usize).clamp(start, n)
                };
                parts[k].extend_from_slice(&class[start..end]);
                start = end;
            }
        }
        if parts.iter().all(|p| p.len() >= DIRICHLET_MIN_SAMPLES) {
            return Ok(parts);
        }
    }
    Err(too_few(&format!(
        "and no draw did in {DIRICHLET_MAX_ATTEMPTS} attempts (use fewer clients, more data or \
         a larger alpha)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng;
    use proptest::prelude::*;

    fn labels(n: usize, classes: usize) -> Vec<u8> {
        (0..n).map(|i| ((i * 7 + i / 3) % classes) as u8).collect()
    }

    fn assert_cover(parts: &[Vec<usize>], len: usize) {
        let mut seen = vec![false; len];
        for p in parts {
            assert!(p.windows(2).all(|w| w[0] < w[1]), "not sorted: {p:?}");
            for &i in p {
                assert!(i < len && !seen[i], "index {i} repeated or out of range");
                seen[i] = true;
            }
        }
        assert!(seen.iter().all(|&s| s), "not a cover");
    }

    fn strategy() -> impl Strategy<Value = Partitioner> {
        prop_oneof![
            Just(Partitioner::Iid),
            (0.01f64..5.0).prop_map(|alpha| Partitioner::Dirichlet { alpha }),
            (1usize..4).prop_map(|s| Partitioner::Shards {
                shards_per_client: s
            }),
        ]
    }

    #[test]
    fn argument_errors() {
        let l = labels(100, 10);
        let mut r = rng::seeded(0);
        let cases = [
            (Partitioner::Iid, 10, 0),
            (Partitioner::Iid, 0, 5),
            (Partitioner::Iid, 5, 5),
            (Partitioner::Dirichlet { alpha: 0.0 }, 10, 5),
            (Partitioner::Dirichlet { alpha: -1.0 }, 10, 5),
            (Partitioner::Dirichlet { alpha: f64::NAN }, 10, 5),
            (
                Partitioner::Shards {
                    shards_per_client: 0,
                },
                10,
                5,
            ),
        ];
        for (p, classes, clients) in cases {
            let e = p.split(&l, classes, clients, &mut r);
            assert!(
                matches!(e, Err(DataError::InvalidArgument(_))),
                "{p:?}: {e:?}"
            );
        }
        let few = [0u8; 3];
        for p in [
            Partitioner::Dirichlet { alpha: 0.0 },
            Partitioner::Shards {
                shards_per_client: 0,
            },
        ] {
            assert!(p.validate().is_err());
            let e = p.split(&few, 1, 5, &mut r);
            assert!(
                matches!(e, Err(DataError::InvalidArgument(_))),
                "{p:?}: {e:?}"
            );
        }
        for (p, clients) in [
            (Partitioner::Iid, 101),
            (
                Partitioner::Shards {
                    shards_per_client: 2,
                },
                51,
            ),
            (Partitioner::Dirichlet { alpha: 0.5 }, 11),
        ] {
            let e = p.split(&l, 10, clients, &mut r);
            assert!(matches!(e, Err(DataError::Partition(_))), "{p:?}: {e:?}");
        }
    }

    #[test]
    fn dirichlet_gives_up_with_a_clear_error() {
        // 20 samples of one class over 2 clients passes the up-front count check, but with a
        // tiny alpha each draw gives (almost surely) the whole class to one client.
        let l = vec![0u8; 20];
        let e = Partitioner::Dirichlet { alpha: 1e-9 }
            .split(&l, 1, 2, &mut rng::seeded(1))
            .unwrap_err();
        assert!(matches!(e, DataError::Partition(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("too few") && msg.contains("2 clients"),
            "{msg}"
        );
    }

    #[test]
    fn dirichlet_small_alpha_is_skewed_large_alpha_is_balanced() {
        let l = labels(5000, 10);
        let skew = |alpha| {
            let parts = Partitioner::Dirichlet { alpha }
                .split(&l, 10, 10, &mut rng::seeded(3))
                .unwrap();
            assert_cover(&parts, l.len());
            // Mean over clients of the largest class share.
            parts
                .iter()
                .map(|p| {
                    let mut c = [0usize; 10];
                    p.iter().for_each(|&i| c[usize::from(l[i])] += 1);
                    c.iter().copied().max().unwrap_or(0) as f64 / p.len() as f64
                })
                .sum::<f64>()
                / 10.0
        };
        assert!(skew(0.05) > 0.6, "{}", skew(0.05));
        assert!(skew(100.0) < 0.2, "{}", skew(100.0));
    }

    #[test]
    fn shards_give_few_labels_per_client() {
        let l: Vec<u8> = (0..1000).map(|i| (i % 10) as u8).collect();
        let parts = Partitioner::Shards {
            shards_per_client: 2,
        }
        .split(&l, 10, 10, &mut rng::seeded(5))
        .unwrap();
        assert_cover(&parts, l.len());
        for p in &parts {
            let mut seen: Vec<u8> = p.iter().map(|&i| l[i]).collect();
            seen.sort_unstable();
            seen.dedup();
            assert!(seen.len() <= 2, "{seen:?}");
            assert_eq!(p.len(), 100);
        }
    }

    #[test]
    fn serde_form() {
        for (p, json) in [
            (Partitioner::Iid, r#"{"kind":"iid"}"#),
            (
                Partitioner::Dirichlet { alpha: 0.5 },
                r#"{"kind":"dirichlet","alpha":0.5}"#,
            ),
            (
                Partitioner::Shards {
                    shards_per_client: 2,
                },
                r#"{"kind":"shards","shards_per_client":2}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&p).unwrap(), json);
            assert_eq!(serde_json::from_str::<Partitioner>(json).unwrap(), p);
        }
        assert!(
            serde_json::from_str::<Partitioner>(r#"{"kind":"dirichlet","alpha":0.5,"x":1}"#)
                .is_err()
        );
        assert!(serde_json::from_str::<Partitioner>(r#"{"kind":"dirichlet"}"#).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn partitions_are_disjoint_covers_and_replay(
            p in strategy(),
            len in 1usize..600,
            classes in 1usize..12,
            clients in 1usize..12,
            seed in any::<u64>(),
        ) {
            let l = labels(len, classes);
            let a = p.split(&l, classes, clients, &mut rng::seeded(seed));
            let b = p.split(&l, classes, clients, &mut rng::seeded(seed));
            match (&a, &b) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(a, b);
                    prop_assert_eq!(a.len(), clients);
                    assert_cover(a, len);
                    match p {
                        Partitioner::Iid => {
                            let min = a.iter().map(Vec::len).min().unwrap_or(0);
                            let max = a.iter().map(Vec::len).max().unwrap_or(0);
                            prop_assert!(max - min <= 1);
                        }
                        Partitioner::Dirichlet { .. } => {
                            prop_assert!(a.iter().all(|c| c.len() >= DIRICHLET_MIN_SAMPLES));
                        }
                        Partitioner::Shards { shards_per_client } => {
                            prop_assert!(a.iter().all(|c| c.len() >= shards_per_client));
                        }
                    }
                }
                (Err(DataError::Partition(_)), Err(DataError::Partition(_))) => {
                    prop_assert!(len < clients || !matches!(p, Partitioner::Iid));
                }
                _ => prop_assert!(false, "unexpected {:?} / {:?}", a, b),
            }
        }
    }
}

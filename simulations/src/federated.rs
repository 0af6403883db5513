//! Federated simulation: N clients on one machine, driven by the coordinator's round engine.
//!
//! In-process mode gives each client a [`ClientApp`] behind an in-process [`ClientProxy`]. Tasks
//! and results still go through the wire encoding (`fedtiny_proto::convert`), so byte counts are
//! the real ones and the clients compute exactly what they would over gRPC: the same seed gives
//! the same final model in both modes.
//!
//! Parallelism is chosen once: `parallel_clients` clients train at a time, each on its own rayon
//! pool of `threads / parallel_clients` kernel threads.
//!
//! Memory grows with the clients running at once, not with the federation: every client reads
//! the one shared copy of the training set through its partition (an index list); its
//! [`ClientApp`] is built when a task reaches it and dropped afterwards; between tasks a client
//! keeps only the masks it holds, and clients holding the same masks share one copy. A
//! simulation of 1,000 clients therefore needs about what one of 10 does
//! (`simulations/scale_check.sh` measures it).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use fedtiny_client::{ClientApp, LocalData};
use fedtiny_common::codec::Limits;
use fedtiny_common::data::{Dataset, Normalization, Partitioner, Splits};
use fedtiny_common::mask::MaskSet;
use fedtiny_common::parallel;
use fedtiny_common::task::{ClientId, ModelPayload, Task};
use fedtiny_coordinator::config::FederatedConfig;
use fedtiny_coordinator::engine::RoundEngine;
use fedtiny_coordinator::evaluate::Evaluator;
use fedtiny_coordinator::metrics::RunSummary;
use fedtiny_coordinator::proxy::{ClientPool, ClientProxy, Failure, Reply, ReplyFuture, Traffic};
use fedtiny_coordinator::run_dir::RunDir;
use fedtiny_proto::convert;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};

use crate::config::resolve_data_dir;
use crate::{Result, SimError};

/// The built-in federated simulation config (the `cnn` on the committed sample).
pub const DEFAULT_FEDERATED: &str = include_str!("../configs/federated-cnn.toml");

/// The simulated clients.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientsSection {
    /// Number of clients in the federation (N).
    pub count: usize,
    /// How the training split is divided among them.
    pub partitioner: Partitioner,
    /// Dataset directory the clients read (default: `eval.data_dir`).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
}

/// How the simulation runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimulationSection {
    /// Clients training at the same time.
    #[serde(default = "one")]
    pub parallel_clients: usize,
    /// Kernel threads in total (0 = one per core), divided among the parallel clients.
    #[serde(default)]
    pub threads: usize,
}

fn one() -> usize {
    1
}

impl Default for SimulationSection {
    fn default() -> Self {
        SimulationSection {
            parallel_clients: 1,
            threads: 0,
        }
    }
}

/// A federated simulation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The run, as the coordinator sees it.
    #[serde(flatten)]
    pub federation: FederatedConfig,
    /// The clients.
    pub clients: ClientsSection,
    /// Parallelism.
    #[serde(default)]
    pub simulation: SimulationSection,
}

impl SimConfig {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let c: SimConfig = toml::from_str(text).map_err(|e| SimError::Config {
            path: origin.into(),
            message: e.to_string(),
        })?;
        c.validate().map_err(|e| SimError::Config {
            path: origin.into(),
            message: e.to_string(),
        })?;
        Ok(c)
    }

    /// Reads and validates a config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| SimError::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The built-in default.
    pub fn embedded_default() -> Result<Self> {
        Self::from_toml(DEFAULT_FEDERATED, "<embedded federated-cnn.toml>")
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        self.federation.validate()?;
        let bad = |m: String| Err(SimError::Core(fedtiny_common::Error::InvalidConfig(m)));
        if self.clients.count < self.federation.run.min_clients {
            return bad(format!(
                "clients.count ({}) is below run.min_clients ({})",
                self.clients.count, self.federation.run.min_clients
            ));
        }
        if self.simulation.parallel_clients == 0 {
            return bad("simulation.parallel_clients must be at least 1".into());
        }
        Ok(())
    }

    /// The resolved config as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| SimError::Serialize {
            what: "config".into(),
            message: e.to_string(),
        })
    }

    /// The run-folder name.
    pub fn run_name(&self) -> String {
        self.federation.output.name.clone().unwrap_or_else(|| {
            format!(
                "fed-{}-d{}-n{}-s{}",
                self.federation.model.arch,
                self.federation.mask.density,
                self.clients.count,
                self.federation.run.seed
            )
        })
    }
}

/// Zero-padded client names, so that name order is index order.
pub fn client_name(index: usize) -> String {
    format!("client-{index:04}")
}

/// Splits the training set among the clients as the config says (seeded by the run seed),
/// after removing the coordinator's stage-0 server set.
pub fn partition(cfg: &SimConfig, train: &Dataset) -> Result<Vec<Vec<usize>>> {
    Ok(fedtiny_common::data::split::client_partitions(
        train.labels(),
        train.classes(),
        &cfg.clients.partitioner,
        cfg.clients.count,
        cfg.federation.stage0.n_shots,
        cfg.federation.run.seed,
    )?)
}

/// Shared machinery of the in-process clients: a concurrency limit, one kernel pool per client
/// slot, the data every client reads, and the one copy of each mask set clients hold.
struct Runner {
    slots: Semaphore,
    pools: Mutex<Vec<rayon::ThreadPool>>,
    limits: Limits,
    /// The training set, shared by every client.
    train: Arc<Dataset>,
    /// Each client's training indices into `train`.
    parts: Vec<Vec<usize>>,
    normalization: Normalization,
    /// The mask set clients held last (see `Runner::intern`).
    masks: Mutex<Option<Arc<MaskSet>>>,
    /// The `w0` clients kept last between the selection's round trips (see `Runner::intern_w0`).
    /// Weak, so that it is freed when the last client releases it after stage 1c.
    w0: Mutex<std::sync::Weak<ModelPayload>>,
}

/// What a simulated client keeps between tasks: the masks it adopted and, during adaptive
/// BatchNorm selection, the `w0` of its calibration task. Both are shared among clients when
/// equal.
#[derive(Default)]
struct Held {
    masks: Option<Arc<MaskSet>>,
    w0: Option<Arc<ModelPayload>>,
}

impl Runner {
    /// Client `index`, built for one task: its data, and what it kept after its last task.
    fn client(&self, index: usize, held: &Held) -> Result<ClientApp, Failure> {
        let indices = self
            .parts
            .get(index)
            .ok_or_else(|| Failure::ClientError(format!("no partition for client {index}")))?;
        let app = ClientApp::new(LocalData {
            train: self.train.clone(),
            train_indices: indices.clone(),
            test: None,
            normalization: self.normalization.clone(),
        });
        let app = match held.masks.as_deref() {
            Some(m) => app.with_masks(m.clone()),
            None => app,
        };
        Ok(match &held.w0 {
            Some(w0) => app.with_w0(w0.clone()),
            None => app,
        })
    }

    /// A shared copy of the `w0` a client kept, like [`Runner::intern`] for masks: the sampled
    /// clients of a selection keep one copy among them.
    fn intern_w0(&self, w0: &Arc<ModelPayload>) -> Arc<ModelPayload> {
        let Ok(mut last) = self.w0.lock() else {
            return w0.clone();
        };
        match last.upgrade() {
            Some(m) if Arc::ptr_eq(&m, w0) || *m == **w0 => m,
            _ => {
                *last = Arc::downgrade(w0);
                w0.clone()
            }
        }
    }

    /// A shared copy of the masks a client holds after a task: the copy other clients hold when
    /// the sets are equal (masks change rarely, so idle clients hold one set among them), a new
    /// one otherwise.
    fn intern(&self, masks: &MaskSet) -> Arc<MaskSet> {
        let Ok(mut last) = self.masks.lock() else {
            return Arc::new(masks.clone());
        };
        match last.as_ref() {
            Some(m) if **m == *masks => m.clone(),
            _ => {
                let m = Arc::new(masks.clone());
                *last = Some(m.clone());
                m
            }
        }
    }
}

/// One simulated client: between tasks, only its index and the masks it holds.
struct InProcessProxy {
    id: ClientId,
    index: usize,
    held: Arc<Mutex<Held>>,
    runner: Arc<Runner>,
}

impl ClientProxy for InProcessProxy {
    fn id(&self) -> &ClientId {
        &self.id
    }

    fn execute(&self, task: Task, masks: Arc<MaskSet>) -> ReplyFuture {
        let (index, held) = (self.index, self.held.clone());
        let runner = self.runner.clone();
        Box::pin(async move {
            let round = task.round();
            let down = convert::encode_task(&task, Some(&masks))
                .map_err(|e| Failure::Invalid(format!("encoding the task: {e}")))?;
            let _slot = runner
                .slots
                .acquire()
                .await
                .map_err(|e| Failure::Disconnected(e.to_string()))?;
            let r2 = runner.clone();
            let bytes_down = down.len() as u64;
            let up = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Failure> {
                let pool = r2
                    .pools
                    .lock()
                    .map_err(|_| Failure::ClientError("kernel pools poisoned".into()))?
                    .pop()
                    .ok_or_else(|| Failure::ClientError("no free kernel pool".into()))?;
                let out = (|| {
                    let mut held = held
                        .lock()
                        .map_err(|_| Failure::ClientError("client state poisoned".into()))?;
                    let mut app = r2.client(index, &held)?;
                    let task = convert::decode_task(&down, app.masks(), &r2.limits)
                        .map_err(|e| Failure::ClientError(format!("decoding the task: {e}")));
                    let result = task.and_then(|task| {
                        pool.install(|| app.handle(&task))
                            .map_err(|e| Failure::ClientError(e.to_string()))
                    });
                    // The client keeps the masks it adopted, whether or not the task succeeded.
                    held.masks = app.masks().map(|m| r2.intern(m));
                    held.w0 = app.w0().map(|w| r2.intern_w0(w));
                    drop(app);
                    let empty = MaskSet::default();
                    let masks = held.masks.as_deref().unwrap_or(&empty);
                    convert::encode_result(&result?, masks)
                        .map_err(|e| Failure::ClientError(format!("encoding the result: {e}")))
                })();
                if let Ok(mut pools) = r2.pools.lock() {
                    pools.push(pool);
                }
                out
            })
            .await
            .map_err(|e| Failure::ClientError(format!("client task panicked: {e}")))??;
            let result = convert::decode_result(&up, &masks, round, &runner.limits)
                .map_err(|e| Failure::Invalid(e.to_string()))?;
            Ok(Reply {
                result,
                traffic: Traffic {
                    bytes_down,
                    bytes_up: up.len() as u64,
                },
            })
        })
    }
}

struct InProcessPool {
    clients: Vec<Arc<dyn ClientProxy>>,
}

impl ClientPool for InProcessPool {
    fn available(&self) -> Vec<Arc<dyn ClientProxy>> {
        self.clients.clone()
    }
}

/// Loads the data of a simulation: (client training split, server test split).
pub fn load_data(cfg: &SimConfig) -> Result<(Arc<Dataset>, Arc<Dataset>)> {
    let kind = cfg.federation.model.dataset;
    let eval_dir = resolve_data_dir(&cfg.federation.eval.data_dir);
    let Splits { train, test } = kind.load(&eval_dir)?;
    let train = match &cfg.clients.data_dir {
        Some(d) if resolve_data_dir(d) != eval_dir => kind.load(&resolve_data_dir(d))?.train,
        _ => train,
    };
    Ok((Arc::new(train), Arc::new(test)))
}

/// Runs a simulation in process and returns its summary and run folder.
pub async fn run_in_process(
    cfg: &SimConfig,
    train: Arc<Dataset>,
    test: Arc<Dataset>,
    stop: watch::Receiver<bool>,
) -> Result<(RunSummary, RunDir)> {
    cfg.validate()?;
    let fed = &cfg.federation;
    let parts = partition(cfg, &train)?;
    let p = cfg.simulation.parallel_clients;
    let total = parallel::thread_pool(cfg.simulation.threads)?.current_num_threads();
    let per_client = (total / p).max(1);
    let pools = (0..p)
        .map(|_| parallel::thread_pool(per_client))
        .collect::<Result<Vec<_>, _>>()?;
    let norm = fed.model.dataset.normalization();
    let count = parts.len();
    let runner = Arc::new(Runner {
        slots: Semaphore::new(p),
        pools: Mutex::new(pools),
        limits: Limits::default(),
        train: train.clone(),
        parts,
        normalization: norm.clone(),
        masks: Mutex::new(None),
        w0: Mutex::new(std::sync::Weak::new()),
    });
    let clients: Vec<Arc<dyn ClientProxy>> = (0..count)
        .map(|i| {
            Arc::new(InProcessProxy {
                id: ClientId(client_name(i)),
                index: i,
                held: Arc::new(Mutex::new(Held::default())),
                runner: runner.clone(),
            }) as Arc<dyn ClientProxy>
        })
        .collect();
    let pool: Arc<dyn ClientPool> = Arc::new(InProcessPool { clients });
    let evaluator = Evaluator::new(test, fed.eval.test_limit, norm, fed.eval.batch_size);
    let run = RunDir::create(&fed.output.dir, &cfg.run_name())?;
    let config_toml = cfg.to_toml()?;
    let server_set = fedtiny_coordinator::server::server_set(fed, train.clone());
    let strategy = fedtiny_coordinator::strategy::build(fed, server_set);
    let mut engine = RoundEngine::new(fed.clone(), config_toml, strategy, evaluator, run)?;
    let summary = engine.run(pool, stop).await?;
    let dir = RunDir::create_existing(engine.run_dir().path());
    Ok((summary, dir))
}

//! The root of the supervisor tree.
//!
//! ```text
//! root
//! ├── ledger writer
//! ├── account directory ── account actors (one per active account)
//! └── provider actors (one per configured upstream)
//! ```
//!
//! The root restarts a child that fails, after a backoff, and gives up (stops, which ends the
//! process's actor system) when one child fails more often than the restart intensity allows.
//! Shutdown is ordered: accounts stop first, then the ledger writer drains and commits.

use crate::billing::Billing;
use crate::directory::{
    AccountDirectory, Books, ChildList, ChildQuery, DirectoryArgs, DirectoryMsg, LiveAccounts,
};
use crate::journal::JournalSync;
use crate::ledger::{JournalSlot, LedgerArgs, LedgerMsg, LedgerWriter};
use crate::metered::Mailbox;
use crate::metered::{record_restart, Metered};
use crate::provider::{
    Desk, ProviderActor, ProviderArgs, ProviderMsg, ProviderSpec, ProviderStatus,
};
use crate::restart::{RestartHistory, RestartPolicy};
use crate::slot::Slot;
use crate::store::Store;
use ractor::rpc::CallResult;
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr,
    SupervisionEvent,
};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct SystemConfig {
    pub store: Store,
    pub ledger: LedgerOptions,
    pub account_idle_after: Duration,
    pub policy: RestartPolicy,
    pub providers: Vec<ProviderSpec>,
}

/// How the ledger writer journals charges and ships them to the store.
#[derive(Clone, Debug)]
pub struct LedgerOptions {
    pub journal_dir: PathBuf,
    pub journal_sync: JournalSync,
    /// A journal segment is closed, and a new one started, past this size.
    pub segment_bytes: u64,
    /// Most records in one store transaction.
    pub max_batch: usize,
    /// Pause before each shipment to the store, to gather more records. Zero: none.
    pub ship_interval: Duration,
    /// Records allowed to wait for the store before new requests are refused (503).
    pub max_buffer: usize,
    /// How long a stopping writer keeps shipping before it leaves the rest to the next start.
    pub drain_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ChildKind {
    Ledger,
    Directory,
    Provider(String),
}

impl ChildKind {
    pub fn name(&self) -> String {
        match self {
            ChildKind::Ledger => "ledger".to_owned(),
            ChildKind::Directory => "accounts".to_owned(),
            ChildKind::Provider(n) => format!("provider:{n}"),
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            ChildKind::Ledger => "ledger",
            ChildKind::Directory => "account_directory",
            ChildKind::Provider(_) => "provider",
        }
    }
}

/// One node of the live tree, for operators.
#[derive(Clone, Debug)]
pub struct TreeNode {
    pub name: String,
    pub kind: String,
    pub status: String,
    pub restarts: u64,
    pub uptime: Duration,
    pub mailbox_depth: i64,
    /// Messages it has handled.
    pub messages: u64,
    pub children: Vec<TreeNode>,
    /// How many children it has, listed or not (the directory lists a few of its accounts).
    pub children_total: usize,
}

/// One child of the root, as the tree view shows it.
pub struct ChildView {
    kind: ChildKind,
    status: String,
    restarts: u64,
    started: Instant,
    mailbox_depth: i64,
    messages: u64,
}

pub enum RootMsg {
    Restart(ChildKind),
    Kill(ChildKind, RpcReplyPort<bool>),
    Tree(RpcReplyPort<Vec<ChildView>>),
    Shutdown(RpcReplyPort<()>),
}

impl crate::metered::Kind for RootMsg {
    const KIND: &'static str = "root";
}

pub struct RootState {
    cfg: SystemConfig,
    /// The ledger's records not yet in the store; outlives each incarnation of the writer.
    backlog: Arc<AtomicUsize>,
    /// Where each incarnation of the writer posts its journal.
    journal: JournalSlot,
    ledger: Slot<LedgerMsg>,
    directory: Slot<DirectoryMsg>,
    providers: HashMap<String, Slot<ProviderMsg>>,
    specs: HashMap<String, ProviderSpec>,
    desks: HashMap<String, Desk>,
    live: LiveAccounts,
    books: Books,
    by_actor: HashMap<ActorId, ChildKind>,
    history: HashMap<ChildKind, RestartHistory>,
    started: HashMap<ChildKind, Instant>,
    shutting_down: bool,
}

pub struct RootArgs {
    cfg: SystemConfig,
    handles: tokio::sync::oneshot::Sender<Handles>,
}

pub struct Handles {
    journal: JournalSlot,
    desks: HashMap<String, Desk>,
    books: Books,
    backlog: Arc<AtomicUsize>,
    ledger: Slot<LedgerMsg>,
    directory: Slot<DirectoryMsg>,
    providers: HashMap<String, Slot<ProviderMsg>>,
    live: LiveAccounts,
}

pub struct Root;

impl Actor for Root {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = RootArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RootMsg>,
        args: RootArgs,
    ) -> Result<RootState, ActorProcessingErr> {
        let cfg = args.cfg;
        let live: LiveAccounts = Default::default();
        let books: Books = Default::default();
        let mut by_actor = HashMap::new();
        let mut started = HashMap::new();
        let cell = myself.get_cell();

        let backlog = Arc::new(AtomicUsize::new(0));
        let journal = JournalSlot::default();
        let ledger = spawn_ledger(&cfg, &backlog, &journal, cell.clone()).await?;
        by_actor.insert(ledger.get_id(), ChildKind::Ledger);
        started.insert(ChildKind::Ledger, Instant::now());
        let ledger = Slot::new(ledger);

        let dir_args = directory_args(&cfg, &ledger, &live, &books);
        let (directory, _) =
            Actor::spawn_linked(None, Metered::new(AccountDirectory), dir_args, cell.clone())
                .await?;
        by_actor.insert(directory.get_id(), ChildKind::Directory);
        started.insert(ChildKind::Directory, Instant::now());
        let directory = Slot::new(directory);

        let mut providers = HashMap::new();
        let mut specs = HashMap::new();
        let mut desks = HashMap::new();
        for spec in &cfg.providers {
            let desk = Desk::new(spec);
            let args = ProviderArgs {
                spec: spec.clone(),
                desk: desk.clone(),
            };
            let (p, _) =
                Actor::spawn_linked(None, Metered::new(ProviderActor), args, cell.clone()).await?;
            desks.insert(spec.name.clone(), desk);
            let kind = ChildKind::Provider(spec.name.clone());
            by_actor.insert(p.get_id(), kind.clone());
            started.insert(kind, Instant::now());
            providers.insert(spec.name.clone(), Slot::new(p));
            specs.insert(spec.name.clone(), spec.clone());
        }
        let _ = args.handles.send(Handles {
            journal: journal.clone(),
            desks: desks.clone(),
            books: books.clone(),
            backlog: backlog.clone(),
            ledger: ledger.clone(),
            directory: directory.clone(),
            providers: providers.clone(),
            live: live.clone(),
        });
        Ok(RootState {
            cfg,
            backlog,
            journal,
            ledger,
            directory,
            providers,
            specs,
            desks,
            live,
            books,
            by_actor,
            history: HashMap::new(),
            started,
            shutting_down: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<RootMsg>,
        msg: RootMsg,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            RootMsg::Restart(kind) => {
                if !state.shutting_down {
                    // A successor that cannot start is one more failure of that child: it is
                    // retried after the backoff, within the same restart intensity.
                    if let Err(e) = state.restart(&myself, kind.clone()).await {
                        tracing::warn!(child = %kind.name(), error = %e, "supervised actor could not restart");
                        let history = state.history.entry(kind.clone()).or_default();
                        match history.next_delay(&state.cfg.policy) {
                            Some(delay) => {
                                myself.send_after(delay, move || RootMsg::Restart(kind));
                            }
                            None => {
                                tracing::error!(child = %kind.name(), "restart intensity exceeded; stopping the actor system");
                                return Err(e);
                            }
                        }
                    }
                }
            }
            RootMsg::Kill(kind, reply) => {
                let cell = state.cell_of(&kind);
                if let Some(c) = &cell {
                    c.kill();
                }
                let _ = reply.send(cell.is_some());
            }
            RootMsg::Tree(reply) => {
                let mut list: Vec<ChildView> = state
                    .started
                    .iter()
                    .map(|(k, t)| {
                        let cell = state.cell_of(k);
                        ChildView {
                            kind: k.clone(),
                            status: cell
                                .as_ref()
                                .map(|c| format!("{:?}", c.get_status()))
                                .unwrap_or_else(|| "Restarting".to_owned()),
                            restarts: state.history.get(k).map(|h| h.total).unwrap_or(0),
                            started: *t,
                            mailbox_depth: cell
                                .as_ref()
                                .map_or(0, |c| crate::metered::mailbox_depth(c.get_id())),
                            messages: cell
                                .map_or(0, |c| crate::metered::messages_handled(c.get_id())),
                        }
                    })
                    .collect();
                list.sort_by_key(|c| c.kind.name());
                let _ = reply.send(list);
            }
            RootMsg::Shutdown(reply) => {
                state.shutting_down = true;
                let patience = Some(Duration::from_secs(30));
                let _ = state.directory.get().drain_and_wait(patience).await;
                for p in state.providers.values() {
                    let _ = p.get().stop_and_wait(None, patience).await;
                }
                // Drain: the writer handles everything queued, then commits in post_stop.
                let _ = state.ledger.get().drain_and_wait(patience).await;
                let _ = reply.send(());
                myself.stop(Some("shutdown".to_owned()));
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<RootMsg>,
        event: SupervisionEvent,
        state: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match &event {
            SupervisionEvent::ActorTerminated(cell, _, reason) => (cell, reason.clone()),
            SupervisionEvent::ActorFailed(cell, err) => (cell, Some(format!("failed: {err}"))),
            _ => return Ok(()),
        };
        let Some(kind) = state.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        if state.shutting_down {
            return Ok(());
        }
        tracing::warn!(child = %kind.name(), reason = reason.as_deref().unwrap_or("unknown"), "supervised actor died");
        let history = state.history.entry(kind.clone()).or_default();
        match history.next_delay(&state.cfg.policy) {
            Some(delay) => {
                myself.send_after(delay, move || RootMsg::Restart(kind));
                Ok(())
            }
            None => {
                tracing::error!(child = %kind.name(), "restart intensity exceeded; stopping the actor system");
                Err(format!("{} exceeded its restart intensity", kind.name()).into())
            }
        }
    }
}

impl RootState {
    fn cell_of(&self, kind: &ChildKind) -> Option<ActorCell> {
        let cell = match kind {
            ChildKind::Ledger => self.ledger.get().get_cell(),
            ChildKind::Directory => self.directory.get().get_cell(),
            ChildKind::Provider(n) => self.providers.get(n)?.get().get_cell(),
        };
        self.by_actor.contains_key(&cell.get_id()).then_some(cell)
    }

    async fn restart(
        &mut self,
        myself: &ActorRef<RootMsg>,
        kind: ChildKind,
    ) -> Result<(), ActorProcessingErr> {
        let cell = myself.get_cell();
        let id = match &kind {
            ChildKind::Ledger => {
                let ledger = spawn_ledger(&self.cfg, &self.backlog, &self.journal, cell).await?;
                let id = ledger.get_id();
                self.ledger.set(ledger);
                id
            }
            ChildKind::Directory => {
                let args = directory_args(&self.cfg, &self.ledger, &self.live, &self.books);
                let (d, _) =
                    Actor::spawn_linked(None, Metered::new(AccountDirectory), args, cell).await?;
                let id = d.get_id();
                self.directory.set(d);
                id
            }
            ChildKind::Provider(name) => {
                let (Some(spec), Some(slot), Some(desk)) = (
                    self.specs.get(name),
                    self.providers.get(name),
                    self.desks.get(name),
                ) else {
                    return Ok(());
                };
                let args = ProviderArgs {
                    spec: spec.clone(),
                    desk: desk.clone(),
                };
                let (p, _) =
                    Actor::spawn_linked(None, Metered::new(ProviderActor), args, cell).await?;
                let id = p.get_id();
                slot.set(p);
                id
            }
        };
        tracing::info!(child = %kind.name(), "supervised actor restarted");
        record_restart(kind.kind());
        self.started.insert(kind.clone(), Instant::now());
        self.by_actor.insert(id, kind);
        Ok(())
    }
}

async fn spawn_ledger(
    cfg: &SystemConfig,
    backlog: &Arc<AtomicUsize>,
    journal: &JournalSlot,
    supervisor: ActorCell,
) -> Result<ActorRef<LedgerMsg>, SpawnErr> {
    let args = LedgerArgs {
        store: cfg.store.clone(),
        journal_dir: cfg.ledger.journal_dir.clone(),
        journal_sync: cfg.ledger.journal_sync,
        segment_bytes: cfg.ledger.segment_bytes,
        max_batch: cfg.ledger.max_batch,
        ship_interval: cfg.ledger.ship_interval,
        drain_timeout: cfg.ledger.drain_timeout,
        backlog: backlog.clone(),
        slot: journal.clone(),
    };
    let (ledger, _) =
        Actor::spawn_linked(None, Metered::new(LedgerWriter), args, supervisor).await?;
    Ok(ledger)
}

fn directory_args(
    cfg: &SystemConfig,
    ledger: &Slot<LedgerMsg>,
    live: &LiveAccounts,
    books: &Books,
) -> DirectoryArgs {
    DirectoryArgs {
        store: cfg.store.clone(),
        ledger: ledger.clone(),
        live: live.clone(),
        books: books.clone(),
        idle_after: cfg.account_idle_after,
        policy: cfg.policy,
    }
}

/// The running actor system, as the rest of the gateway sees it.
pub struct ActorSystem {
    root: ActorRef<RootMsg>,
    pub billing: Billing,
    providers: Arc<HashMap<String, Slot<ProviderMsg>>>,
    desks: Arc<HashMap<String, Desk>>,
    directory: Slot<DirectoryMsg>,
}

impl ActorSystem {
    pub async fn start(cfg: SystemConfig) -> Result<ActorSystem, SpawnErr> {
        let max_buffer = cfg.ledger.max_buffer;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (root, _join) =
            Actor::spawn(None, Metered::new(Root), RootArgs { cfg, handles: tx }).await?;
        let handles = rx
            .await
            .map_err(|_| SpawnErr::StartupFailed("the root supervisor did not start".into()))?;
        Ok(ActorSystem {
            billing: Billing::new(
                handles.live,
                handles.books,
                handles.directory.clone(),
                handles.ledger,
                handles.journal,
                handles.backlog,
                max_buffer,
            ),
            providers: Arc::new(handles.providers),
            desks: Arc::new(handles.desks),
            directory: handles.directory,
            root,
        })
    }

    /// Where leases for a provider's calls are taken (see [`Desk`]).
    pub fn desk(&self, name: &str) -> Option<&Desk> {
        self.desks.get(name)
    }

    pub fn provider_names(&self) -> impl Iterator<Item = &String> {
        self.providers.keys()
    }

    pub async fn provider_status(&self) -> Vec<ProviderStatus> {
        let mut out = Vec::new();
        for slot in self.providers.values() {
            if let Ok(CallResult::Success(s)) = slot
                .get()
                .ask(ProviderMsg::Status, Some(Duration::from_secs(2)))
                .await
            {
                out.push(s);
            }
        }
        for s in &mut out {
            if let Some(desk) = self.desks.get(&s.name) {
                (s.retries, s.failovers) = desk.moves();
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The live tree: root, its children, and the account actors under the directory.
    pub async fn tree(&self, accounts: ChildQuery) -> TreeNode {
        let children = match self
            .root
            .ask(RootMsg::Tree, Some(Duration::from_secs(2)))
            .await
        {
            Ok(CallResult::Success(c)) => c,
            _ => Vec::new(),
        };
        let accounts: ChildList = match self
            .directory
            .get()
            .ask(
                |port| DirectoryMsg::Children(accounts, port),
                Some(Duration::from_secs(2)),
            )
            .await
        {
            Ok(CallResult::Success(c)) => c,
            _ => ChildList::default(),
        };
        let nodes = children
            .into_iter()
            .map(|c| TreeNode {
                name: c.kind.name(),
                kind: c.kind.kind().to_owned(),
                status: c.status,
                restarts: c.restarts,
                uptime: c.started.elapsed(),
                mailbox_depth: c.mailbox_depth,
                messages: c.messages,
                children_total: if c.kind == ChildKind::Directory {
                    accounts.total
                } else {
                    0
                },
                children: if c.kind == ChildKind::Directory {
                    accounts
                        .listed
                        .iter()
                        .map(|a| TreeNode {
                            name: format!("account:{}", a.account_id),
                            kind: "account".to_owned(),
                            status: a.status.clone(),
                            restarts: a.restarts,
                            uptime: a.started_at.elapsed(),
                            mailbox_depth: a.mailbox_depth,
                            messages: a.messages,
                            children: Vec::new(),
                            children_total: 0,
                        })
                        .collect()
                } else {
                    Vec::new()
                },
            })
            .collect::<Vec<_>>();
        TreeNode {
            name: "root".to_owned(),
            children_total: nodes.len(),
            kind: "supervisor".to_owned(),
            status: format!("{:?}", self.root.get_status()),
            restarts: 0,
            uptime: Duration::ZERO,
            mailbox_depth: crate::metered::mailbox_depth(self.root.get_id()),
            messages: crate::metered::messages_handled(self.root.get_id()),
            children: nodes,
        }
    }

    /// Kills a supervised actor as a crash would (operators, fault injection).
    pub async fn kill(&self, kind: ChildKind) -> bool {
        matches!(
            self.root.ask(|p| RootMsg::Kill(kind, p), None).await,
            Ok(CallResult::Success(true))
        )
    }

    pub fn is_running(&self) -> bool {
        matches!(self.root.get_status(), ractor::ActorStatus::Running)
    }

    /// Resolves when the root supervisor stops: at shutdown, or when it gave up.
    pub async fn stopped(&self) {
        let _ = self.root.wait(None).await;
    }

    /// Stops accounts, then drains and commits the ledger. Call after HTTP has drained.
    pub async fn shutdown(&self) {
        let _ = self
            .root
            .ask(RootMsg::Shutdown, Some(Duration::from_secs(120)))
            .await;
        let _ = self.root.wait(Some(Duration::from_secs(30))).await;
    }
}

//! The store keyspaces the engine uses, in one place so that their layout is visible.
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `graphs` | injectable name | a user's graph definition (JSON) |
//! | `taskdefs` | injectable name | a user's task definition (JSON) |
//! | `workflows` | workflow id | the workflow record (JSON), with its plan or the id of its plan's record |
//! | `plans` | plan id | a plan that workflow records refer to (JSON), see `plans.rs` |
//! | `plan_state` | plan id | `live`, or `retiring` while it is being removed |
//! | `plan_refs` | `{plan id}/{workflow id}` | empty: a workflow that refers to the plan |
//! | `tasks` | `{workflow id}/{index:05}` | one task's record (JSON); none for a task that has not started (its token derives from the workflow's task key) |
//! | `active` | workflow id | the workflow's partition (decimal; empty in records written before partitions): the index of unfinished workflows, read on start |
//! | `node_locks` | node id | the id of the workflow running on the node |
//! | `children` | `{task id}/{retry}` | the id of the subgraph workflow a `graph.run` task started |
//! | `nodes` | node id | the node record (JSON; OBM passwords sealed when there is a key) |
//! | `node_index` | `t/{tag}\0{id}`, `y/{type}\0{id}`, `e/{OBM host, or endpoint id}\0{id}` | the node id |
//! | `node_idents` | identifier (MAC) | the id of the node that owns it |
//! | `catalogs` | `{node id}/{source}` | one inventory document (JSON) |
//! | `workflow_index` | see `history.rs` | the id: workflows by time, node and graph |
//! | `events` | event number (u64, big-endian) | one retained event (JSON), see `events.rs` |
//! | `endpoints` | endpoint id | a registered Redfish service or IPMI BMC (JSON; its password sealed when there is a key), see `endpoints.rs` |
//! | `batches` | batch id (a UUIDv7, so in creation order) | a bulk run with an entry per node (JSON), see `batches.rs` |
//! | `batches_active` | batch id | empty: the unfinished batches, which the batch runner reads |
//! | `event_stage` | `{partition:03}/{seq:016x}` | an event a replica committed, waiting for the sequencer to number it (JSON), see `sequencer.rs` |
//! | `inbox` | `{partition:03}/{ms:016x}-{id}` | a request for the owner of a partition: load a new workflow, cancel one (JSON), see `scheduler/inbox.rs` |
//! | `waiting` | node id | the task waiting for the node's callback, with its token (JSON, sealed), published by the replica that drives it for the others (`notify.rs`) |
//! | `partitions` | `lease/…`, `fence/…`, `replica/…` | partition leases, fences and replica heartbeats, see `ownership.rs` |
//! | `meta` | `event_log`, `workflow_index`, `node_index`, `nodes_sealed`, `seal_check` | the event log's id; that an index is built, that passwords are sealed; a value sealed with the store's key |
//!
//! The binary keeps keyspaces of its own beside these: `leases` (MAC → a full-mode DHCP
//! lease as JSON), written by its `BootPlanner` in `src/boot.rs`; `hooks` (hook id → a
//! webhook with its delivery cursor, as JSON), written by `src/hooks.rs`; `tokens` (name →
//! a bearer token's role and SHA-256, as JSON), written by `src/auth.rs`; and `audit`
//! (entry number, u64 big-endian → one audited call, as JSON), written by `src/audit.rs`.

pub const GRAPHS: &str = "graphs";
pub const TASKDEFS: &str = "taskdefs";
pub const WORKFLOWS: &str = "workflows";
pub const TASKS: &str = "tasks";
pub const ACTIVE: &str = "active";
pub const NODE_LOCKS: &str = "node_locks";
pub const CHILDREN: &str = "children";
pub const NODES: &str = "nodes";
pub const NODE_IDENTS: &str = "node_idents";
pub const CATALOGS: &str = "catalogs";
pub const EVENTS: &str = "events";
pub const WORKFLOW_INDEX: &str = "workflow_index";
pub const NODE_INDEX: &str = "node_index";
pub const META: &str = "meta";
pub const ENDPOINTS: &str = "endpoints";
pub const BATCHES: &str = "batches";
pub const BATCHES_ACTIVE: &str = "batches_active";
pub const EVENT_STAGE: &str = "event_stage";
pub const INBOX: &str = "inbox";
pub const WAITING: &str = "waiting";
pub const PLANS: &str = "plans";
pub const PLAN_STATE: &str = "plan_state";
pub const PLAN_REFS: &str = "plan_refs";

/// The key of task `index` of workflow `id`.
pub fn task_key(id: &str, index: usize) -> Vec<u8> {
    format!("{id}/{index:05}").into_bytes()
}

/// The prefix of every task key of workflow `id`.
pub fn task_prefix(id: &str) -> Vec<u8> {
    format!("{id}/").into_bytes()
}

//! Network boot's Prometheus metrics: DHCP requests and replies by message type, TFTP
//! transfers by outcome and bytes sent. The binary registers them under the `metalgraph_`
//! prefix; they stay at zero while network boot is off.

use std::sync::LazyLock;

use dhcproto::v4::MessageType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TypeLabels {
    message_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

struct Metrics {
    dhcp_requests: Family<TypeLabels, Counter>,
    dhcp_replies: Family<TypeLabels, Counter>,
    dhcp_malformed: Counter,
    dhcp_dropped: Counter,
    dhcp_lease_writes: Counter,
    dhcp_lease_changes: Counter,
    tftp_transfers: Family<OutcomeLabels, Counter>,
    tftp_sent_bytes: Counter,
    tftp_dropped: Counter,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    dhcp_requests: Family::default(),
    dhcp_replies: Family::default(),
    dhcp_malformed: Counter::default(),
    dhcp_dropped: Counter::default(),
    dhcp_lease_writes: Counter::default(),
    dhcp_lease_changes: Counter::default(),
    tftp_transfers: Family::default(),
    tftp_sent_bytes: Counter::default(),
    tftp_dropped: Counter::default(),
});

fn type_name(t: MessageType) -> &'static str {
    match t {
        MessageType::Discover => "discover",
        MessageType::Offer => "offer",
        MessageType::Request => "request",
        MessageType::Decline => "decline",
        MessageType::Ack => "ack",
        MessageType::Nak => "nak",
        MessageType::Release => "release",
        MessageType::Inform => "inform",
        _ => "other",
    }
}

pub(crate) fn dhcp_request(t: MessageType) {
    METRICS
        .dhcp_requests
        .get_or_create(&TypeLabels {
            message_type: type_name(t),
        })
        .inc();
}

pub(crate) fn dhcp_reply(t: Option<MessageType>) {
    METRICS
        .dhcp_replies
        .get_or_create(&TypeLabels {
            message_type: t.map_or("none", type_name),
        })
        .inc();
}

pub(crate) fn dhcp_malformed() {
    METRICS.dhcp_malformed.inc();
}

pub(crate) fn dhcp_dropped() {
    METRICS.dhcp_dropped.inc();
}

/// The lease writer stored `changes` lease changes in one write (or failed to).
pub(crate) fn dhcp_lease_write(changes: usize) {
    METRICS.dhcp_lease_writes.inc();
    METRICS.dhcp_lease_changes.inc_by(changes as u64);
}

/// A TFTP transfer ended: `completed`, `probe` (a client's size probe, ended after the
/// option acknowledgement), `refused` (no such file) or `failed`.
pub(crate) fn tftp_transfer(outcome: &'static str, bytes: u64) {
    METRICS
        .tftp_transfers
        .get_or_create(&OutcomeLabels { outcome })
        .inc();
    METRICS.tftp_sent_bytes.inc_by(bytes);
}

pub(crate) fn tftp_dropped() {
    METRICS.tftp_dropped.inc();
}

/// Registers network boot's metrics (names without the registry's prefix).
pub fn register(registry: &mut Registry) {
    let m = &*METRICS;
    registry.register(
        "dhcp_requests",
        "DHCP requests received, by message type",
        m.dhcp_requests.clone(),
    );
    registry.register(
        "dhcp_replies",
        "DHCP replies sent, by message type",
        m.dhcp_replies.clone(),
    );
    registry.register(
        "dhcp_malformed",
        "DHCP datagrams that could not be decoded",
        m.dhcp_malformed.clone(),
    );
    registry.register(
        "dhcp_dropped",
        "DHCP requests dropped because too many were in progress",
        m.dhcp_dropped.clone(),
    );
    registry.register(
        "dhcp_lease_writes",
        "Writes of full DHCP's lease writer, each one durable commit of queued lease changes",
        m.dhcp_lease_writes.clone(),
    );
    registry.register(
        "dhcp_lease_changes",
        "Lease changes (grants, releases, declines) the lease writer stored",
        m.dhcp_lease_changes.clone(),
    );
    registry.register(
        "tftp_transfers",
        "TFTP read transfers, by outcome (completed, probe, refused, failed)",
        m.tftp_transfers.clone(),
    );
    registry.register(
        "tftp_sent_bytes",
        "File bytes sent by completed TFTP transfers",
        m.tftp_sent_bytes.clone(),
    );
    registry.register(
        "tftp_dropped",
        "TFTP requests dropped because too many transfers were in progress",
        m.tftp_dropped.clone(),
    );
}

//! The address pool of full DHCP mode: offers, leases, renewals, releases and declined
//! addresses, as a pure state machine over an explicit clock (`now`, Unix seconds).
//!
//! The pool never persists anything itself. `ack` computes the lease to grant and holds its
//! address for it; the server stores the lease through the planner and then calls `commit`
//! (or `abandon` if storing failed), so memory never runs ahead of storage. Several grants
//! can be on their way to storage at once (the server stores them together, one durable
//! write for many), and the holds keep them apart: no two of them can name one address,
//! and a client has at most one lease change on its way at a time ([`Pool::begin`]).
//!
//! Finding a free address costs the addresses scanned, so the scan for a never-leased
//! address goes round the pool from just after the last address it found (as Kea's
//! iterative allocator does) rather than from the start: a pool that fills up does not
//! rescan its leased part, or the addresses offered to clients that never came back, for
//! every new client. Offered addresses are indexed by address, and expired offers are
//! dropped as offers accumulate.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use crate::planner::{Lease, MacAddr};

/// Why the pool cannot give an address; each becomes a NAK or silence in the server.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Every address is leased, offered or declined.
    #[error("the pool {first}-{last} has no free address")]
    Exhausted {
        /// First address of the pool.
        first: Ipv4Addr,
        /// Last address of the pool.
        last: Ipv4Addr,
    },
    /// The client asked for an address that is neither in the pool nor reserved for it.
    #[error("{ip} is neither in the pool nor reserved for {mac}")]
    NotOurs {
        /// The requested address.
        ip: Ipv4Addr,
        /// The requesting client.
        mac: MacAddr,
    },
    /// The address is leased or offered to another client.
    #[error("{ip} is leased or offered to another client")]
    InUse {
        /// The requested address.
        ip: Ipv4Addr,
    },
    /// A client declined the address recently (it is probably in use on the wire).
    #[error("{ip} was declined and is quarantined")]
    Declined {
        /// The requested address.
        ip: Ipv4Addr,
    },
    /// A change to this client's lease (or to the expired lease this grant would replace)
    /// is being stored; the client's retransmission will be answered once it is.
    #[error("a change to the lease of {mac} is being stored")]
    Busy {
        /// The client whose lease is changing.
        mac: MacAddr,
    },
}

/// Durations of the pool, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timers {
    /// How long a granted lease lasts.
    pub lease_secs: u64,
    /// How long an offered address stays set aside for the client it was offered to.
    pub offer_secs: u64,
    /// How long a declined address stays out of use.
    pub decline_secs: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            lease_secs: 3600,
            offer_secs: 30,
            decline_secs: 600,
        }
    }
}

/// A lease the server may grant once it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The lease to store and then commit.
    pub lease: Lease,
    /// Another client whose expired lease on the same address this grant replaces; its
    /// stored lease must be deleted too.
    pub evicts: Option<MacAddr>,
}

#[derive(Debug, Clone, Copy)]
struct Offer {
    ip: Ipv4Addr,
    until: u64,
}

/// Offers kept before expired ones are dropped; the threshold doubles with the live ones.
const OFFERS_BEFORE_PURGE: usize = 1024;

/// The pool `first..=last` with its leases.
#[derive(Debug)]
pub struct Pool {
    first: u32,
    last: u32,
    timers: Timers,
    leases: HashMap<MacAddr, Lease>,
    owners: HashMap<Ipv4Addr, MacAddr>,
    offers: HashMap<MacAddr, Offer>,
    /// The client each address was last offered to (the offer may have expired or moved:
    /// `offers` is the truth).
    offered: HashMap<Ipv4Addr, MacAddr>,
    /// When `offers` reaches this size, expired offers are dropped.
    purge_at: usize,
    declined: HashMap<Ipv4Addr, u64>,
    /// Where the next scan for a never-leased address starts: just after the last address
    /// it found (`first..=last`).
    next: u32,
    /// Addresses that grants on their way to storage will lease, and to whom.
    held: HashMap<Ipv4Addr, MacAddr>,
    /// Clients with a lease change on its way to storage, or whose expired lease a grant on
    /// its way will replace.
    busy: HashSet<MacAddr>,
}

impl Pool {
    /// An empty pool from `first` to `last` inclusive (swapped if given in reverse).
    pub fn new(first: Ipv4Addr, last: Ipv4Addr, timers: Timers) -> Self {
        let (a, b) = (u32::from(first), u32::from(last));
        Pool {
            first: a.min(b),
            last: a.max(b),
            timers,
            leases: HashMap::new(),
            owners: HashMap::new(),
            offers: HashMap::new(),
            offered: HashMap::new(),
            purge_at: OFFERS_BEFORE_PURGE,
            declined: HashMap::new(),
            next: a.min(b),
            held: HashMap::new(),
            busy: HashSet::new(),
        }
    }

    /// Loads stored leases (at start). A later lease for the same MAC or address wins.
    pub fn restore(&mut self, leases: impl IntoIterator<Item = Lease>) {
        for lease in leases {
            self.insert(lease);
        }
    }

    /// The lease held by `mac`, expired or not.
    pub fn lease_of(&self, mac: &MacAddr) -> Option<&Lease> {
        self.leases.get(mac)
    }

    /// All leases, expired or not.
    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&u32::from(ip))
    }

    fn valid_for(&self, ip: Ipv4Addr, reserved: Option<Ipv4Addr>) -> bool {
        self.in_pool(ip) || reserved == Some(ip)
    }

    /// Whether `ip` may go to `mac` at `now`, and if not, why.
    fn check_free(&self, ip: Ipv4Addr, mac: &MacAddr, now: u64) -> Result<(), Error> {
        if self.declined.get(&ip).is_some_and(|until| *until > now) {
            return Err(Error::Declined { ip });
        }
        if let Some(owner) = self.owners.get(&ip)
            && owner != mac
            && self.leases.get(owner).is_some_and(|l| l.expires_unix > now)
        {
            return Err(Error::InUse { ip });
        }
        if self.held.get(&ip).is_some_and(|m| m != mac) {
            return Err(Error::InUse { ip });
        }
        let offered_elsewhere = self.offered.get(&ip).is_some_and(|m| {
            m != mac
                && self
                    .offers
                    .get(m)
                    .is_some_and(|o| o.ip == ip && o.until > now)
        });
        if offered_elsewhere {
            return Err(Error::InUse { ip });
        }
        Ok(())
    }

    /// Picks an address for a DISCOVER from `mac` and sets it aside for a while.
    ///
    /// Preference: the reservation, the client's current or previous lease, an address it
    /// was offered, the address it asked for (option 50), then the next never-leased
    /// address after the last one handed out this way (going round the pool, so a released
    /// address is handed out again once the pool has come round to it), then the lowest
    /// address whose lease has expired.
    pub fn offer(
        &mut self,
        mac: MacAddr,
        requested: Option<Ipv4Addr>,
        reserved: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Ipv4Addr, Error> {
        let candidates = [
            reserved,
            self.leases.get(&mac).map(|l| l.ip),
            self.offers.get(&mac).map(|o| o.ip),
            requested,
        ];
        let preferred = candidates
            .into_iter()
            .flatten()
            .find(|ip| self.valid_for(*ip, reserved) && self.check_free(*ip, &mac, now).is_ok());
        let ip = match preferred {
            Some(ip) => ip,
            None => self.scan(&mac, now)?,
        };
        self.set_offer(
            mac,
            Offer {
                ip,
                until: now.saturating_add(self.timers.offer_secs),
            },
            now,
        );
        Ok(ip)
    }

    fn set_offer(&mut self, mac: MacAddr, offer: Offer, now: u64) {
        if self.offers.len() >= self.purge_at {
            self.offers.retain(|_, o| o.until > now);
            let offers = &self.offers;
            self.offered
                .retain(|ip, m| offers.get(m).is_some_and(|o| o.ip == *ip));
            self.purge_at = (self.offers.len() * 2).max(OFFERS_BEFORE_PURGE);
        }
        self.forget_offer(&mac);
        self.offered.insert(offer.ip, mac);
        self.offers.insert(mac, offer);
    }

    fn scan(&mut self, mac: &MacAddr, now: u64) -> Result<Ipv4Addr, Error> {
        let usable = |n: u32, allow_expired: bool| {
            let ip = Ipv4Addr::from(n);
            (allow_expired || !self.owners.contains_key(&ip))
                && self.check_free(ip, mac, now).is_ok()
        };
        // Round the pool from `next`; in u64, since a pool may end at 255.255.255.255.
        let (first, size) = (u64::from(self.first), u64::from(self.last - self.first) + 1);
        let from = u64::from(self.next) - first;
        let fresh = (0..size)
            .map(|i| (first + (from + i) % size) as u32)
            .find(|n| usable(*n, false));
        let found = fresh.or_else(|| (self.first..=self.last).find(|n| usable(*n, true)));
        if let Some(n) = fresh {
            self.next = if n == self.last { self.first } else { n + 1 };
        }
        found.map(Ipv4Addr::from).ok_or(Error::Exhausted {
            first: Ipv4Addr::from(self.first),
            last: Ipv4Addr::from(self.last),
        })
    }

    /// Computes the lease for a REQUEST of `ip` by `mac` (new, renewed or rebound) and
    /// holds the address for it until the server calls `commit` (once the lease is stored)
    /// or `abandon` (if storing failed); one of the two must follow every `Ok`. The client
    /// is [`busy`](Pool::begin) until then, and so is the client whose expired lease the
    /// grant replaces.
    pub fn ack(
        &mut self,
        mac: MacAddr,
        ip: Ipv4Addr,
        reserved: Option<Ipv4Addr>,
        now: u64,
    ) -> Result<Grant, Error> {
        if !self.valid_for(ip, reserved) {
            return Err(Error::NotOurs { ip, mac });
        }
        self.check_free(ip, &mac, now)?;
        let evicts = self.owners.get(&ip).filter(|owner| **owner != mac).copied();
        if let Some(busy) = [Some(mac), evicts]
            .into_iter()
            .flatten()
            .find(|m| self.busy.contains(m))
        {
            return Err(Error::Busy { mac: busy });
        }
        self.busy.insert(mac);
        self.busy.extend(evicts);
        self.held.insert(ip, mac);
        Ok(Grant {
            lease: Lease {
                mac,
                ip,
                expires_unix: now.saturating_add(self.timers.lease_secs),
            },
            evicts,
        })
    }

    /// Applies a grant computed by `ack` after it has been stored.
    pub fn commit(&mut self, grant: &Grant) {
        self.abandon(grant);
        if let Some(evicted) = grant.evicts
            && self
                .leases
                .get(&evicted)
                .is_some_and(|l| l.ip == grant.lease.ip)
        {
            self.remove(&evicted);
        }
        self.forget_offer(&grant.lease.mac);
        self.insert(grant.lease.clone());
    }

    /// Releases what `ack` held for a grant that could not be stored; the pool is as it
    /// was before the `ack`.
    pub fn abandon(&mut self, grant: &Grant) {
        let mac = grant.lease.mac;
        if self.held.get(&grant.lease.ip) == Some(&mac) {
            self.held.remove(&grant.lease.ip);
        }
        self.busy.remove(&mac);
        if let Some(evicted) = grant.evicts {
            self.busy.remove(&evicted);
        }
    }

    /// Marks `mac` as having a lease change (a release, a decline) on its way to storage,
    /// which `end` clears; `false`, changing nothing, if one already is. Changes to one
    /// client's lease are stored one at a time, so storage and memory see them in the same
    /// order.
    pub fn begin(&mut self, mac: MacAddr) -> bool {
        self.busy.insert(mac)
    }

    /// Clears what `begin` marked.
    pub fn end(&mut self, mac: &MacAddr) {
        self.busy.remove(mac);
    }

    /// Forgets the offer made to `mac` (it chose another server).
    pub fn forget_offer(&mut self, mac: &MacAddr) {
        if let Some(offer) = self.offers.remove(mac)
            && self.offered.get(&offer.ip) == Some(mac)
        {
            self.offered.remove(&offer.ip);
        }
    }

    /// Ends `mac`'s lease on `ip` (DHCPRELEASE); returns the lease if there was one.
    /// A release naming an address the client does not hold changes nothing.
    pub fn release(&mut self, mac: &MacAddr, ip: Ipv4Addr) -> Option<Lease> {
        if self.leases.get(mac).is_some_and(|l| l.ip == ip) {
            self.remove(mac)
        } else {
            None
        }
    }

    /// Handles a DHCPDECLINE of `ip` by `mac`: the address is quarantined and the client's
    /// lease on it removed (returned). Only an address the client holds or was offered can
    /// be declined, so a client cannot take arbitrary addresses out of service.
    pub fn decline(&mut self, mac: &MacAddr, ip: Ipv4Addr, now: u64) -> Option<Lease> {
        let holds = self.leases.get(mac).is_some_and(|l| l.ip == ip);
        let offered = self.offers.get(mac).is_some_and(|o| o.ip == ip);
        if !holds && !offered {
            return None;
        }
        self.declined
            .insert(ip, now.saturating_add(self.timers.decline_secs));
        self.forget_offer(mac);
        if holds { self.remove(mac) } else { None }
    }

    fn insert(&mut self, lease: Lease) {
        self.remove(&lease.mac);
        if let Some(previous) = self.owners.insert(lease.ip, lease.mac) {
            self.leases.remove(&previous);
        }
        self.leases.insert(lease.mac, lease);
    }

    fn remove(&mut self, mac: &MacAddr) -> Option<Lease> {
        let lease = self.leases.remove(mac)?;
        if self.owners.get(&lease.ip) == Some(mac) {
            self.owners.remove(&lease.ip);
        }
        Some(lease)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn mac(n: u8) -> MacAddr {
        MacAddr([0x52, 0x54, 0, 0, 0, n])
    }

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, last)
    }

    fn pool() -> Pool {
        Pool::new(ip(10), ip(12), Timers::default())
    }

    /// One step of a pool scenario and what it must return.
    enum Step {
        Offer(u8, Option<u8>, Option<u8>, Result<u8, &'static str>),
        Ack(u8, u8, Option<u8>, Result<u8, &'static str>),
        Release(u8, u8, bool),
        Decline(u8, u8),
        Advance(u64),
    }

    fn kind(e: &Error) -> &'static str {
        match e {
            Error::Exhausted { .. } => "exhausted",
            Error::NotOurs { .. } => "not-ours",
            Error::InUse { .. } => "in-use",
            Error::Declined { .. } => "declined",
            Error::Busy { .. } => "busy",
        }
    }

    /// Runs `steps` against a fresh 10.0.0.10-12 pool, checking each result.
    fn check(name: &str, steps: Vec<Step>) {
        let mut pool = pool();
        let mut now = NOW;
        for (i, step) in steps.into_iter().enumerate() {
            match step {
                Step::Offer(m, req, res, want) => {
                    let got = pool
                        .offer(mac(m), req.map(ip), res.map(ip), now)
                        .map_err(|e| kind(&e));
                    assert_eq!(got, want.map(ip), "{name}: step {i} offer to {m}");
                }
                Step::Ack(m, a, res, want) => {
                    let got = pool.ack(mac(m), ip(a), res.map(ip), now);
                    if let Ok(grant) = &got {
                        pool.commit(grant);
                    }
                    let got = got.map(|g| g.lease.ip).map_err(|e| kind(&e));
                    assert_eq!(got, want.map(ip), "{name}: step {i} ack for {m}");
                }
                Step::Release(m, a, want) => {
                    let got = pool.release(&mac(m), ip(a)).is_some();
                    assert_eq!(got, want, "{name}: step {i} release by {m}");
                }
                Step::Decline(m, a) => {
                    pool.decline(&mac(m), ip(a), now);
                }
                Step::Advance(secs) => now += secs,
            }
        }
    }

    #[test]
    fn pool_scenarios() {
        use Step::*;
        let cases: Vec<(&str, Vec<Step>)> = vec![
            ("first free address", vec![Offer(1, None, None, Ok(10))]),
            (
                "offers are set aside per client",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Offer(2, None, None, Ok(11)),
                    Offer(1, None, None, Ok(10)),
                ],
            ),
            (
                "requested address honoured when free",
                vec![Offer(1, Some(12), None, Ok(12))],
            ),
            (
                "requested address outside the pool ignored",
                vec![Offer(1, Some(99), None, Ok(10))],
            ),
            (
                "reservation wins, even outside the pool",
                vec![
                    Offer(1, None, Some(50), Ok(50)),
                    Ack(1, 50, Some(50), Ok(50)),
                ],
            ),
            (
                "reservation ignored by ack without it",
                vec![Ack(1, 50, None, Err("not-ours"))],
            ),
            (
                "exhaustion",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Offer(2, None, None, Ok(11)),
                    Offer(3, None, None, Ok(12)),
                    Offer(4, None, None, Err("exhausted")),
                ],
            ),
            (
                "expired offers free their address",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Offer(2, None, None, Ok(11)),
                    Offer(3, None, None, Ok(12)),
                    Advance(31),
                    Offer(4, None, None, Ok(10)),
                ],
            ),
            (
                "ack of an address offered to another client is refused",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Ack(2, 10, None, Err("in-use")),
                ],
            ),
            (
                "lease then renew keeps the address",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Ack(1, 10, None, Ok(10)),
                    Advance(1800),
                    Ack(1, 10, None, Ok(10)),
                    Offer(1, None, None, Ok(10)),
                ],
            ),
            (
                "active lease blocks others",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Ack(2, 10, None, Err("in-use")),
                    Offer(2, Some(10), None, Ok(11)),
                ],
            ),
            (
                "expired lease is reclaimed, never-used addresses first",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Advance(3601),
                    Offer(2, None, None, Ok(11)),
                    Ack(2, 11, None, Ok(11)),
                    Ack(3, 12, None, Ok(12)),
                    Offer(4, None, None, Ok(10)),
                    Ack(4, 10, None, Ok(10)),
                ],
            ),
            (
                "a client gets its expired lease back",
                vec![
                    Ack(1, 11, None, Ok(11)),
                    Advance(7200),
                    Offer(1, None, None, Ok(11)),
                ],
            ),
            (
                "release frees the address",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Release(1, 10, true),
                    Offer(2, None, None, Ok(10)),
                ],
            ),
            (
                "release of an address not held changes nothing",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Release(2, 10, false),
                    Release(1, 11, false),
                    Ack(2, 10, None, Err("in-use")),
                ],
            ),
            (
                "decline quarantines the address for a while",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Decline(1, 10),
                    Ack(1, 10, None, Err("declined")),
                    Offer(1, None, None, Ok(11)),
                    Advance(601),
                    Ack(2, 10, None, Ok(10)),
                ],
            ),
            (
                "decline of an offered address quarantines it",
                vec![
                    Offer(1, None, None, Ok(10)),
                    Decline(1, 10),
                    Offer(1, None, None, Ok(11)),
                ],
            ),
            (
                "a client cannot decline what it does not hold",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Decline(2, 10),
                    Decline(2, 11),
                    Ack(1, 10, None, Ok(10)),
                    Ack(2, 11, None, Ok(11)),
                ],
            ),
            (
                "moving to another address drops the old lease",
                vec![
                    Ack(1, 10, None, Ok(10)),
                    Ack(1, 11, None, Ok(11)),
                    Ack(2, 10, None, Ok(10)),
                ],
            ),
        ];
        for (name, steps) in cases {
            check(name, steps);
        }
    }

    #[test]
    fn grants_on_their_way_to_storage_hold_their_address_and_client() {
        let mut pool = pool();
        let first = pool.ack(mac(1), ip(10), None, NOW).unwrap();
        // Another client cannot have the held address, offered or acknowledged.
        assert_eq!(
            pool.ack(mac(2), ip(10), None, NOW),
            Err(Error::InUse { ip: ip(10) })
        );
        assert_eq!(pool.offer(mac(2), Some(ip(10)), None, NOW), Ok(ip(11)));
        // The same client's retransmission waits for the first grant.
        assert_eq!(
            pool.ack(mac(1), ip(10), None, NOW),
            Err(Error::Busy { mac: mac(1) })
        );
        assert!(!pool.begin(mac(1)), "a release waits too");
        // Storing failed: the pool is as before, and the address free again.
        pool.abandon(&first);
        assert!(pool.lease_of(&mac(1)).is_none());
        let second = pool.ack(mac(3), ip(10), None, NOW).unwrap();
        pool.commit(&second);
        assert_eq!(pool.lease_of(&mac(3)).map(|l| l.ip), Some(ip(10)));
        assert!(pool.begin(mac(3)));
        pool.end(&mac(3));

        // A grant that replaces an expired lease holds that lease's client as well.
        let mut pool = self::pool();
        pool.restore([Lease {
            mac: mac(1),
            ip: ip(10),
            expires_unix: NOW - 1,
        }]);
        assert!(pool.begin(mac(1)), "say, a release on its way");
        assert_eq!(
            pool.ack(mac(2), ip(10), None, NOW),
            Err(Error::Busy { mac: mac(1) })
        );
        pool.end(&mac(1));
        let grant = pool.ack(mac(2), ip(10), None, NOW).unwrap();
        assert_eq!(
            pool.ack(mac(1), ip(11), None, NOW),
            Err(Error::Busy { mac: mac(1) })
        );
        pool.commit(&grant);
        assert!(pool.lease_of(&mac(1)).is_none());
        assert_eq!(
            pool.ack(mac(1), ip(11), None, NOW).map(|g| g.lease.ip),
            Ok(ip(11))
        );
    }

    #[test]
    fn new_clients_get_addresses_in_order_round_the_pool() {
        let first = Ipv4Addr::new(10, 1, 0, 0);
        let mut pool = Pool::new(first, Ipv4Addr::new(10, 1, 0, 99), Timers::default());
        fn client(n: u32) -> MacAddr {
            let b = n.to_be_bytes();
            MacAddr([0x52, 0x54, b[0], b[1], b[2], b[3]])
        }
        fn lease(pool: &mut Pool, n: u32) -> Ipv4Addr {
            let ip = pool.offer(client(n), None, None, NOW).unwrap();
            let grant = pool.ack(client(n), ip, None, NOW).unwrap();
            pool.commit(&grant);
            ip
        }
        let nth = |n: u32| Ipv4Addr::from(u32::from(first) + n);
        for n in 0..60 {
            assert_eq!(lease(&mut pool, n), nth(n));
        }
        // A released address comes back once the pool has come round to it.
        assert!(pool.release(&client(5), nth(5)).is_some());
        assert_eq!(lease(&mut pool, 1000), nth(60));
        // Offers nobody took up are passed over, not rescanned by every client.
        for n in 2000..2010 {
            assert_eq!(
                pool.offer(client(n), None, None, NOW),
                Ok(nth(n - 2000 + 61))
            );
        }
        for n in 71..100 {
            assert_eq!(lease(&mut pool, n), nth(n));
        }
        assert_eq!(lease(&mut pool, 3000), nth(5));
        assert_eq!(
            pool.offer(client(4000), None, None, NOW),
            Err(Error::Exhausted {
                first,
                last: nth(99)
            })
        );
        // Offers that were never taken up expire and are dropped as offers accumulate.
        let mut pool = Pool::new(first, Ipv4Addr::new(10, 1, 255, 255), Timers::default());
        for n in 0..20_000u32 {
            pool.offer(client(n), None, None, NOW + u64::from(n) / 100)
                .unwrap();
        }
        assert!(
            pool.offers.len() < 10_000,
            "{} offers kept",
            pool.offers.len()
        );
    }

    #[test]
    fn grant_names_the_expired_lease_it_replaces_and_restore_loads_leases() {
        let mut pool = pool();
        pool.restore([Lease {
            mac: mac(1),
            ip: ip(10),
            expires_unix: NOW - 1,
        }]);
        let grant = pool.ack(mac(2), ip(10), None, NOW).unwrap();
        assert_eq!(grant.evicts, Some(mac(1)));
        assert_eq!(grant.lease.expires_unix, NOW + 3600);
        pool.commit(&grant);
        assert!(pool.lease_of(&mac(1)).is_none());
        assert_eq!(pool.lease_of(&mac(2)).map(|l| l.ip), Some(ip(10)));
        assert_eq!(pool.leases().count(), 1);
    }
}

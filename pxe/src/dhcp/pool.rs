//! The address pool of full DHCP mode: offers, leases, renewals, releases and declined
//! addresses, as a pure state machine over an explicit clock (`now`, Unix seconds).
//!
//! The pool never persists anything itself. `ack` only computes the lease to grant; the
//! server stores it through the planner and calls `commit` afterwards, so memory never runs
//! ahead of storage.

use std::collections::HashMap;
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

/// The pool `first..=last` with its leases.
#[derive(Debug)]
pub struct Pool {
    first: u32,
    last: u32,
    timers: Timers,
    leases: HashMap<MacAddr, Lease>,
    owners: HashMap<Ipv4Addr, MacAddr>,
    offers: HashMap<MacAddr, Offer>,
    declined: HashMap<Ipv4Addr, u64>,
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
            declined: HashMap::new(),
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
        let offered_elsewhere = self
            .offers
            .iter()
            .any(|(m, o)| m != mac && o.ip == ip && o.until > now);
        if offered_elsewhere {
            return Err(Error::InUse { ip });
        }
        Ok(())
    }

    /// Picks an address for a DISCOVER from `mac` and sets it aside for a while.
    ///
    /// Preference: the reservation, the client's current or previous lease, an address it
    /// was offered, the address it asked for (option 50), then the lowest never-leased
    /// address, then the lowest address whose lease has expired.
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
        self.offers.insert(
            mac,
            Offer {
                ip,
                until: now.saturating_add(self.timers.offer_secs),
            },
        );
        Ok(ip)
    }

    fn scan(&self, mac: &MacAddr, now: u64) -> Result<Ipv4Addr, Error> {
        let usable = |n: u32, allow_expired: bool| {
            let ip = Ipv4Addr::from(n);
            (allow_expired || !self.owners.contains_key(&ip))
                && self.check_free(ip, mac, now).is_ok()
        };
        (self.first..=self.last)
            .find(|n| usable(*n, false))
            .or_else(|| (self.first..=self.last).find(|n| usable(*n, true)))
            .map(Ipv4Addr::from)
            .ok_or(Error::Exhausted {
                first: Ipv4Addr::from(self.first),
                last: Ipv4Addr::from(self.last),
            })
    }

    /// Computes the lease for a REQUEST of `ip` by `mac` (new, renewed or rebound) without
    /// changing the pool; `commit` applies it once stored.
    pub fn ack(
        &self,
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
        if let Some(evicted) = grant.evicts {
            self.remove(&evicted);
        }
        self.offers.remove(&grant.lease.mac);
        self.insert(grant.lease.clone());
    }

    /// Forgets the offer made to `mac` (it chose another server).
    pub fn forget_offer(&mut self, mac: &MacAddr) {
        self.offers.remove(mac);
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
        self.offers.remove(mac);
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

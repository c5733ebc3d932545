//! What a stranger may cost this node: the decisions behind circuit and
//! slot admission. Pure: peers, addresses, slot summaries and `now` in,
//! decisions out; [`super::server`] and [`super::host`] carry them out.
//!
//! Identities are free, addresses and work are not. So:
//!
//! - **Circuits** are counted per *address group* of the peer that opened
//!   the stream (a public IPv4 /24, a public IPv6 /48; see [`group_of`]),
//!   whatever identities it uses. A group holds at most
//!   [`CircuitLimits::per_group`] circuits (a quarter of the node's, by
//!   default), one identity at most [`CircuitLimits::per_peer`].
//! - **Setups that carry no data** are held apart: a circuit counts as a
//!   *setup* from its stream's arrival until its first cell. At most a
//!   quarter of the node's circuits may be setups ([`CircuitLimits::setups`]),
//!   at most a sixteenth from one group; a setup older than
//!   [`CircuitLimits::first_cell`] (10 s) is overdue and gives its place
//!   to the next setup that needs it. The other three quarters are only
//!   ever held by circuits that move data.
//! - **Slots** cost work and must be used: creating one takes a proof of
//!   work that grows with its size ([`work_bits`]), and a full host gives
//!   a newcomer the place of a slot nobody uses ([`choose_victim`]): a
//!   claim whose job never started within [`SETUP_PROTECT_SECS`], else the
//!   slot idle the longest past [`SlotRules::idle_secs`].
//!
//! Memory is the fourth budget, in [`super::budget`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use libp2p::PeerId;

use crate::store::{SlotId, SlotMeta};

/// Peers that share quotas: one network, as far as this node can tell.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    /// A public IPv4 /24.
    V4([u8; 3]),
    /// A public IPv6 /48.
    V6([u8; 6]),
    /// One address on a private network (RFC 1918, link-local, unique
    /// local IPv6): the operator's own network, one group per machine.
    Private(IpAddr),
    /// A peer with no IP address to group by: loopback (processes on this
    /// machine), the in-process memory transport, or an address not known
    /// yet. Each such peer is its own group.
    Peer(PeerId),
}

/// The group of `peer` connected from `ip` (`None`: no IP address).
pub fn group_of(peer: PeerId, ip: Option<IpAddr>) -> Group {
    let ip = match ip {
        Some(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        Some(ip) => ip,
        None => return Group::Peer(peer),
    };
    if ip.is_loopback() || ip.is_unspecified() {
        return Group::Peer(peer);
    }
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_private() || v4.is_link_local() {
                Group::Private(ip)
            } else {
                let o = v4.octets();
                Group::V4([o[0], o[1], o[2]])
            }
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            // fc00::/7 unique local, fe80::/10 link-local.
            if (s[0] & 0xfe00) == 0xfc00 || (s[0] & 0xffc0) == 0xfe80 {
                Group::Private(ip)
            } else {
                let o = v6.octets();
                Group::V6([o[0], o[1], o[2], o[3], o[4], o[5]])
            }
        }
    }
}

/// How many circuits this node serves, and to whom.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitLimits {
    /// Circuits at once, in total (`max_circuits`).
    pub total: usize,
    /// Circuits one address group may hold (`circuits_per_group`).
    pub per_group: usize,
    /// Circuits one identity may hold.
    pub per_peer: usize,
    /// Circuits that have not carried a cell yet, all groups together.
    pub setups: usize,
    /// Such circuits of one group.
    pub setups_per_group: usize,
    /// A setup older than this without a cell gives its place to the next
    /// setup that needs one.
    pub first_cell: Duration,
}

/// Circuits one identity may hold through this node at once.
pub const MAX_CIRCUITS_PER_PEER: usize = 64;

impl CircuitLimits {
    /// Limits for `total` circuits, `per_group` of them for one address
    /// group: a quarter of the circuits (a quarter of a group's) may be
    /// setups.
    pub fn new(total: usize, per_group: usize, first_cell: Duration) -> Self {
        let total = total.max(1);
        let per_group = per_group.clamp(1, total);
        Self {
            total,
            per_group,
            per_peer: MAX_CIRCUITS_PER_PEER.min(per_group),
            setups: (total / 4).max(1),
            setups_per_group: (per_group / 4).max(1),
            first_cell,
        }
    }
}

/// Names one admitted circuit.
pub type CircuitId = u64;

/// What to do with a new circuit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Serve it as `id`; first end the overdue setup `preempt`, whose place
    /// it takes.
    Yes {
        id: CircuitId,
        preempt: Option<CircuitId>,
    },
    /// Refuse it, for this reason (a metric label).
    No(&'static str),
}

#[derive(Clone, Debug)]
struct Entry {
    peer: PeerId,
    group: Group,
    admitted: Instant,
    moved: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct Count {
    all: usize,
    setups: usize,
}

/// The circuits this node serves, by group and by phase. Pure.
#[derive(Debug)]
pub struct CircuitAdmission {
    limits: CircuitLimits,
    next: CircuitId,
    /// In order of admission (ids only grow).
    circuits: BTreeMap<CircuitId, Entry>,
    groups: HashMap<Group, Count>,
    peers: HashMap<PeerId, Count>,
    setups: usize,
}

impl CircuitAdmission {
    pub fn new(limits: CircuitLimits) -> Self {
        Self {
            limits,
            next: 0,
            circuits: BTreeMap::new(),
            groups: HashMap::new(),
            peers: HashMap::new(),
            setups: 0,
        }
    }

    pub fn limits(&self) -> &CircuitLimits {
        &self.limits
    }

    /// Circuits held now.
    pub fn len(&self) -> usize {
        self.circuits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.circuits.is_empty()
    }

    /// Circuits that have not carried a cell yet.
    pub fn setups(&self) -> usize {
        self.setups
    }

    /// Circuits `group` holds (all, setups).
    pub fn held_by(&self, group: &Group) -> (usize, usize) {
        self.groups.get(group).map_or((0, 0), |c| (c.all, c.setups))
    }

    /// A new stream from `peer` in `group` at `now`.
    pub fn admit(&mut self, peer: PeerId, group: Group, now: Instant) -> Admit {
        let l = self.limits;
        let p = self.peers.get(&peer).copied().unwrap_or_default();
        let g = self.groups.get(&group).copied().unwrap_or_default();
        // Every limit reached narrows where a place may come from; the
        // narrowest names the refusal.
        let mut reason = None;
        if self.setups >= l.setups {
            reason = Some("setups_full");
        }
        if self.circuits.len() >= l.total {
            reason = Some("circuits_full");
        }
        let same_group = g.setups >= l.setups_per_group || g.all >= l.per_group;
        if g.setups >= l.setups_per_group {
            reason = Some("group_setups");
        }
        if g.all >= l.per_group {
            reason = Some("group_quota");
        }
        let same_peer = p.all >= l.per_peer;
        if same_peer {
            reason = Some("peer_quota");
        }
        let preempt = match reason {
            None => None,
            Some(reason) => {
                // The victim is a setup of the newcomer's peer and group
                // where those are full: ending it frees a place in every
                // count that is full.
                let victim = self
                    .circuits
                    .iter()
                    .find(|(_, e)| {
                        !e.moved
                            && now.saturating_duration_since(e.admitted) >= l.first_cell
                            && (!same_group || e.group == group)
                            && (!same_peer || e.peer == peer)
                    })
                    .map(|(id, _)| *id);
                match victim {
                    Some(v) => {
                        self.end(v);
                        Some(v)
                    }
                    None => return Admit::No(reason),
                }
            }
        };
        let id = self.next;
        self.next += 1;
        self.circuits.insert(
            id,
            Entry {
                peer,
                group,
                admitted: now,
                moved: false,
            },
        );
        self.setups += 1;
        for c in [
            self.groups.entry(group).or_default(),
            self.peers.entry(peer).or_default(),
        ] {
            c.all += 1;
            c.setups += 1;
        }
        Admit::Yes { id, preempt }
    }

    /// Circuit `id` carried its first cell: it is no longer a setup.
    pub fn moved(&mut self, id: CircuitId) {
        let Some(e) = self.circuits.get_mut(&id) else {
            return;
        };
        if e.moved {
            return;
        }
        e.moved = true;
        self.setups -= 1;
        let (peer, group) = (e.peer, e.group);
        for c in [self.groups.get_mut(&group), self.peers.get_mut(&peer)]
            .into_iter()
            .flatten()
        {
            c.setups -= 1;
        }
    }

    /// Circuit `id` ended (or was preempted); forgetting it twice is fine.
    pub fn end(&mut self, id: CircuitId) {
        let Some(e) = self.circuits.remove(&id) else {
            return;
        };
        let setup = usize::from(!e.moved);
        self.setups -= setup;
        if let Some(c) = self.groups.get_mut(&e.group) {
            c.all -= 1;
            c.setups -= setup;
            if c.all == 0 {
                self.groups.remove(&e.group);
            }
        }
        if let Some(c) = self.peers.get_mut(&e.peer) {
            c.all -= 1;
            c.setups -= setup;
            if c.all == 0 {
                self.peers.remove(&e.peer);
            }
        }
    }
}

/// A claim (a slot whose job has not started) cannot be taken over for
/// this long after it was made: the time a client needs between creating
/// a slot and its first message.
pub const SETUP_PROTECT_SECS: u64 = 20;

/// When a host may give a slot's place to a newcomer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRules {
    /// A slot its owner has not used for this long goes first.
    pub idle_secs: u64,
}

/// Whether a slot not bound to any circuit may make room for a new one at
/// `now`: a claim whose job never started within [`SETUP_PROTECT_SECS`],
/// or a slot unused for `idle_secs`.
pub fn reclaimable(m: &SlotMeta, now: u64, rules: SlotRules) -> bool {
    if m.lease.confirmed {
        now >= m.lease.last_used.saturating_add(rules.idle_secs)
    } else {
        now >= m.lease.created.saturating_add(SETUP_PROTECT_SECS)
    }
}

/// When a slot becomes reclaimable (unix seconds).
fn reclaimable_at(m: &SlotMeta, rules: SlotRules) -> u64 {
    if m.lease.confirmed {
        m.lease.last_used.saturating_add(rules.idle_secs)
    } else {
        m.lease.created.saturating_add(SETUP_PROTECT_SECS)
    }
}

/// The slot to free for a newcomer on a full host: among those no circuit
/// uses (`live` says which are used), claims that never started first
/// (oldest first), then the slot idle the longest.
pub fn choose_victim(
    metas: &[SlotMeta],
    live: impl Fn(&SlotId) -> bool,
    now: u64,
    rules: SlotRules,
) -> Option<SlotId> {
    metas
        .iter()
        .filter(|m| !live(&m.id) && reclaimable(m, now, rules))
        .min_by_key(|m| {
            (
                m.lease.confirmed,
                if m.lease.confirmed {
                    m.lease.last_used
                } else {
                    m.lease.created
                },
            )
        })
        .map(|m| m.id)
}

/// The slots a host can offer at `now`: free ones, and those a newcomer
/// may take over.
pub fn free_slots(metas: &[SlotMeta], offered: u32, now: u64, rules: SlotRules) -> u32 {
    let kept = metas.iter().filter(|m| !reclaimable(m, now, rules)).count() as u32;
    offered.saturating_sub(kept)
}

/// The next time (unix seconds, after `now`) a slot becomes reclaimable.
pub fn next_reclaim(metas: &[SlotMeta], now: u64, rules: SlotRules) -> Option<u64> {
    metas
        .iter()
        .map(|m| reclaimable_at(m, rules))
        .filter(|&t| t > now)
        .min()
}

/// Work a slot claim carries at the least: `2^WORK_BASE_BITS` hashes.
pub const WORK_BASE_BITS: u32 = 16;
/// The most work any claim needs.
pub const WORK_MAX_BITS: u32 = 32;

/// Leading zero bits a slot claim's work hash needs for a slot whose
/// stored state is `state_bytes` long: [`WORK_BASE_BITS`], and one more for
/// every doubling past 1 MiB (2^16 hashes for a small layer, about 25 ms on
/// one core; 2^25, about 13 s, for a 50-million-parameter layer with
/// momentum).
pub fn work_bits(state_bytes: u64) -> u32 {
    let mib = state_bytes.div_ceil(1 << 20).max(1);
    let doublings = 64 - (mib - 1).leading_zeros();
    (WORK_BASE_BITS + doublings).min(WORK_MAX_BITS)
}

/// Leading zero bits of `hash`.
pub fn leading_zeros(hash: &[u8; 32]) -> u32 {
    let mut n = 0;
    for b in hash {
        if *b == 0 {
            n += 8;
        } else {
            return n + b.leading_zeros();
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Lease;

    fn peers(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId::random()).collect()
    }

    fn limits() -> CircuitLimits {
        CircuitLimits::new(256, 64, Duration::from_secs(10))
    }

    #[test]
    fn groups_are_slash_24_and_slash_48_and_private_hosts_alone() {
        let p = PeerId::random();
        let g = |s: &str| group_of(p, Some(s.parse().expect("ip")));
        assert_eq!(g("203.0.113.7"), g("203.0.113.250"));
        assert_ne!(g("203.0.113.7"), g("203.0.114.7"));
        assert_eq!(g("2001:db8:1:2::1"), g("2001:db8:1:ffff::9"));
        assert_ne!(g("2001:db8:1::1"), g("2001:db8:2::1"));
        // An IPv4-mapped IPv6 address is its IPv4 address.
        assert_eq!(g("::ffff:203.0.113.9"), g("203.0.113.7"));
        assert_ne!(g("10.0.0.1"), g("10.0.0.2"));
        assert_ne!(g("fd00::1"), g("fd00::2"));
        // Loopback and unknown: the peer alone.
        assert_eq!(g("127.0.0.1"), Group::Peer(p));
        assert_eq!(group_of(p, None), Group::Peer(p));
        assert_ne!(
            group_of(PeerId::random(), Some("127.0.0.1".parse().expect("ip"))),
            g("127.0.0.1")
        );
    }

    #[test]
    fn many_identities_from_one_group_hold_a_quarter_and_never_the_reserve() {
        let mut a = CircuitAdmission::new(limits());
        let now = Instant::now();
        let stranger = Group::V4([203, 0, 113]);
        let ids = peers(5);
        // 5 identities x 64 setups that never send a cell.
        let mut admitted = Vec::new();
        let mut refused = 0;
        for p in &ids {
            for _ in 0..64 {
                match a.admit(*p, stranger, now) {
                    Admit::Yes { id, preempt: None } => admitted.push(id),
                    Admit::Yes { .. } => panic!("nothing is overdue yet"),
                    Admit::No(r) => {
                        assert_eq!(r, "group_setups");
                        refused += 1;
                    }
                }
            }
        }
        assert_eq!(admitted.len(), 16, "a sixteenth of the node's circuits");
        assert_eq!(refused, 320 - 16);
        // Those that move data count against the group's quarter.
        for id in &admitted {
            a.moved(*id);
        }
        let mut n = 16;
        for p in ids.iter().cycle().take(200) {
            if let Admit::Yes { id, .. } = a.admit(*p, stranger, now) {
                a.moved(id);
                n += 1;
            }
        }
        assert_eq!(n, 64);
        assert_eq!(a.held_by(&stranger), (64, 0));
        // Everyone else still gets in, and setups from other groups too.
        let honest = PeerId::random();
        assert!(matches!(
            a.admit(honest, Group::Peer(honest), now),
            Admit::Yes { preempt: None, .. }
        ));
    }

    #[test]
    fn overdue_setups_give_their_place_and_moving_circuits_keep_theirs() {
        let mut a = CircuitAdmission::new(limits());
        let t0 = Instant::now();
        // 16 groups fill the setups' quarter.
        let mut ids = Vec::new();
        for i in 0..16u8 {
            for p in peers(4) {
                let Admit::Yes { id, .. } = a.admit(p, Group::V4([198, 51, i]), t0) else {
                    panic!("room for setups")
                };
                ids.push(id);
            }
        }
        assert_eq!(a.setups(), 64);
        let honest = PeerId::random();
        let hg = Group::Peer(honest);
        assert_eq!(a.admit(honest, hg, t0), Admit::No("setups_full"));
        assert_eq!(
            a.admit(honest, hg, t0 + Duration::from_secs(9)),
            Admit::No("setups_full")
        );
        // 10 s later the oldest setup gives way.
        let later = t0 + Duration::from_secs(10);
        match a.admit(honest, hg, later) {
            Admit::Yes { preempt, id } => {
                assert_eq!(preempt, Some(ids[0]));
                a.moved(id);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.setups(), 63);
        // The others start moving data; moving circuits fill the node and
        // none of them is ever preempted.
        for id in &ids[1..] {
            a.moved(*id);
        }
        while a.len() < 256 {
            let p = PeerId::random();
            match a.admit(p, Group::Peer(p), later) {
                Admit::Yes { id, preempt: None } => a.moved(id),
                other => panic!("{other:?}"),
            }
        }
        let p = PeerId::random();
        assert_eq!(
            a.admit(p, Group::Peer(p), later + Duration::from_secs(600)),
            Admit::No("circuits_full")
        );
    }

    #[test]
    fn ending_circuits_frees_every_count() {
        let mut a = CircuitAdmission::new(CircuitLimits::new(8, 4, Duration::from_secs(1)));
        let p = PeerId::random();
        let g = Group::V4([1, 2, 3]);
        let now = Instant::now();
        let Admit::Yes { id: x, .. } = a.admit(p, g, now) else {
            panic!()
        };
        assert_eq!(a.limits().setups_per_group, 1);
        assert_eq!(a.admit(p, g, now), Admit::No("group_setups"));
        a.moved(x);
        a.moved(x);
        let Admit::Yes { id: y, .. } = a.admit(p, g, now) else {
            panic!()
        };
        a.end(x);
        a.end(x);
        a.end(y);
        assert!(a.is_empty());
        assert_eq!(a.setups(), 0);
        assert_eq!(a.held_by(&g), (0, 0));
    }

    fn meta(id: u8, created: u64, last_used: u64, confirmed: bool) -> SlotMeta {
        SlotMeta {
            id: [id; 16],
            owner: [0; 32],
            version: 0,
            param_count: 1,
            lease: Lease {
                created,
                last_used,
                until: u64::MAX,
                confirmed,
            },
            state_len: 0,
            digest: [0; 32],
        }
    }

    #[test]
    fn unstarted_claims_go_first_then_the_longest_idle() {
        let rules = SlotRules { idle_secs: 600 };
        let now = 10_000;
        let metas = vec![
            meta(1, 0, now - 700, true),        // idle past the grace
            meta(2, 0, now - 900, true),        // idle longer
            meta(3, now - 30, now - 30, false), // a claim that never ran
            meta(4, now - 5, now - 5, false),   // a claim just made
            meta(5, 0, now - 10, true),         // in use
        ];
        assert_eq!(choose_victim(&metas, |_| false, now, rules), Some([3; 16]));
        assert_eq!(
            choose_victim(&metas, |id| *id == [3; 16], now, rules),
            Some([2; 16])
        );
        assert_eq!(
            choose_victim(&metas, |id| id[0] <= 3, now, rules),
            None,
            "slots in use and fresh claims stay"
        );
        assert_eq!(free_slots(&metas, 6, now, rules), 4);
        assert_eq!(free_slots(&metas, 2, now, rules), 0);
        assert_eq!(next_reclaim(&metas, now, rules), Some(now + 15));
    }

    #[test]
    fn work_grows_with_the_slot() {
        assert_eq!(work_bits(0), 16);
        assert_eq!(work_bits(1 << 20), 16);
        assert_eq!(work_bits((1 << 20) + 1), 17);
        assert_eq!(work_bits(600 << 20), 26);
        assert_eq!(work_bits(u64::MAX), WORK_MAX_BITS);
        let mut h = [0u8; 32];
        assert_eq!(leading_zeros(&h), 256);
        h[2] = 0x10;
        assert_eq!(leading_zeros(&h), 19);
    }
}

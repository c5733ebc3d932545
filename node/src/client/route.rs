//! Route choice: which volunteers host which stage, and which mixes sit
//! between them. Pure: candidates and a random source in, a route out.
//!
//! Rules: a layer host has the role, a free slot and room for its stage;
//! no peer appears twice in one ring; mixes are drawn at random among the
//! rest, preferring peers on addresses the ring does not use yet.

use std::collections::HashSet;

use libp2p::PeerId;
use rand::seq::SliceRandom;
use rand::Rng;
use thiserror::Error;

use crate::discovery::Volunteer;

/// One peer a route may use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub peer: PeerId,
    pub onion_key: [u8; 32],
    pub epoch: u64,
    pub layer_host: bool,
    pub mix: bool,
    pub free_slots: u32,
    pub max_params: u64,
    /// The peer offers AES-256-GCM cells (its descriptor's
    /// `capacity.aes_gcm`).
    pub aes_gcm: bool,
    /// Network addresses (IP part only) for diversity.
    pub hosts: Vec<String>,
}

impl From<&Volunteer> for Candidate {
    fn from(v: &Volunteer) -> Self {
        let d = &v.descriptor;
        let hosts = d
            .addresses
            .iter()
            .filter_map(|a| a.split('/').nth(2).map(str::to_string))
            .collect();
        Self {
            peer: v.peer_id,
            onion_key: d.onion_key,
            epoch: d.epoch,
            layer_host: d.roles.layer_host,
            mix: d.roles.mix,
            free_slots: d.free_slots,
            max_params: d.capacity.max_params,
            aes_gcm: d.capacity.aes_gcm,
            hosts,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RouteError {
    #[error(
        "not enough volunteers: stage {stage} needs a layer host with a free slot and room for {params} parameters, \
         and none is left ({hosts} layer hosts found in all)"
    )]
    NoHost {
        stage: usize,
        params: u64,
        hosts: usize,
    },
    #[error(
        "stage {stage} has {params} parameters, more than any volunteer accepts (at most {largest}); \
         use smaller layers, or volunteers started with a larger --max-params"
    )]
    TooLarge {
        stage: usize,
        params: u64,
        largest: u64,
    },
    #[error(
        "not enough volunteers: a ring needs {need} distinct mixes besides its {hosts} layer hosts, \
         but only {have} are available; start more `mixnn node --mix` or pass a smaller --mixes"
    )]
    NotEnoughMixes {
        need: usize,
        have: usize,
        hosts: usize,
    },
}

/// Hosts per remote stage and the mixes of each ring's segments.
#[derive(Clone, Debug)]
pub struct Route {
    pub hosts: Vec<Candidate>,
    /// `hosts.len() + 1` segments of mixes on the forward ring, in ring order.
    pub forward_mixes: Vec<Vec<Candidate>>,
    /// `hosts.len() + 1` segments on the backward ring, in ring order
    /// (segment 0 runs from the client to the last host).
    pub backward_mixes: Vec<Vec<Candidate>>,
}

/// Choose hosts for stages needing `stage_params` parameters each, and
/// `mixes` mixes per segment for a forward and (if `backward`) a backward ring.
pub fn choose_route<R: Rng>(
    candidates: &[Candidate],
    stage_params: &[u64],
    mixes: usize,
    backward: bool,
    rng: &mut R,
) -> Result<Route, RouteError> {
    let keep = vec![None; stage_params.len()];
    choose_route_keeping(
        candidates,
        stage_params,
        &keep,
        &HashSet::new(),
        mixes,
        backward,
        rng,
    )
}

/// [`choose_route`] for a job that already runs: stage `i` stays on
/// `keep[i]` when that peer is still a candidate and not in `avoid` (it
/// holds the stage's slot, so it needs no free one); every other stage gets
/// a new host, and no hop is a peer in `avoid`.
pub fn choose_route_keeping<R: Rng>(
    candidates: &[Candidate],
    stage_params: &[u64],
    keep: &[Option<PeerId>],
    avoid: &HashSet<PeerId>,
    mixes: usize,
    backward: bool,
    rng: &mut R,
) -> Result<Route, RouteError> {
    let allowed: Vec<Candidate> = candidates
        .iter()
        .filter(|c| !avoid.contains(&c.peer))
        .cloned()
        .collect();
    let mut pool: Vec<&Candidate> = allowed.iter().collect();
    pool.shuffle(rng);
    let host_count = allowed.iter().filter(|c| c.layer_host).count();
    let kept: Vec<Option<&Candidate>> = (0..stage_params.len())
        .map(|i| {
            keep.get(i)
                .copied()
                .flatten()
                .and_then(|p| allowed.iter().find(|c| c.peer == p))
        })
        .collect();
    let mut used: HashSet<PeerId> = kept.iter().flatten().map(|c| c.peer).collect();
    let mut hosts = Vec::with_capacity(stage_params.len());
    for (stage, &params) in stage_params.iter().enumerate() {
        if let Some(c) = kept[stage] {
            hosts.push(c.clone());
            continue;
        }
        let largest = pool
            .iter()
            .filter(|c| c.layer_host)
            .map(|c| c.max_params)
            .max()
            .unwrap_or(0);
        if host_count > 0 && params > largest {
            return Err(RouteError::TooLarge {
                stage,
                params,
                largest,
            });
        }
        // Prefer hosts that are not mixes, so mixes stay available.
        let pick = pool
            .iter()
            .filter(|c| {
                c.layer_host
                    && c.free_slots > 0
                    && c.max_params >= params
                    && !used.contains(&c.peer)
            })
            .min_by_key(|c| c.mix)
            .copied()
            .ok_or(RouteError::NoHost {
                stage,
                params,
                hosts: host_count,
            })?;
        used.insert(pick.peer);
        hosts.push(pick.clone());
    }
    let forward_mixes = choose_mixes(&allowed, &hosts, mixes, rng)?;
    let backward_mixes = if backward {
        choose_mixes(&allowed, &hosts, mixes, rng)?
    } else {
        vec![]
    };
    Ok(Route {
        hosts,
        forward_mixes,
        backward_mixes,
    })
}

/// `mixes` mixes for each of the `hosts.len() + 1` segments of one ring:
/// distinct, none of them a host of the ring.
pub fn choose_mixes<R: Rng>(
    candidates: &[Candidate],
    hosts: &[Candidate],
    mixes: usize,
    rng: &mut R,
) -> Result<Vec<Vec<Candidate>>, RouteError> {
    let segments = hosts.len() + 1;
    if mixes == 0 {
        return Ok(vec![vec![]; segments]);
    }
    let used: HashSet<PeerId> = hosts.iter().map(|h| h.peer).collect();
    let need = segments * mixes;
    let mut free: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.mix && !used.contains(&c.peer))
        .collect();
    if free.len() < need {
        return Err(RouteError::NotEnoughMixes {
            need,
            have: free.len(),
            hosts: hosts.len(),
        });
    }
    free.shuffle(rng);
    let mut addrs: HashSet<String> = hosts.iter().flat_map(|h| h.hosts.iter().cloned()).collect();
    let mut chosen = Vec::with_capacity(need);
    for _ in 0..need {
        // Prefer a mix on an address the ring does not use yet.
        let idx = free
            .iter()
            .position(|c| c.hosts.iter().all(|h| !addrs.contains(h)))
            .unwrap_or(0);
        let c = free.remove(idx);
        addrs.extend(c.hosts.iter().cloned());
        chosen.push(c.clone());
    }
    Ok(chosen.chunks(mixes).map(|c| c.to_vec()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cand(i: u8, host: bool, mix: bool) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            onion_key: [i; 32],
            epoch: 1,
            layer_host: host,
            mix,
            free_slots: 1,
            max_params: 1_000_000,
            aes_gcm: false,
            hosts: vec![format!("10.0.0.{i}")],
        }
    }

    fn all_distinct(ring: &[&Candidate]) -> bool {
        let set: HashSet<_> = ring.iter().map(|c| c.peer).collect();
        set.len() == ring.len()
    }

    #[test]
    fn rings_never_use_a_peer_twice() {
        let cands: Vec<_> = (0..12).map(|i| cand(i, i % 2 == 0, true)).collect();
        for seed in 0..50 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let r = choose_route(&cands, &[100, 100, 100], 1, true, &mut rng).expect("route");
            assert_eq!(r.hosts.len(), 3);
            assert_eq!(r.forward_mixes.len(), 4);
            assert_eq!(r.backward_mixes.len(), 4);
            for mixes in [&r.forward_mixes, &r.backward_mixes] {
                let mut ring: Vec<&Candidate> = r.hosts.iter().collect();
                ring.extend(mixes.iter().flatten());
                assert_eq!(ring.len(), 7);
                assert!(all_distinct(&ring), "seed {seed}");
                assert!(mixes.iter().flatten().all(|m| m.mix));
            }
        }
    }

    #[test]
    fn capacity_and_shortage_are_errors() {
        let mut cands: Vec<_> = (0..6).map(|i| cand(i, true, true)).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        // 2 hosts + 3 mixes fit in 6 peers; 3 hosts + 4 mixes do not.
        assert!(choose_route(&cands, &[1, 1], 1, true, &mut rng).is_ok());
        assert!(matches!(
            choose_route(&cands, &[1, 1, 1], 1, true, &mut rng),
            Err(RouteError::NotEnoughMixes {
                need: 4,
                have: 3,
                ..
            })
        ));
        cands.iter_mut().for_each(|c| c.max_params = 10);
        let too_large = choose_route(&cands, &[5, 100], 1, true, &mut rng);
        assert_eq!(
            too_large.as_ref().err(),
            Some(&RouteError::TooLarge {
                stage: 1,
                params: 100,
                largest: 10
            })
        );
        assert!(too_large
            .expect_err("too large")
            .to_string()
            .contains("--max-params"));
        cands.iter_mut().for_each(|c| {
            c.max_params = 1000;
            c.free_slots = 0
        });
        assert!(choose_route(&cands, &[100], 1, true, &mut rng).is_err());
    }

    #[test]
    fn a_running_job_keeps_its_hosts_and_avoids_banned_peers() {
        let cands: Vec<_> = (0..10).map(|i| cand(i, true, true)).collect();
        for seed in 0..30 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let first = choose_route(&cands, &[1, 1, 1], 1, true, &mut rng).expect("route");
            let dead = first.hosts[1].peer;
            let keep: Vec<Option<PeerId>> = first.hosts.iter().map(|h| Some(h.peer)).collect();
            let avoid: HashSet<PeerId> = [dead, first.forward_mixes[0][0].peer].into();
            let mut full = cands.clone();
            // A kept host needs no free slot: it holds the stage already.
            full.iter_mut()
                .filter(|c| c.peer == first.hosts[0].peer)
                .for_each(|c| c.free_slots = 0);
            let next = choose_route_keeping(&full, &[1, 1, 1], &keep, &avoid, 1, true, &mut rng)
                .expect("route");
            assert_eq!(next.hosts[0].peer, first.hosts[0].peer, "seed {seed}");
            assert_eq!(next.hosts[2].peer, first.hosts[2].peer, "seed {seed}");
            assert_ne!(next.hosts[1].peer, dead, "seed {seed}");
            let all: Vec<PeerId> = next
                .hosts
                .iter()
                .chain(next.forward_mixes.iter().flatten())
                .chain(next.backward_mixes.iter().flatten())
                .map(|c| c.peer)
                .collect();
            assert!(all.iter().all(|p| !avoid.contains(p)), "seed {seed}");
        }
        // With too few peers left the error says so at once.
        let avoid: HashSet<PeerId> = cands[..6].iter().map(|c| c.peer).collect();
        assert!(matches!(
            choose_route_keeping(
                &cands,
                &[1, 1, 1],
                &[None; 3],
                &avoid,
                1,
                true,
                &mut rand::rngs::StdRng::seed_from_u64(1)
            ),
            Err(RouteError::NotEnoughMixes { .. })
        ));
    }

    #[test]
    fn mixes_prefer_other_addresses() {
        let mut cands: Vec<_> = (0..8).map(|i| cand(i, i < 2, i >= 2)).collect();
        // Two mixes share the first host's address.
        cands[2].hosts = cands[0].hosts.clone();
        cands[3].hosts = cands[0].hosts.clone();
        for seed in 0..20 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let r = choose_route(&cands, &[1, 1], 1, false, &mut rng).expect("route");
            let used: Vec<_> = r.forward_mixes.iter().flatten().map(|m| m.peer).collect();
            assert!(
                !used.contains(&cands[2].peer) && !used.contains(&cands[3].peer),
                "seed {seed}"
            );
        }
    }
}

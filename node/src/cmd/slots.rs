//! The owner's commands on a model's slots: `mixnn status`, `mixnn renew`
//! and `mixnn release`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use mixnn_node::client::owner::{ask_stages, digest_matches, OwnerOp, StageAnswer, StageOutcome};
use mixnn_node::client::{JobOptions, ModelMap};
use mixnn_node::network::records::unix_now;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::network::{bootstrap_addrs, join_and_discover, volunteers_needed};

/// What every owner command needs to reach the slots.
#[derive(Args, Debug)]
pub struct OwnerArgs {
    /// Bootstrap peers, each ending in /p2p/<peer id>.
    #[arg(long, env = "MIXNN_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// The model map `mixnn train` wrote.
    #[arg(long, default_value = "model.json")]
    model_map: PathBuf,
    /// Mixes on each side of a host in the ring that reaches it.
    #[arg(long, default_value_t = 1)]
    mixes: usize,
    /// Longest wait for one host's answer, in seconds.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    timeout: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    owner: OwnerArgs,
}

#[derive(Args, Debug)]
pub struct RenewArgs {
    #[command(flatten)]
    owner: OwnerArgs,
    /// The new lease from now (e.g. 30d, 12h); each host caps it with its
    /// own maximum and never shortens a lease.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    lease: Duration,
}

#[derive(Args, Debug)]
pub struct ReleaseArgs {
    #[command(flatten)]
    owner: OwnerArgs,
}

/// A duration as `90s`, `15m`, `12h`, `7d` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 90s, 15m, 12h or 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{s}`: the unit must be s, m, h or d")),
    };
    let secs = n
        .checked_mul(unit_secs)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("`{s}` must be positive and at most a few centuries"))?;
    Ok(Duration::from_secs(secs))
}

/// `3d 4h`, `12m`, `ended 5m ago`.
fn until_text(until: u64, now: u64) -> String {
    if until <= now {
        return format!("ended {} ago", span(now - until));
    }
    format!("in {}", span(until - now))
}

fn span(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

fn short(peer: &str) -> String {
    if peer.len() > 16 {
        format!("{}…{}", &peer[..8], &peer[peer.len() - 6..])
    } else {
        peer.to_string()
    }
}

fn outcome_name(o: &StageOutcome) -> &'static str {
    match o {
        StageOutcome::Answered(_) => "answered",
        StageOutcome::Gone => "gone",
        StageOutcome::Refused(_) => "refused",
        StageOutcome::Unreachable(_) => "unreachable",
    }
}

fn detail(o: &StageOutcome) -> Option<&str> {
    match o {
        StageOutcome::Refused(d) | StageOutcome::Unreachable(d) => Some(d),
        _ => None,
    }
}

/// Reach every remote stage of the map with `op`.
fn run_op(args: &OwnerArgs, op: OwnerOp) -> anyhow::Result<(ModelMap, Vec<StageAnswer>)> {
    let map = ModelMap::load(&args.model_map)?;
    if args.mixes == 0 {
        eprintln!("warning: --mixes 0 removes the mixes: each host sees this client's peer id");
    }
    let opts = JobOptions {
        mixes: args.mixes,
        step_timeout: Duration::from_secs(args.timeout),
        setup_timeout: Duration::from_secs(args.timeout),
        ..JobOptions::default()
    };
    let bootstrap = bootstrap_addrs(&args.bootstrap)?;
    let answers = super::runtime()?.block_on(async {
        let cancel = CancellationToken::new();
        let _stop = cancel.clone().drop_guard();
        let (network, volunteers) = join_and_discover(
            bootstrap,
            volunteers_needed(1, args.mixes),
            cancel.child_token(),
        )
        .await?;
        let client = mixnn_node::client::Client::new(network)?;
        let answers = ask_stages(&client, &volunteers, &map, op, &opts).await?;
        anyhow::Ok(answers)
    })?;
    Ok((map, answers))
}

fn answer_json(a: &StageAnswer, map_digest: bool) -> serde_json::Value {
    let mut v = json!({
        "stage": a.stage.index,
        "host": a.stage.host.to_string(),
        "slot_id": hex::encode(a.stage.slot_id),
        "outcome": outcome_name(&a.outcome),
        "answers": matches!(a.outcome, StageOutcome::Answered(_)),
    });
    if let Some(d) = detail(&a.outcome) {
        v["detail"] = json!(d);
    }
    if let StageOutcome::Answered(r) = &a.outcome {
        v["version"] = json!(r.version);
        v["steps_applied"] = json!(r.steps_applied);
        v["lease_until"] = json!(r.lease_until);
        v["params_digest"] = json!(hex::encode(r.params_digest));
        if map_digest {
            v["digest_matches_map"] = json!(digest_matches(a));
        }
    }
    v
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let (map, answers) = run_op(&args.owner, OwnerOp::Status)?;
    let now = unix_now();
    if args.owner.json {
        let stages: Vec<_> = answers.iter().map(|a| answer_json(a, true)).collect();
        println!(
            "{}",
            json!({
                "model_map": args.owner.model_map.display().to_string(),
                "arch": map.arch,
                "complete": map.complete,
                "stages": stages,
                "all_answer": answers.iter().all(|a| matches!(a.outcome, StageOutcome::Answered(_))),
            })
        );
        return Ok(());
    }
    println!(
        "{:<6} {:<18} {:<12} {:<16} {:>6} {:>8}  parameters",
        "stage", "host", "answers", "lease ends", "steps", "version"
    );
    for a in &answers {
        let host = short(&a.stage.host.to_string());
        match &a.outcome {
            StageOutcome::Answered(r) => println!(
                "{:<6} {:<18} {:<12} {:<16} {:>6} {:>8}  {}",
                a.stage.index,
                host,
                "yes",
                until_text(r.lease_until, now),
                r.steps_applied,
                r.version,
                if digest_matches(a) == Some(true) {
                    "match the model map"
                } else {
                    "DIFFER from the model map"
                }
            ),
            other => println!(
                "{:<6} {:<18} {:<12} {}",
                a.stage.index,
                host,
                match other {
                    StageOutcome::Gone => "slot gone",
                    StageOutcome::Refused(_) => "refused",
                    _ => "no",
                },
                detail(other).unwrap_or("the host holds no such slot (lease ended or released)")
            ),
        }
    }
    let local = map.stages.len() - answers.len();
    if local > 0 {
        println!("({local} stage(s) kept by the client in the model map)");
    }
    Ok(())
}

pub fn renew(args: RenewArgs) -> anyhow::Result<()> {
    let (_, answers) = run_op(&args.owner, OwnerOp::Renew(args.lease))?;
    let now = unix_now();
    if args.owner.json {
        let stages: Vec<_> = answers.iter().map(|a| answer_json(a, false)).collect();
        println!("{}", json!({ "stages": stages }));
    } else {
        for a in &answers {
            let host = short(&a.stage.host.to_string());
            match &a.outcome {
                StageOutcome::Answered(r) => println!(
                    "stage {} on {host}: lease ends {}",
                    a.stage.index,
                    until_text(r.lease_until, now)
                ),
                StageOutcome::Gone => println!(
                    "stage {} on {host}: the slot is gone (its lease ended or it was released)",
                    a.stage.index
                ),
                other => println!(
                    "stage {} on {host}: not renewed: {}",
                    a.stage.index,
                    detail(other).unwrap_or("")
                ),
            }
        }
    }
    let failed = answers
        .iter()
        .filter(|a| !matches!(a.outcome, StageOutcome::Answered(_)))
        .count();
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} stage(s) could not be renewed",
        answers.len()
    );
    Ok(())
}

pub fn release(args: ReleaseArgs) -> anyhow::Result<()> {
    let (_, answers) = run_op(&args.owner, OwnerOp::Release)?;
    let verdict = |o: &StageOutcome| match o {
        StageOutcome::Answered(_) => "freed",
        StageOutcome::Gone => "already gone",
        StageOutcome::Refused(_) => "refused",
        StageOutcome::Unreachable(_) => "unreachable",
    };
    if args.owner.json {
        let stages: Vec<_> = answers
            .iter()
            .map(|a| {
                let mut v = json!({
                    "stage": a.stage.index,
                    "host": a.stage.host.to_string(),
                    "result": verdict(&a.outcome),
                });
                if let Some(d) = detail(&a.outcome) {
                    v["detail"] = json!(d);
                }
                v
            })
            .collect();
        println!("{}", json!({ "stages": stages }));
    } else {
        for a in &answers {
            let host = short(&a.stage.host.to_string());
            match detail(&a.outcome) {
                Some(d) => println!(
                    "stage {} on {host}: {}: {d}",
                    a.stage.index,
                    verdict(&a.outcome)
                ),
                None => println!("stage {} on {host}: {}", a.stage.index, verdict(&a.outcome)),
            }
        }
    }
    let left = answers
        .iter()
        .filter(|a| {
            matches!(
                a.outcome,
                StageOutcome::Unreachable(_) | StageOutcome::Refused(_)
            )
        })
        .count();
    anyhow::ensure!(
        left == 0,
        "{left} of {} stage(s) could not be released now; run `mixnn release` again later (their leases end on their own)",
        answers.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_refuse_nonsense() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(43_200)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        for bad in ["", "0", "7w", "d", "-5s", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lease_ends_read_as_spans() {
        assert_eq!(until_text(1000 + 3 * 86_400 + 7200, 1000), "in 3d 2h");
        assert_eq!(until_text(1000, 1300), "ended 5m ago");
        assert_eq!(until_text(1030, 1000), "in 30s");
    }
}

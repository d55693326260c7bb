//! `GET /api/2.0/profiles`: the iPXE script for a booting machine, on the node-facing API.
//!
//! iPXE asks with `?macs=${net0/mac}` (DHCP hands it that URL with the MAC filled in), and
//! may add `mac=`, `uuid=${uuid}`, `platform=${platform}` and `buildarch=${buildarch}`;
//! `macs` may repeat or hold a comma-separated list. The answer is always `text/plain`:
//!
//! - a known node whose running task has a `profile` option gets that template rendered
//!   (from the templates directory, else the shipped one of that name) — with the task's
//!   callback token only when the request proves it is the node (`cap=`, or in full DHCP
//!   mode its leased address; see [`boot::access`]);
//! - a known node whose profile task is still pending gets a script that retries shortly;
//! - a known node with a `boot-profile=NAME` tag gets that profile;
//! - any other known node gets a script that boots from the local disk;
//! - an unknown machine becomes a node, runs the discovery graph, and boots locally; when
//!   the request lacks `platform` (it came straight from DHCP's boot file name), it is first
//!   told to ask again with iPXE's `${uuid}`, `${platform}` and `${buildarch}`, so that its
//!   catalog holds them. Only where enrolment is on (`[boot] enrolment`; otherwise the
//!   machine is told to boot locally and nothing is created), and at most at the enrolment
//!   rate: over it, iPXE is told to retry later and any other client gets `429`.
//!
//! A request names at most [`MAX_MACS`] MACs, each a unicast, non-zero address; what iPXE
//! reports must look like what iPXE writes, without control characters.
//!
//! Once a script is due, failures (a template that does not render, a store error) are
//! answered with an iPXE script that shows a short message and retries, since a booting
//! machine cannot read a JSON error; the details go to the log.
//!
//! Profiles are rendered with [`boot::profile_renderer`]: no printed value may add, end or
//! join a script line, and what a node or its BMC controls is printed as inert iPXE words
//! (see [`boot::ProfileVars`]).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use metalgraph_engine::NodeCap;
use metalgraph_pxe::MacAddr;
use metalgraph_pxe::ipxe;
use tracing::{info, warn};

use super::extract::{Peer, Query};
use super::{ApiError, AppState, files};
use crate::boot::{self, BootWork, Enrolled, ProfileVars, Report};

/// How long a machine waits before asking again when its profile is not ready.
const RETRY_SECS: u32 = 10;
/// The most MAC addresses one request may name (a machine has a few NICs, not thousands).
pub const MAX_MACS: usize = 16;

/// What a profile request is answered with, before it becomes a response.
enum Answer {
    /// An iPXE script.
    Script(String),
    /// Enrolment is over its rate: ask again in this many seconds.
    RateLimited(u32),
}

/// The iPXE script for a booting machine (see the module's documentation for which).
///
/// Failures after the MACs are read are answered with a script that retries, since a
/// booting machine cannot read a JSON error.
#[utoipa::path(
    get,
    path = "/profiles",
    tag = "node-facing",
    params(
        ("macs" = Option<String>, Query, description = "The machine's MAC addresses, comma-separated or repeated (`${net0/mac}`); this or `mac` is required", example = "52:54:00:12:34:08"),
        ("mac" = Option<String>, Query, description = "Another name for `macs`"),
        ("uuid" = Option<String>, Query, description = "The SMBIOS UUID iPXE reports (`${uuid}`)"),
        ("platform" = Option<String>, Query, description = "iPXE's `${platform}`: `pcbios`, `efi`"),
        ("buildarch" = Option<String>, Query, description = "iPXE's `${buildarch}`: `i386`, `x86_64`, `arm64`"),
        ("cap" = Option<String>, Query, description = "The node's boot capability, as metalgraph put it into the URL it handed the node (DHCP's boot file name, a profile's URLs); the task's callback token is rendered only for a request that carries it or, with full DHCP, comes from the node's leased address"),
    ),
    responses(
        (status = 200, description = "An iPXE script", body = String, content_type = "text/plain"),
        (status = 400, description = "No MAC address, more than 16, a group or all-zero MAC, or a reported value that breaks iPXE's grammar", body = super::error::ErrorBody),
        (status = 429, description = "Enrolment of unknown machines is over its rate (`Retry-After` says when to ask again); iPXE gets a script that retries instead", body = super::error::ErrorBody),
    )
)]
pub async fn profiles(
    State(s): State<AppState>,
    Peer(peer): Peer,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    let report = parse_query(&pairs)?;
    let answer = match script_for(&s, &report, peer).await {
        Ok(answer) => answer,
        Err(e) => {
            warn!(mac = %report.macs[0], error = %e, "cannot answer a profile request; the machine retries");
            Answer::Script(retry_script(
                &s,
                &report,
                "metalgraph cannot serve this machine's profile yet (see the server log)",
                None,
                RETRY_SECS,
            ))
        }
    };
    let script = match answer {
        Answer::Script(script) => script,
        Answer::RateLimited(secs) if is_ipxe(&headers) => retry_script(
            &s,
            &report,
            "metalgraph enrols new machines at a bounded rate; retrying",
            None,
            secs,
        ),
        Answer::RateLimited(secs) => {
            let mut res = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests",
                format!(
                    "unknown machines are enrolled at most boot.enrolment_rate per minute \
                     (after a burst of boot.enrolment_burst); ask again in {secs} s"
                ),
            )
            .into_response();
            res.headers_mut().insert(header::RETRY_AFTER, secs.into());
            return Ok(res);
        }
    };
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        script,
    )
        .into_response())
}

/// Whether the request comes from iPXE, which sends `User-Agent: iPXE/<version>` and can
/// only run scripts: a refusal must be a script for it.
fn is_ipxe(headers: &HeaderMap) -> bool {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ua| ua.starts_with("iPXE/"))
}

/// Reads the MACs and what iPXE reported. MACs that do not parse (an iPXE setting that
/// expanded to nothing, say) are skipped; at least one must remain. A MAC that parses but
/// is a group (multicast, broadcast) or all-zero address is refused naming it, and so are
/// more than [`MAX_MACS`] values. `uuid`, `platform` and `buildarch` end up in the node's
/// catalog and in its boot scripts, so each must match what iPXE itself writes (see
/// [`reported`]) or the request is refused naming it. `cap` is the node's capability, if
/// the URL carried one.
fn parse_query(pairs: &[(String, String)]) -> Result<Report, ApiError> {
    let mut report = Report::default();
    // The first value that breaks its grammar; a missing MAC is reported before it.
    let mut bad = None;
    let mut given = 0usize;
    // A MAC that parses but identifies no machine; reported before anything else.
    let mut bad_mac: Option<String> = None;
    for (k, v) in pairs {
        let field = match k.as_str() {
            "macs" | "mac" => {
                for m in v.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                    given += 1;
                    if given > MAX_MACS {
                        return Err(ApiError::bad_request(format!(
                            "a profile request names at most {MAX_MACS} MAC addresses (query parameters 'macs' and 'mac')"
                        )));
                    }
                    let Ok(mac) = m.parse::<MacAddr>() else {
                        continue;
                    };
                    if !mac.is_unicast_nonzero() {
                        bad_mac.get_or_insert(format!(
                            "query parameter '{k}': {mac} is a group (multicast or broadcast) or all-zero MAC address, which identifies no machine"
                        ));
                    } else if !report.macs.contains(&mac) {
                        report.macs.push(mac);
                    }
                }
                continue;
            }
            "cap" => {
                report.cap = Some(v.clone()).filter(|c| !c.is_empty());
                continue;
            }
            "uuid" => &mut report.uuid,
            "platform" => &mut report.platform,
            "buildarch" => &mut report.buildarch,
            _ => continue,
        };
        match reported(k, v) {
            Ok(value) => *field = value,
            Err(why) => {
                bad.get_or_insert(why);
            }
        }
    }
    if let Some(why) = bad_mac {
        return Err(ApiError::bad_request(why));
    }
    if report.macs.is_empty() {
        return Err(ApiError::bad_request(
            "query parameter 'macs' (or 'mac') must hold at least one MAC address, e.g. ?macs=${net0/mac}",
        ));
    }
    match bad {
        Some(why) => Err(ApiError::bad_request(why)),
        None => Ok(report),
    }
}

/// One value iPXE reported, checked against the grammar of what iPXE writes for it: `uuid`
/// is `${uuid}`, an SMBIOS UUID (`8-4-4-4-12` hex digits); `platform` (`pcbios`, `efi`)
/// and `buildarch` (`i386`, `x86_64`, `arm64`, ...) are short lower-case words. Empty (the
/// setting is unset) is none. A control character anywhere (a line break before or after
/// the word included) is refused on its own.
fn reported(key: &str, value: &str) -> Result<Option<String>, String> {
    if let Some(c) = value.chars().find(|c| c.is_control()) {
        return Err(format!(
            "query parameter '{key}' holds a control character (U+{:04X}); iPXE writes none",
            u32::from(c)
        ));
    }
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let ok = match key {
        "uuid" => {
            let groups: Vec<&str> = value.split('-').collect();
            groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
                && groups
                    .iter()
                    .all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
        }
        _ => {
            value.len() <= 32
                && value
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        }
    };
    if ok {
        return Ok(Some(value.to_owned()));
    }
    let want = match key {
        "uuid" => "an SMBIOS UUID like 27946b59-9e44-4fa7-8e91-000000000001, as iPXE's ${uuid}",
        "platform" => "a lower-case word like pcbios or efi, as iPXE's ${platform}",
        _ => "a lower-case word like x86_64 or arm64, as iPXE's ${buildarch}",
    };
    let shown: String = value.chars().take(40).collect();
    Err(format!(
        "query parameter '{key}' must be {want}; got {shown:?}"
    ))
}

/// What the machine should run; errors are turned into a retry script by the caller.
async fn script_for(
    s: &AppState,
    report: &Report,
    peer: Option<std::net::IpAddr>,
) -> anyhow::Result<Answer> {
    let found = match boot::find_node(&s.engine, &report.macs).await? {
        None => None,
        Some(node) => {
            let work = boot::boot_work(&s.engine, &node).await?;
            Some((node, work))
        }
    };
    let (node, work) = match found {
        Some(found) => found,
        None if !s.enrolment.enabled() => {
            info!(mac = %report.macs[0], "unknown machine asked for a profile; enrolment is off (boot.enrolment), so it boots locally");
            return Ok(Answer::Script(ipxe::local_boot()));
        }
        // DHCP's boot file name cannot carry what only iPXE knows (iPXE does not expand
        // `${...}` there), so an unknown machine is first asked to come back with it.
        None if report.platform.is_none() => {
            let url = format!(
                "{}&uuid=${{uuid}}&platform=${{platform}}&buildarch=${{buildarch}}",
                boot::profile_url(&s.api.node_base, &report.macs, None)
            );
            return Ok(Answer::Script(ipxe::chain(&url)?));
        }
        None => {
            if let Err(secs) = s.enrolment.admit() {
                info!(mac = %report.macs[0], retry_after_s = secs, "unknown machine not enrolled: over the enrolment rate");
                return Ok(Answer::RateLimited(secs));
            }
            return match boot::enroll(&s.engine, &s.discovery_graph, report).await? {
                Enrolled::New { node, workflow } => {
                    info!(node = %node.id, workflow = ?workflow, "new machine: discovery started; it boots locally");
                    Ok(Answer::Script(ipxe::local_boot()))
                }
                // Enrolled by a concurrent request: this one answers like a known node
                // would, which is local boot while discovery runs.
                Enrolled::Existing(node) => {
                    info!(node = %node.id, "machine enrolled by a concurrent request; it boots locally");
                    Ok(Answer::Script(ipxe::local_boot()))
                }
            };
        }
    };
    let proof = match work.cap() {
        Some(cap) => {
            s.node_access
                .proof(&node, cap, report.cap.as_deref(), peer)
                .await
        }
        None => None,
    };
    let script = match work {
        BootWork::Task { task, profile } => {
            render(s, &node, Some(&task), &profile, report, proof).await?
        }
        BootWork::Always { profile } => render(s, &node, None, &profile, report, None).await?,
        BootWork::Pending {
            label,
            workflow_id,
            cap,
        } => {
            info!(node = %node.id, %workflow_id, label, "profile task not started yet; the machine retries");
            retry_script(
                s,
                report,
                &format!("waiting for task {label} of workflow {workflow_id} to start"),
                proof.map(|_| &cap),
                RETRY_SECS,
            )
        }
        BootWork::None => ipxe::local_boot(),
    };
    Ok(Answer::Script(script))
}

/// Renders profile `name` for `node`: the templates directory's file of that name, else the
/// shipped one.
async fn render(
    s: &AppState,
    node: &metalgraph_engine::nodes::Node,
    task: Option<&metalgraph_engine::NodeTask>,
    name: &str,
    report: &Report,
    proof: Option<boot::Proof>,
) -> anyhow::Result<String> {
    let source = files::template_source(s.templates_dir.as_deref(), name)
        .await
        .map_err(|e| anyhow::anyhow!("profile {name} of node {}: {}", node.id, e.message))?;
    let vars = ProfileVars {
        node,
        task,
        profile: name,
        api_base: &s.api.base,
        node_base: &s.api.node_base,
        report,
        proven: proof.is_some(),
    }
    .build();
    // Why a profile that needs the callback did not render, for the operator.
    let unproven = || {
        if task.is_some() && proof.is_none() {
            " (the request did not prove it is the node: no valid cap= and, in full DHCP mode,              not from its leased address; so the task's token, task.cap and notification were              left out)"
        } else {
            ""
        }
    };
    let vars =
        vars.map_err(|e| anyhow::anyhow!("profile {name} of node {}: {e}{}", node.id, unproven()))?;
    let script = boot::profile_renderer()
        .render_str(&source, &vars)
        .map_err(|e| anyhow::anyhow!("profile {name} of node {}: {e}{}", node.id, unproven()))?;
    info!(node = %node.id, profile = name, task = ?task.map(|t| &t.label), proof = ?proof, "profile served");
    Ok(script)
}

/// A script that shows `message` and asks for the profile again after `secs`, at the
/// node's profile URL (with its capability `cap`, when the request proved it had it).
fn retry_script(
    s: &AppState,
    report: &Report,
    message: &str,
    cap: Option<&NodeCap>,
    secs: u32,
) -> String {
    let url = boot::profile_url(&s.api.node_base, &report.macs, cap.map(NodeCap::as_str));
    ipxe::error_retry(message, secs, Some(&url))
        .unwrap_or_else(|_| ipxe::error_retry(message, secs, None).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(q: &[(&str, &str)]) -> Vec<(String, String)> {
        q.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn macs_come_from_every_spelling_and_bad_ones_are_skipped() {
        let r = parse_query(&pairs(&[
            ("macs", "52:54:00:00:00:01,52-54-00-00-00-02"),
            ("macs", ""),
            ("mac", "52:54:00:00:00:01"),
            ("mac", "${net1/mac}"),
            ("uuid", "27946b59-9e44-4fa7-8e91-000000000001"),
            ("platform", "pcbios"),
            ("buildarch", "i386"),
            ("other", "x"),
        ]))
        .unwrap();
        let macs: Vec<String> = r.macs.iter().map(ToString::to_string).collect();
        assert_eq!(macs, ["52:54:00:00:00:01", "52:54:00:00:00:02"]);
        assert_eq!(r.platform.as_deref(), Some("pcbios"));
        assert!(parse_query(&pairs(&[("macs", "nope")])).is_err());
        assert!(parse_query(&[]).is_err());
    }

    #[test]
    fn group_and_zero_macs_and_too_many_are_refused_naming_the_value() {
        for (mac, shown) in [
            ("ff:ff:ff:ff:ff:ff", "ff:ff:ff:ff:ff:ff"),
            ("01-00-5E-00-00-01", "01:00:5e:00:00:01"),
            ("00:00:00:00:00:00", "00:00:00:00:00:00"),
        ] {
            let err = parse_query(&pairs(&[("macs", &format!("52:54:00:00:00:01,{mac}"))]))
                .expect_err(mac);
            assert!(
                err.message.contains(shown) && err.message.contains("identifies no machine"),
                "{mac}: {}",
                err.message
            );
        }
        let many: Vec<String> = (0..=MAX_MACS)
            .map(|i| format!("52:54:00:00:01:{i:02x}"))
            .collect();
        parse_query(&pairs(&[("macs", &many[..MAX_MACS].join(","))])).expect("16 is fine");
        let err = parse_query(&pairs(&[("macs", &many.join(","))])).expect_err("17");
        assert!(err.message.contains("at most 16"), "{}", err.message);
        // Repeated parameters count alike.
        let repeated: Vec<(&str, &str)> = many.iter().map(|m| ("mac", m.as_str())).collect();
        assert!(parse_query(&pairs(&repeated)).is_err());
    }

    #[test]
    fn reported_values_follow_what_ipxe_writes_or_are_refused() {
        let cases = [
            ("uuid", "27946B59-9E44-4FA7-8E91-000000000001", true),
            ("uuid", "", true),
            ("uuid", "27946b59-9e44-4fa7-8e91-00000000000", false),
            ("uuid", "27946b59 9e44-4fa7-8e91-000000000001", false),
            ("uuid", "not-a-uuid", false),
            ("platform", "pcbios", true),
            ("platform", "efi", true),
            ("platform", "efi\nchain http://127.0.0.1:1/pwn.ipxe", false),
            ("platform", "efi\n", false),
            ("platform", "\r\nefi", false),
            ("buildarch", "x86_64\t", false),
            ("uuid", "27946b59-9e44-4fa7-8e91-000000000001\n", false),
            ("platform", "efi ${x}", false),
            ("platform", "EFI", false),
            ("buildarch", "x86_64", true),
            ("buildarch", "arm64", true),
            ("buildarch", "i386;reboot", false),
            ("buildarch", &"a".repeat(33), false),
        ];
        for (key, value, ok) in cases {
            let got = parse_query(&pairs(&[("macs", "52:54:00:00:00:01"), (key, value)]));
            match (ok, got) {
                (true, Ok(_)) => {}
                (false, Err(e)) => {
                    assert!(e.message.contains(key), "{key}={value:?}: {}", e.message)
                }
                (ok, got) => panic!("{key}={value:?}: expected ok={ok}, got {got:?}"),
            }
        }
    }
}

//! Output of the CLI: aligned tables for people, JSON for scripts.

use anyhow::Result;
use enforcer::{
    api::{Helper, ReconcileReport, Reply, Router, StatusReport},
    api::Dump,
};

use super::Output;

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

fn router_rows(routers: &[Router]) {
    print_table(
        &["ID", "PROJECT", "NETNS", "OWNER", "INTERFACES"],
        routers
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.project_id.clone(),
                    r.netns.clone(),
                    owner(r.owner),
                    if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") },
                ]
            })
            .collect(),
    );
}

fn owner(o: enforcer::api::Owner) -> String {
    serde_json::to_value(o).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn helper_rows(helpers: &[Helper]) {
    print_table(
        &["ID", "ROUTER", "PROJECT", "PROTOCOL", "PORT", "HELPER"],
        helpers
            .iter()
            .map(|h| vec![h.id.clone(), h.router_id.clone(), h.project_id.clone(), h.protocol.to_string(), h.port.to_string(), h.helper.clone()])
            .collect(),
    );
}

pub fn print_reply(reply: &Reply, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(reply)?),
        Output::Table => match reply {
            Reply::Router(r) => router_rows(std::slice::from_ref(r)),
            Reply::Routers(r) => router_rows(r),
            Reply::Helper(h) => helper_rows(std::slice::from_ref(h)),
            Reply::Helpers(h) => helper_rows(h),
            Reply::Revoked(r) => {
                println!(
                    "revoked: {} conntrack entries removed (with their expectations); {} flow directions kept dropped until quiet for {} s; slot {}",
                    r.conntrack_entries_removed,
                    r.flows_kept_dead,
                    r.quiet_secs,
                    if r.slot_released { "released" } else { "quarantined" }
                );
                if let Some(e) = &r.flush_error {
                    println!("warning: conntrack cleanup incomplete: {e}");
                }
            }
            Reply::HelperSet(r) => {
                let kept_dead: usize = r.revoked.iter().map(|x| x.flows_kept_dead).sum();
                let removed: usize = r.revoked.iter().map(|x| x.conntrack_entries_removed).sum();
                println!(
                    "{} created, {} updated, {} deleted, {} unchanged; revoked rules removed {removed} conntrack entries, {kept_dead} flow directions kept dropped",
                    r.created, r.updated, r.deleted, r.unchanged
                );
                for e in r.revoked.iter().filter_map(|x| x.flush_error.as_ref()) {
                    println!("warning: conntrack cleanup incomplete: {e}");
                }
                helper_rows(&r.helpers);
            }
            Reply::Status(s) => print_status(s),
            Reply::Dump(d) => print_dump(d, Output::Table)?,
            Reply::Catalogue(c) => print_table(
                &["HELPER", "PROTOCOLS", "FAMILIES", "USUAL_PORT"],
                c.iter()
                    .map(|h| {
                        let join = |v: Vec<String>| v.join(",");
                        vec![
                            h.helper.clone(),
                            join(h.protocols.iter().map(|p| p.to_string()).collect()),
                            join(h.families.iter().map(|f| format!("{f:?}").to_lowercase()).collect()),
                            h.usual_port.to_string(),
                        ]
                    })
                    .collect(),
            ),
            Reply::Audit(entries) => print_table(
                &["TIME", "UID", "GID", "PID", "FOR", "OP", "ROUTER", "HELPER", "RESULT"],
                entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.time.clone(),
                            e.caller.uid.to_string(),
                            e.caller.gid.to_string(),
                            e.caller.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                            owner(e.origin),
                            e.op.clone(),
                            e.router_id.clone().unwrap_or_else(|| "-".into()),
                            e.helper_id.clone().unwrap_or_else(|| "-".into()),
                            e.result.clone(),
                        ]
                    })
                    .collect(),
            ),
            Reply::Debug(d) if d.datapath_log_drops == 0 => println!("datapath log of drops: off"),
            Reply::Debug(d) => println!("datapath log of drops: on, for the next {} drops", d.datapath_log_drops),
            Reply::Done {} => println!("done"),
        },
    }
    Ok(())
}

fn print_reconcile(label: &str, r: &ReconcileReport) {
    let m = &r.maps;
    println!(
        "{label}: glue {} | links +{} -{} | programs replaced {} | orphan routers {} | detached routers {} | slots released {} | rules +{} -{} | counters +{} -{} | routers +{} -{} | filter words fixed {}",
        r.glue_installed,
        r.links_attached,
        r.links_detached,
        r.programs_replaced,
        r.orphan_routers_removed,
        r.routers_detached,
        r.slots_released,
        m.rules_added,
        m.rules_removed,
        m.counters_added,
        m.counters_removed,
        m.routers_added,
        m.routers_removed,
        m.filter_fixed
    );
}

fn print_status(s: &StatusReport) {
    println!(
        "daemon: pid {}, up {} s, programs attached with {}, maps and links in {}, store in {}",
        s.pid, s.uptime_secs, s.attach, s.bpffs, s.state_dir
    );
    println!(
        "{} routers, {} helpers, {} quarantined slots, {} revoked flows kept dropped ({} refused: map share full)",
        s.routers.len(),
        s.helpers,
        s.quarantined_slots,
        s.revoked_flows,
        s.revoked_flows_overflowed
    );
    print_reconcile("changed at start", &s.started_with);
    let ready = match (s.ready, s.ready_after_ms) {
        (true, Some(ms)) => format!("ready after {ms} ms"),
        (true, None) => "ready".to_string(),
        (false, _) => "reconciling at start (writes wait)".to_string(),
    };
    let last = s.last_check_ms.map(|ms| format!(", the last took {ms} ms")).unwrap_or_default();
    println!("{ready}; {} helper changes in {} commits; {} check rounds{last}", s.changes, s.commits, s.check_rounds);
    println!("repaired since start: glue {}, attachments {}, maps {}", s.glue_repairs, s.link_repairs, s.map_repairs);
    if s.drift.is_empty() {
        println!("drift: none");
    } else {
        print_reconcile("drift", &s.drift);
    }
    if let Some(n) = &s.neutron {
        let age = n.age_secs.map(|a| format!("{a:.1} s ago")).unwrap_or_else(|| "never".into());
        println!(
            "neutron: {}, last good poll {age}, {} polls ({} failed in a row), {} requests in the last, {} routers synced, {} helpers not applied",
            n.state,
            n.polls,
            n.failed_polls_in_a_row,
            n.requests_last_poll,
            n.routers_synced,
            n.helper_errors.len()
        );
        if let Some(e) = &n.last_error {
            println!("neutron: last error: {e}");
        }
        for e in &n.helper_errors {
            println!("neutron: helper {} of router {} not applied: {}", e.helper_id, e.router_id, e.error);
        }
    }
    print_table(
        &["ROUTER", "NETNS", "OWNER", "ATTACHED", "GLUE", "INTERFACES", "HELPERS"],
        s.routers
            .iter()
            .map(|r| {
                vec![
                    r.id.clone(),
                    r.netns.clone(),
                    owner(r.owner),
                    if r.attached { "yes".into() } else { "no (namespace missing)".into() },
                    serde_json::to_value(r.glue).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                    if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") },
                    r.helpers.to_string(),
                ]
            })
            .collect(),
    );
}

pub fn print_dump(dump: &Dump, output: Output) -> Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(dump)?),
        Output::Table => {
            println!("maps in {} ({} routers)", dump.bpffs, dump.routers);
            let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            print_table(
                &["ROUTER", "INDEX", "SLOT", "PROTOCOL", "PORT", "HELPER", "STATE", "TAGGED", "DROPPED"],
                dump.slots
                    .iter()
                    .map(|s| {
                        vec![
                            opt(s.router_id.clone()),
                            s.router_index.to_string(),
                            s.slot.to_string(),
                            opt(s.protocol.map(|p| p.to_string())),
                            opt(s.port.map(|p| p.to_string())),
                            opt(s.helper.clone()),
                            s.state.to_string(),
                            s.tagged.to_string(),
                            s.dropped.to_string(),
                        ]
                    })
                    .collect(),
            );
        }
    }
    Ok(())
}

/// One event on one line: time, kind, operation, what it touched, result,
/// and the figures or error that matter.
pub fn print_event(e: &enforcer::api::Event) {
    let entry = &e.entry;
    let kind = serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
    let mut line = format!("{}  {kind:<10}  {:<14}  {}", entry.time, entry.op, entry.result);
    if let Some(r) = &entry.router_id {
        line.push_str(&format!("  router={r}"));
    }
    if let Some(h) = &entry.helper_id {
        line.push_str(&format!("  helper={h}"));
    }
    let after = entry.after.as_ref().map(enforcer::api::Record::to_value);
    let after = after.as_ref();
    let figure = |key: &str| after.and_then(|a| a.get(key)).filter(|v| !v.is_null()).map(|v| format!("  {key}={v}"));
    for key in ["slot", "conntrack_entries_removed", "flows_kept_dead", "missed"] {
        line.push_str(&figure(key).unwrap_or_default());
    }
    if let Some(err) = &entry.error {
        line.push_str(&format!("  error={:?}", err.message));
    }
    println!("{line}");
}

//! Output of the CLI: aligned tables for people, JSON for scripts.

use anyhow::Result;
use enforcer::{
    api::{Helper, Reply, Router},
    kernel::dump::Dump,
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
        &["ID", "PROJECT", "NETNS", "INTERFACES"],
        routers
            .iter()
            .map(|r| vec![r.id.clone(), r.project_id.clone(), r.netns.clone(), if r.interfaces.is_empty() { "-".into() } else { r.interfaces.join(",") }])
            .collect(),
    );
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
            Reply::Done {} => println!("done"),
        },
    }
    Ok(())
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

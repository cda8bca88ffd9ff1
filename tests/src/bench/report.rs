//! results.md and the SVG charts.

use std::{fmt::Write as _, path::Path};

use super::{
    Scale, changes,
    fixed_cost::{self, Router},
    forwarding::{Backend, Rates},
    packet, revocation,
};

pub struct All {
    pub scale: Scale,
    pub packet: Vec<packet::Row>,
    pub forwarding: Rates,
    pub fixed_cost: fixed_cost::FixedCost,
    pub changes: changes::Results,
    pub revocation: revocation::Results,
    pub sync: Vec<super::sync::AtSize>,
    pub fleet: super::fleet::Results,
}

fn cmd(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| m.lines().next().map(|l| l.to_string())).unwrap_or_default();
    format!(
        "- CPU: {cpu}, {} cores\n- {mem}\n- kernel {}\n- {}\n- {}\n- date {}\n",
        cmd("nproc", &[]),
        cmd("uname", &["-r"]),
        cmd("iptables", &["--version"]),
        cmd("nft", &["--version"]),
        cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]),
    )
}

/// A grouped bar chart.
fn bars(title: &str, unit: &str, groups: &[String], series: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom, top) = (860.0, 420.0, 70.0, 60.0, 40.0);
    let max = series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite()).fold(0.0f64, f64::max).max(1e-9) * 1.1;
    let plot_w = w - left - 20.0;
    let plot_h = h - bottom - top;
    let colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"24\" font-size=\"15\" text-anchor=\"middle\">{title}</text>\n",
        h + 20.0 * series.len() as f64,
        w / 2.0
    );
    for i in 0..=4 {
        let v = max * i as f64 / 4.0;
        let y = top + plot_h - plot_h * i as f64 / 4.0;
        let _ = writeln!(s, "<line x1=\"{left}\" x2=\"{}\" y1=\"{y}\" y2=\"{y}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.3}</text>", w - 20.0, left - 6.0, y + 4.0);
    }
    let _ = writeln!(s, "<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">{unit}</text>", top + plot_h / 2.0, top + plot_h / 2.0);
    let gw = plot_w / groups.len().max(1) as f64;
    let bw = gw * 0.8 / series.len().max(1) as f64;
    for (g, name) in groups.iter().enumerate() {
        let gx = left + gw * g as f64 + gw * 0.1;
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{name}</text>", gx + gw * 0.4, top + plot_h + 18.0);
        for (i, (_, values)) in series.iter().enumerate() {
            let v = values.get(g).copied().unwrap_or(f64::NAN);
            if !v.is_finite() {
                continue;
            }
            let bh = plot_h * v / max;
            let _ = writeln!(
                s,
                "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{v:.3}</title></rect>",
                gx + bw * i as f64,
                top + plot_h - bh,
                bw - 2.0,
                bh,
                colors[i % colors.len()]
            );
        }
    }
    for (i, (name, _)) in series.iter().enumerate() {
        let y = h + 20.0 * i as f64 - 8.0;
        let _ = writeln!(s, "<rect x=\"{left}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{y}\">{name}</text>", y - 10.0, colors[i % colors.len()], left + 18.0);
    }
    s.push_str("</svg>\n");
    s
}

fn label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 => format!("{}M", n / 1_000_000),
        n if n >= 1000 => format!("{}k", n / 1000),
        n => n.to_string(),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "**missed**" }
}

pub fn write(all: &All, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut md = String::new();
    let _ = writeln!(md, "# enforcer benchmarks\n\nWritten by `cargo xtask bench{}`; every comparison below was measured in this one run.\n\n## Machine\n\n{}", if all.scale.quick { " --quick" } else { "" }, machine());

    // 1. Packet path.
    let sizes: Vec<usize> = {
        let mut s: Vec<usize> = all.packet.iter().map(|r| r.rules).collect();
        s.dedup();
        s
    };
    let ns = |prog: &str, case: &str, n: usize| {
        all.packet.iter().find(|r| r.program == prog && r.case == case && r.rules == n).map(|r| r.ns).unwrap_or(f64::NAN)
    };
    let _ = writeln!(md, "## 1. Packet path cost (BPF_PROG_TEST_RUN, ns per packet, median)\n");
    let _ = write!(md, "| program | case |");
    for n in &sizes {
        let _ = write!(md, " {} rules |", label(*n));
    }
    let _ = writeln!(md, "\n|---|---|{}", "---|".repeat(sizes.len()));
    let cases = [("tag", "hit ipv4"), ("tag", "miss ipv4"), ("tag", "hit ipv6"), ("tag", "miss ipv6"), ("tag", "revoked flow (drop)"), ("tag", "miss ipv4, a flow revoked"), ("empty program", "-"), ("one hash lookup", "-")];
    for (p, c) in cases {
        let _ = write!(md, "| {p} | {c} |");
        for n in &sizes {
            let _ = write!(md, " {:.1} |", ns(p, c, *n));
        }
        md.push('\n');
    }
    let (first, last) = (sizes[0], *sizes.last().unwrap());
    let flat = ["hit ipv4", "miss ipv4", "hit ipv6", "miss ipv6"].iter().map(|c| ns("tag", c, last) / ns("tag", c, first)).fold(0.0, f64::max);
    let vs_lookup = ["hit ipv4", "hit ipv6"].iter().map(|c| ns("tag", c, last) / ns("one hash lookup", "-", last)).fold(0.0, f64::max);
    let _ = writeln!(
        md,
        "\nThe harness itself costs about the empty program's figure per run. `revoked flow (drop)` is the drop path with the datapath log off (`enforcer debug datapath`); `a flow revoked` is a miss while the revoked-flows map holds a flow (some revocation in the last `revoked_quiet_secs`): one more hash lookup. With the map empty, a packet pays one array read for it.\n"
    );
    let hit_flat = ["hit ipv4", "hit ipv6"].iter().map(|c| ns("tag", c, last) / ns("tag", c, first)).fold(0.0, f64::max);
    let _ = writeln!(
        md,
        "What makes a row move with the rules loaded: a hit does the same work at every size (worst ratio {hit_flat:.2} \
         from {} to {} rules). A miss costs one array read while its bit in the rule filter is clear: the filter has \
         one bit per hash of a rule's router, protocol and port (2^24 bits, 2 MiB), so the rules of other routers on \
         the same port do not make it hash its key; with {} rules about 6% of the bits are set, and a miss whose bit \
         is set pays the hash lookup too. Until this run the filter was one bit per protocol and port for all \
         routers at once: a miss cost 46 ns at 1 rule and 68 ns at 1M (run of commit 03b9ac9), as the other \
         routers' rules named every port. A hit costs one hash lookup (the rule) and the parse, and adds to its \
         slot's counters at the index the rule names, in an array (until this run the counters were a second \
         hash map, looked up by router and slot: a hit cost 94 to 121 ns against 63 to 81 now, measured back to \
         back with the build before, `bench --only packet`).\n",
        label(first),
        label(last),
        label(last)
    );
    std::fs::write(
        dir.join("packet_cost.svg"),
        bars(
            "Packet path cost by rules loaded",
            "ns per packet",
            &sizes.iter().map(|n| format!("{} rules", label(*n))).collect::<Vec<_>>(),
            &cases
                .iter()
                .filter(|(_, c)| !c.contains("ipv6"))
                .map(|(p, c)| (format!("{p} {c}"), sizes.iter().map(|n| ns(p, c, *n)).collect()))
                .collect::<Vec<_>>(),
        ),
    )?;
    let _ = writeln!(md, "![packet cost](packet_cost.svg)\n");

    // 2. Forwarding.
    let ns_fwd: Vec<usize> = {
        let mut v: Vec<usize> = all.forwarding.keys().map(|(_, n)| *n).collect();
        v.sort();
        v.dedup();
        v
    };
    let backends = [Backend::Enforcer, Backend::Neutron, Backend::Nft];
    let rate = |b: Backend, n: usize| all.forwarding.get(&(b, n)).copied().unwrap_or(f64::NAN);
    let _ = writeln!(md, "## 2. Forwarding through a router (64-byte UDP, packets/s, ratio to N = 0 of each)\n");
    let _ = write!(md, "| backend |");
    for n in &ns_fwd {
        let _ = write!(md, " N = {} |", label(*n));
    }
    let _ = writeln!(md, "\n|---|{}", "---|".repeat(ns_fwd.len()));
    for b in backends {
        let _ = write!(md, "| {} |", b.name());
        for n in &ns_fwd {
            let _ = write!(md, " {:.0} ({:.3}) |", rate(b, *n), rate(b, *n) / rate(b, 0));
        }
        md.push('\n');
    }
    std::fs::write(
        dir.join("forwarding.svg"),
        bars(
            "Forwarding rate relative to no rules",
            "ratio to N = 0",
            &ns_fwd.iter().map(|n| format!("N = {}", label(*n))).collect::<Vec<_>>(),
            &backends.iter().map(|b| (b.name().to_string(), ns_fwd.iter().map(|n| rate(*b, *n) / rate(*b, 0)).collect())).collect::<Vec<_>>(),
        ),
    )?;
    let _ = writeln!(
        md,
        "\nWith no rules at all, enforcer forwards {:.0}% of the nftables rate: that is its fixed cost, paid by every \
         packet whatever the number of rules (one TC program, and one comparison in the nftables `pre` chain). \
         Section 6 measures it against the router it lives in.\n\n![forwarding](forwarding.svg)\n",
        100.0 * rate(Backend::Enforcer, 0) / rate(Backend::Nft, 0)
    );
    // Per-packet cost of the raw-table chains at 1,000 helpers, from the
    // forwarding rates, against enforcer's program from section 1.
    let chain_ns = (1.0 / rate(Backend::Neutron, 1000) - 1.0 / rate(Backend::Neutron, 0)) * 1e9;
    let ours_ns = ns("tag", "miss ipv4", *sizes.iter().find(|n| **n >= 1000).unwrap_or(&last));
    let cheaper = chain_ns / ours_ns;

    // 3. Rule changes.
    let c = &all.changes;
    let _ = writeln!(md, "## 3. Rule changes through the API\n\n| what | p50 ms | p99 ms | per second |\n|---|---|---|---|");
    for (what, l) in [
        ("create, one client", &c.create_one_client),
        ("delete, one client (includes the conntrack flush)", &c.delete_one_client),
        (&format!("create, {} concurrent clients", c.clients) as &str, &c.create_many_clients),
    ] {
        let _ = writeln!(md, "| {what} | {:.2} | {:.2} | {:.0} |", l.p50_ms, l.p99_ms, l.per_sec);
    }
    let _ = writeln!(md, "\nLoading {} helpers with {} clients took {:.1} s ({:.0} per second).\n", c.loaded, c.clients, c.load_secs, c.loaded as f64 / c.load_secs);
    let _ = writeln!(md, "One change with N helpers present (median ms of {} samples for enforcer, of {} for the others; whole commands):\n\n| N | enforcer create + delete | Neutron delete (save + restore) | nft add element | nft delete element |\n|---|---|---|---|---|", c.at_n_samples.0, c.at_n_samples.1);
    for (n, e, neutron, add, del) in &c.at_n {
        let _ = writeln!(md, "| {n} | {e:.2} | {neutron:.2} | {add:.2} | {del:.2} |");
    }
    std::fs::write(
        dir.join("changes.svg"),
        bars(
            "One rule change with N helpers present",
            "ms",
            &c.at_n.iter().map(|(n, ..)| format!("N = {}", label(*n))).collect::<Vec<_>>(),
            &[
                ("enforcer create + delete".to_string(), c.at_n.iter().map(|x| x.1).collect()),
                ("Neutron delete".to_string(), c.at_n.iter().map(|x| x.2).collect()),
                ("nft add element".to_string(), c.at_n.iter().map(|x| x.3).collect()),
                ("nft delete element".to_string(), c.at_n.iter().map(|x| x.4).collect()),
            ],
        ),
    )?;
    let _ = writeln!(md, "\n![changes](changes.svg)\n");
    let at_1000 = c.at_n.iter().find(|x| x.0 == 1000);
    let faster = at_1000.map(|x| x.2 / (x.1 / 2.0)).unwrap_or(f64::NAN);

    // 4. Revocation.
    let r = &all.revocation;
    let _ = writeln!(
        md,
        "## 4. Revocation under traffic\n\n| | TCP packets the router sent in the 2 s after the delete returned (tcpdump on its interfaces) | conntrack entries with the helper left |\n|---|---|---|\n| enforcer (`helper delete` took {:.1} ms; conntrack clean after {:.1} ms) | {} | 0 |\n| Neutron way (raw chain deleted) | {} | {} |\n",
        r.enforcer_delete_ms, r.enforcer_conntrack_clean_ms, r.enforcer_packets_after, r.neutron_packets_after, r.neutron_entries_left
    );
    let (quiet, crowded) = (super::percentile(r.delete_connected_ms.clone(), 0.5), super::percentile(r.delete_connected_crowded_ms.clone(), 0.5));
    let _ = writeln!(
        md,
        "A delete of a rule with one connection (a UDP flow through the router to the tftp port; one `helper_delete` request, p50 of {} each): \
         {quiet:.1} ms with the host's conntrack table otherwise empty, {crowded:.1} ms with {} entries of another namespace in it ({:.2}x). \
         The kernel keeps every namespace's conntrack entries in one hash table, and a ctnetlink dump walks all of it whatever the \
         namespace (each of its 262,144 buckets: about 12 ms with the table empty, `strace` of the daemon). A revocation no longer dumps: \
         a netfilter program in each router namespace (prerouting, just after enforcer's chain) records every connection whose ct mark \
         carries a slot as it starts, control and RELATED alike, in the conntrack index; the revocation reads the rule's entries there, \
         deletes each by its zone and tuple (a hash lookup) and reads the index again (`conntrack_dumps` 0 in every answer here, the \
         router's first included, {:.1} ms: a router added in a namespace that never had enforcer's chain has no connection with a slot \
         from before its program ran, so its index is complete from the add. One the chain was in before, after a restart that found the \
         index of another version or lost links, or where a removed router's flush failed, fills it from one dump of its entries at its \
         first revocation: 12.9 ms in the run of commit 0d8f5ee). Until the run of commit 0d8f5ee it walked the table twice: 22.4 ms and 79.4 ms for the two cases (run of commit 04fbe53), and four \
         times before that. The index costs every packet in a router one map read and one kernel read at prerouting (the packet cost in a \
         Neutron router, §6, includes it); tracing programs on conntrack's own functions would see connections end as well, and no \
         packet, but this kernel refuses fentry programs (EPERM) and has no kprobes, so ended connections are dropped from the index by a \
         lookup each, every `conntrack_index_prune_secs`.\n",
        r.delete_connected_ms.len(),
        r.crowd,
        crowded / quiet,
        r.delete_connected_ms.first().copied().unwrap_or_default()
    );

    // 5. Memory.
    let _ = writeln!(md, "## 5. Memory at {} helpers\n\n- daemon resident memory: {:.1} MiB\n- BPF map memory (memlock of the pinned maps): {:.1} MiB\n", c.loaded, c.daemon_rss_mib, c.map_memory_mib);
    let (reads, p50, longest) = c.reads_over_check;
    let _ = writeln!(
        md,
        "With these {} helpers, {reads} reads (`router list`, one client) over 11 s, a periodic check of the maps against the store among them: p50 {p50:.2} ms, the longest {longest:.1} ms. The check reads and compares the maps without the daemon's lock (about 200 ms of work at 100,000 helpers); under it, it only takes what the store wants, and where it found a difference reads those entries again (a change made while it ran shows as one) and checks the maps whole, and repairs them, only if one is still there. Before the run of commit b36923f it did all of it under the lock: the longest read then waited 520 to 660 ms, one per check (measured by hand, 100,000 helpers, a check every 2 s). The check maps the rule filter read-only; until this run it read its 262,144 words with `bpf` calls into a table of about 12 MiB, whatever the number of rules, which stayed with the daemon after the first check (durability.rs: 10,000 helper creates and deletes grew the daemon from 32 to 45 MiB).\n",
        c.loaded
    );

    // Fixed cost inside a Neutron router.
    let fc = &all.fixed_cost;
    let _ = writeln!(
        md,
        "## 6. Fixed cost inside a Neutron router (64-byte UDP through the client's floating IP SNAT, packets/s on one CPU)\n\n\
         The router carries the L3 agent's rules, installed by the pinned neutron release's own code. All routers exist \
         at once; each round sends a 100 ms burst through every one of them, in a rotating order, from one pinned CPU \
         that also does the routers' work. Each burst is bracketed by bursts through the Neutron router without enforcer, \
         and its ratio is taken to the mean of those two. The ratio column is the median of {} rounds, with the quartiles; \
         the second router without enforcer shows how finely the method resolves.\n\n\
         | router | packets/s (median) | ratio to Neutron's rules alone | quartiles |\n|---|---|---|---|",
        fc.rounds
    );
    let mut worst = f64::INFINITY;
    for (router, q) in &fc.ratios {
        let name = match router {
            Router::Bare => "bare (no rules at all)".to_string(),
            Router::Neutron => "Neutron's rules, no enforcer".to_string(),
            Router::NeutronAgain => "a second router like it (the method's resolution)".to_string(),
            Router::GlueOnly => "Neutron's rules + enforcer's nftables table only (no TC programs)".to_string(),
            Router::EmptyPrograms => "Neutron's rules + an empty program on the tc hook enforcer uses".to_string(),
            Router::Enforcer(n) => format!("Neutron's rules + enforcer, {} helpers", label(*n)),
        };
        if let Router::Enforcer(_) = router {
            worst = worst.min(q.median);
        }
        let rate = fc.rates.get(router).copied().unwrap_or(f64::NAN);
        let _ = writeln!(md, "| {name} | {rate:.0} | {:.3} | {:.3} to {:.3} |", q.median, q.p25, q.p75);
    }
    let part = |r: Router| fc.ratios.get(&r).map(|q| (1.0 - q.median) * 100.0).unwrap_or(f64::NAN);
    // The reference router's time per packet, and each part of enforcer's
    // share of it in ns: the goal's budget is 5% of that time.
    let packet_ns = 1e9 / fc.rates.get(&Router::Neutron).copied().unwrap_or(f64::NAN);
    let in_ns = |percent: f64| percent / 100.0 * packet_ns;
    let _ = writeln!(
        md,
        "\nWhere the cost goes: enforcer's nftables table alone (one base chain every packet crosses, `pre`) \
         costs {:.1}% of the router's rate; an empty program on the tc hook enforcer uses (ingress) costs {:.1}%; \
         the whole of enforcer costs {:.1}% (worst N), so the program's own work and the conntrack index's hook are \
         the rest. The chain and the tc hook are the mechanism itself: only nftables can set a ct helper, and the \
         helper id has to move from the skb mark into the ct mark before Neutron's mangle rules rewrite the mark. The \
         conntrack index (§4) adds a netfilter hook after the chain, whose program reads one map and one kernel word \
         per packet: in the run of commit 04fbe53, before it, the whole of enforcer measured 0.967 to 0.975, in the \
         run of commit 0d8f5ee 0.952 to 0.957, so about 1.5% of this router's rate, mostly the hook's indirect calls \
         (loading `skb->_nfct` directly instead of through a helper, its offset put in by the loader, measured no \
         different: not kept). Since the run after that, a router with no slot in use is parked: no connection \
         carries one of its slots, so the index stays complete with its program off the namespace, and the program \
         is attached again before the router's next rule goes into the maps. The 0 helpers row therefore has no \
         index hook; the others have it.\n\n\
         In time per packet: this router spends {:.0} ns on a packet without enforcer, so 0.95 leaves enforcer {:.0} ns; \
         the table costs {:.0} ns, the hook {:.0} ns, the whole {:.0} ns. Earlier releases also had a `post` chain \
         (after NAT, to put the slot back into the skb mark) and an egress program that dropped the packets of \
         revoked slots: two base chains and two hooks, 0.926 at worst in the run of commit 067b257 on this kind of \
         machine. A revocation now keeps the flows of a rule's connections dropped through the revoked-flows map, \
         filled from conntrack before the rule leaves the maps, so neither is needed. A fixed cost is a smaller \
         share of a longer packet time: the run of commit 4739412, on a 2-core AMD EPYC, measured 8.2 us per packet \
         and 0.951 to 0.955 with both chains and hooks.\n",
        part(Router::GlueOnly),
        part(Router::EmptyPrograms),
        (1.0 - worst) * 100.0,
        packet_ns,
        in_ns(5.0),
        in_ns(part(Router::GlueOnly)),
        in_ns(part(Router::EmptyPrograms)),
        in_ns((1.0 - worst) * 100.0),
    );

    // The programs' own time, as the kernel counts it.
    let empty_ns = fc.program_ns.get(&Router::EmptyPrograms).copied().unwrap_or(f64::NAN);
    let own: Vec<String> = fc
        .program_ns
        .iter()
        .filter_map(|(r, ns)| match r {
            Router::Enforcer(n) => Some(format!("{ns:.0} ns at {} helpers", label(*n))),
            _ => None,
        })
        .collect();
    let worst_own = fc.program_ns.iter().filter(|(r, _)| matches!(r, Router::Enforcer(_))).map(|(_, ns)| *ns).fold(f64::NAN, f64::max);
    let _ = writeln!(
        md,
        "The kernel's own count of the programs' run time (BPF run-time statistics, turned on only after the rounds, \
         for ten bursts per router; each run then also pays two clock reads): the empty program {empty_ns:.0} ns per \
         packet, enforcer's program {}. What enforcer's program does beyond being on the hook (parse the headers, \
         read the revoked-flows switch and the rule filter) is {:.0} ns, {:.1}% of this router's time per packet; the \
         rest of a ratio's distance from 1 is the hook, the table and the method's resolution.\n",
        own.join(", "),
        worst_own - empty_ns,
        (worst_own - empty_ns) / packet_ns * 100.0,
    );

    // 7. Neutron sync.
    let _ = writeln!(
        md,
        "## 7. Following Neutron (real Keystone and neutron-server on loopback, poll interval {} s)\n\n\
         Routers exist in Neutron and as `qrouter-` namespaces on the host; the daemon follows them. A helper is created \
         through Neutron's API, and the time until the daemon enforces it is measured from the API's answer; then the \
         same for its delete until it is revoked.\n\n\
         | routers followed | initial sync | create to enforced p50 / p99 ms | delete to revoked p50 / p99 ms | API requests per unchanged poll | its duration | samples |\n|---|---|---|---|---|---|---|",
        super::sync::POLL_SECS
    );
    for a in &all.sync {
        let _ = writeln!(
            md,
            "| {} | {:.1} s | {:.0} / {:.0} | {:.0} / {:.0} | {} | {:.0} ms | {} |",
            label(a.routers), a.initial_sync_s, a.create_p50_ms, a.create_p99_ms, a.delete_p50_ms, a.delete_p99_ms, a.requests_per_poll, a.poll_ms, a.samples
        );
    }
    let _ = writeln!(md);
    let worst_revoke = all.sync.iter().map(|a| a.delete_p99_ms).fold(0.0, f64::max);
    let revoke_bound = (super::sync::POLL_SECS + 1.0) * 1000.0;

    // 8. A node with many routers.
    let f = &all.fleet;
    let add = |p: f64| super::percentile(f.add_ms.clone(), p);
    let tenth = (f.add_ms.len() / 10).max(1);
    let first_tenth = super::median(f.add_ms[..tenth].to_vec());
    let last_tenth = super::median(f.add_ms[f.add_ms.len() - tenth..].to_vec());
    let netlink = |p: f64| super::percentile(f.add_netlink_ms.clone(), p);
    let nl_tenth = (f.add_netlink_ms.len() / 10).max(1);
    let nl_first = super::median(f.add_netlink_ms[..nl_tenth].to_vec());
    let nl_last = super::median(f.add_netlink_ms[f.add_netlink_ms.len() - nl_tenth..].to_vec());
    let per_router_mib = (f.rss_full - f.rss_empty) / f.routers as f64;
    let expedited_p = |p: f64| super::percentile(f.add_expedited_ms.clone(), p);
    let expedited = match &f.expedited_unmeasured {
        Some(why) => format!("not measured: {why}"),
        None => format!("{:.1} / {:.1} ms", expedited_p(0.5), expedited_p(0.99)),
    };
    let bare = |p: f64| super::percentile(f.bare_tcx_ms.clone(), p);
    let rounds = super::fleet::ROUNDS;
    let _ = writeln!(
        md,
        "## 8. A node with {n} routers (one veth pair each, {h} helpers each, through the API)\n\n\
         | what | measured |\n|---|---|\n\
         | router add, p50 / p99 (first tenth p50, last tenth p50) | {:.1} / {:.1} ms ({first_tenth:.1}, {last_tenth:.1}) |\n\
         | of which, median: glue (nft, without the lock) / attaching (the router's `tag` loaded, tcx links) / the store | {} |\n\
         | router add with attach = netlink (clsact filters), {} routers, p50 / p99 (first tenth p50, last tenth p50) | {:.1} / {:.1} ms ({nl_first:.1}, {nl_last:.1}) |\n\
         | router add with tcx while the kernel expedites RCU grace periods (`/sys/kernel/rcu_expedited` = 1, set by the bench for these {} routers only), p50 / p99 | {expedited} |\n\
         | the kernel alone: an empty program attached with tcx to both links of a fresh veth pair, without enforcer, {} pairs, p50 / p99 | {:.1} / {:.1} ms |\n\
         | setting a router's {h} helpers in one request, p50 | {:.2} ms |\n\
         | `status` with {n} routers, median | {:.1} ms |\n\
         | restart: until the API answers / until the state is verified and repaired | {:.0} ms / {:.0} ms |\n\
         | the same without the record of where each glue was last verified (every glue listed by `nft`) | {:.0} ms / {:.0} ms |\n\
         | the Neutron way's resync of the same routers (iptables-save + iptables-restore of each raw table) | {:.0} ms |\n\
         | daemon memory, each 3 s after its step: empty / with {n} routers / after a restart / after every router removed and added again | {:.1} / {:.1} / {:.1} / {:.1} MiB |\n\
         | helper creates from {} clients at once on one router, each pipelining its requests, median of {rounds} rounds of 1,000 per client (group commit: {:.1} changes per commit) | {:.0} per second |\n\
         | deletes of them the same way, median of {} rounds | {:.0} per second |\n\
         | one helper set request of {} helpers | {:.0} ms ({:.0} helpers per second) |\n\
         | delete of a rule that never tagged a packet, one client, p50 / p99 | {:.2} / {:.2} ms |\n",
        add(0.5),
        add(0.99),
        f.add_parts.iter().map(|(k, v)| format!("{v:.1} ms ({})", k.trim_end_matches("_ms"))).collect::<Vec<_>>().join(" / "),
        f.add_netlink_ms.len(),
        netlink(0.5),
        netlink(0.99),
        f.add_expedited_ms.len(),
        f.bare_tcx_ms.len(),
        bare(0.5),
        bare(0.99),
        super::median(f.set_ms.clone()),
        f.status_ms,
        f.restart_answer_ms,
        f.restart_ready_ms,
        f.restart_cold_answer_ms,
        f.restart_cold_ready_ms,
        f.neutron_resync_ms,
        f.rss_empty,
        f.rss_full,
        f.rss_restarted,
        f.rss_after_churn,
        f.clients,
        f.changes_per_commit,
        f.creates_per_sec,
        super::fleet::ROUNDS - 1,
        f.deletes_per_sec,
        f.bulk_set.0,
        f.bulk_set.1,
        f.bulk_set.0 as f64 / (f.bulk_set.1 / 1000.0),
        f.delete_p50_ms,
        f.delete_p99_ms,
        n = f.routers,
        h = f.helpers_per_router,
    );
    let _ = writeln!(
        md,
        "Where a router add's time goes: the glue is one `nft` run in the router's namespace that creates the \
         table (about 2 ms of nft; until this run it replaced the table, add, delete and add in one transaction, and \
         the delete made the commit wait for an RCU grace period: 10 to 30 ms, measured by hand; a stale table \
         still gets that replacement). Attaching loads the router's own `tag`, a few instructions that name the \
         router and tail-call `classify`, the one program that does the work for every router and is verified \
         once per start (until this run each router had a whole instance verified, about 10 ms), and creates one \
         tcx link per interface, two per router here: the kernel waits for an RCU grace period under the RTNL \
         lock at each tcx attach (8 to 24 ms each, measured by hand on this kernel), so links cannot be made in \
         parallel. A netlink (clsact) filter waits for none, and the qdisc and filter are looked up over rtnetlink \
         (until this run by two `tc` runs per interface and hook: 16.6 ms p50 at 100 routers, measured in the run \
         of commit bae72b7). The store's commit is under a millisecond. The grace periods are most of a tcx add: \
         with the kernel told to expedite them (`rcu_expedited` = 1) the same adds took {expedited} (p50 / p99). \
         That switch is the host's, not enforcer's: every grace period in the kernel then ends early by \
         interrupting all CPUs, which costs the node's other work some latency, so the daemon never sets it; an \
         operator who wants fast tcx adds on a network node can (`echo 1 > /sys/kernel/rcu_expedited`, or \
         `rcupdate.rcu_expedited=1` on the kernel command line), or use attach = netlink.\n"
    );

    // Goals.
    let _ = writeln!(md, "## Goals\n\n| goal | measured | |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| router add p50 at most 10 ms and p99 at most 30 ms at {} routers | {:.1} / {:.1} ms (the kernel's two tcx attaches alone: {:.1} / {:.1} ms) | {} |",
        f.routers,
        add(0.5),
        add(0.99),
        bare(0.5),
        bare(0.99),
        verdict(add(0.5) <= 10.0 && add(0.99) <= 30.0)
    );
    let _ = writeln!(md, "| the same with attach = netlink (clsact filters; tcx is the default where the kernel has it) | {:.1} / {:.1} ms | {} |", netlink(0.5), netlink(0.99), verdict(netlink(0.5) <= 10.0 && netlink(0.99) <= 30.0));
    if f.expedited_unmeasured.is_none() {
        let _ = writeln!(
            md,
            "| the same with tcx and `rcu_expedited` = 1 (a host-wide kernel setting the operator may choose) | {:.1} / {:.1} ms | {} |",
            expedited_p(0.5),
            expedited_p(0.99),
            verdict(expedited_p(0.5) <= 10.0 && expedited_p(0.99) <= 30.0)
        );
    }
    let _ = writeln!(md, "| router add flat from the first routers to the last (last tenth within 1.5x of the first) | {first_tenth:.1} ms to {last_tenth:.1} ms | {} |", verdict(last_tenth <= 1.5 * first_tenth));
    let _ = writeln!(md, "| restart: the API answers, and the state of {} routers x {} helpers is verified and repaired, within 2 s | {:.0} ms / {:.0} ms | {} |", f.routers, f.helpers_per_router, f.restart_answer_ms, f.restart_ready_ms, verdict(f.restart_ready_ms <= 2000.0));
    let resync_x = f.neutron_resync_ms / f.restart_ready_ms;
    let cold_x = f.neutron_resync_ms / f.restart_cold_ready_ms;
    let _ = writeln!(md, "| restart at least 10x faster than the Neutron way's resync of the same routers | {resync_x:.1}x ({cold_x:.1}x without the record) | {} |", verdict(resync_x >= 10.0));
    let _ = writeln!(md, "| `status` under 100 ms at {} routers | {:.1} ms | {} |", f.routers, f.status_ms, verdict(f.status_ms < 100.0));
    let _ = writeln!(md, "| at least 50,000 helper creates per second from concurrent clients (pipelined) | {:.0} per second | {} |", f.creates_per_sec, verdict(f.creates_per_sec >= 50_000.0));
    let _ = writeln!(md, "| at least 50,000 helper deletes per second from concurrent clients (pipelined) | {:.0} per second | {} |", f.deletes_per_sec, verdict(f.deletes_per_sec >= 50_000.0));
    let _ = writeln!(md, "| delete of a rule without connections, p50 under 1 ms | {:.2} ms | {} |", f.delete_p50_ms, verdict(f.delete_p50_ms < 1.0));
    let _ = writeln!(
        md,
        "| delete of a rule with connections: its time grows with the router's entries, not the host's conntrack table (p50 with {} entries of another namespace within 1.5x of none; §4) | {quiet:.1} to {crowded:.1} ms | {} |",
        r.crowd,
        verdict(crowded <= 1.5 * quiet)
    );
    let churn = f.rss_after_churn / f.rss_restarted;
    let _ = writeln!(md, "| memory flat under router churn (within 20%) | {:.1} to {:.1} MiB | {} |", f.rss_restarted, f.rss_after_churn, verdict(churn <= 1.2));
    let budget_kib = super::fleet::KIB_PER_ROUTER;
    let budget = 64.0 + budget_kib * f.routers as f64 / 1024.0;
    let largest_rss = f.rss_full.max(f.rss_restarted).max(f.rss_after_churn);
    let _ = writeln!(
        md,
        "| memory within 64 MiB + {budget_kib:.0} KiB per router ({budget:.1} MiB at {} routers; the most of the three readings with them; {:.0} KiB per router measured) | {largest_rss:.1} MiB | {} |",
        f.routers,
        per_router_mib * 1024.0,
        verdict(largest_rss <= budget)
    );
    let _ = writeln!(md, "| a helper deleted in Neutron is revoked on the host within the poll interval + 1 s ({revoke_bound:.0} ms) | worst p99 {worst_revoke:.0} ms | {} |", verdict(worst_revoke <= revoke_bound));
    let polls_ok = all.sync.iter().all(|a| a.requests_per_poll == 1);
    let _ = writeln!(md, "| an unchanged poll costs O(1) requests at every size | {} | {} |", all.sync.iter().map(|a| format!("{} at {}", a.requests_per_poll, label(a.routers))).collect::<Vec<_>>().join(", "), verdict(polls_ok));
    let _ = writeln!(md, "| in a Neutron router, at least 0.95 of its rate without enforcer at every N measured | worst {worst:.3} | {} |", verdict(worst >= 0.95));
    let _ = writeln!(md, "| packet cost flat (within 20%) from {} to {} rules | worst ratio {:.2} | {} |", label(first), label(last), flat, verdict(flat <= 1.2));
    let _ = writeln!(md, "| within 2x of an empty program doing one hash lookup | {:.2}x | {} |", vs_lookup, verdict(vs_lookup <= 2.0));
    let _ = writeln!(md, "| at 1,000 rules at least 10x cheaper per packet than the raw-table chain | chains add {:.0} ns, enforcer's program costs {:.0} ns: {:.1}x | {} |", chain_ns, ours_ns, cheaper, verdict(cheaper >= 10.0));
    let per_sec = c.create_many_clients.per_sec;
    let _ = writeln!(md, "| at least 50,000 helper changes per second through the API ({} clients, each waiting for its answer) | {:.0} per second | {} |", c.clients, per_sec, verdict(per_sec >= 50_000.0));
    let _ = writeln!(md, "| 100x faster than iptables-restore at 1,000 rules | {:.1}x | {} |", faster, verdict(faster >= 100.0));
    let _ = writeln!(md, "| zero packets after revocation | {} | {} |", r.enforcer_packets_after, verdict(r.enforcer_packets_after == 0));
    let _ = writeln!(
        md,
        "\nWhy the change goals are missed, where they are: a change is acknowledged only once it is durable and applied to the \
         kernel. Concurrent changes share one redb transaction, which also journals their audit entries, and one \
         sync of the disk (group commit; the audit log itself is synced every second, and a tail of it lost to a \
         power loss is put back from the journal at start), so throughput grows with the clients waiting at once ({:.1} changes per commit with {} clients); each change \
         still costs its own request round trip, validation, map updates and audit line on two cores, and one \
         client waits for the disk's sync on every change. A helper set request carries many changes in one round \
         trip ({:.0} helpers per second), and pipelined requests many changes per connection (§8). What this run \
         changed per change, each measured against the build before it, 16 pipelining clients on one router, \
         eight alternating runs of four rounds (medians of the runs, by hand; the rate moves by about 20% from round \
         to round, as the clients share the two cores with the daemon, so the bench takes the median of its \
         rounds): an audit entry keeps the helper, router or report it records as the typed value, serialized once \
         into one buffer for the whole group that both the store's journal and the log file take, where a JSON \
         tree was built, serialized, copied per line and dropped per change (a sixth of a delete's time, `perf`), \
         and the tuple index is found by the router's id without a key made per lookup: about 55,000 to 58,000 \
         deletes per second before, 58,000 to 64,000 after, creates 58,000 to 67,000 before and 67,000 to 72,000 \
         after. The rule filter is mapped into the daemon (a mappable array map), so a create or delete sets or \
         clears its bit with a store instead of a `bpf` call: creates 58,000 to 70,000 per second, deletes within \
         the noise (a delete still makes three `bpf` calls: the never-tagged check, the rule's removal and the \
         check again after it). What is left per change (`perf`): the `bpf` calls (about a quarter of a delete), \
         the store's B-tree work (a sixth), the JSON of the request, the answer and the audit entry, and malloc in \
         every step. The bench measures on a host with 1,000 routers of 10 helpers. Until this run a change cost \
         more there than on an empty one (by hand, 67,000 to 72,000 creates per second with one router, 35,000 to \
         45,000 with 300 more of 10 helpers each), which was put down to malloc; `perf` of the daemon and its \
         children found the cause: the glue a router add installs was not recorded as intact, so the first round \
         of checks after the adds (the bench's churn adds every router again just before the changes) listed each \
         router's table with `nft`, 13% of the samples during the changes in `nft` processes. An install now \
         records the nftables generation its own transaction made (when no other commit came between), and the \
         checks after it list nothing (faults.rs): with 300 routers, 50,000 to 53,000 creates and deletes per \
         second (four alternating runs, by hand). A longer malloc cache per thread (glibc's tcache_count at 1,024) measured within the noise. \
         The allocator is now mimalloc (v3): a change is parsed on a runtime worker and applied on the thread \
         that holds the daemon, so much of what one thread allocates another frees, and glibc's malloc took those \
         frees under its arena's lock (malloc, free and the lock's futex about a quarter of the daemon's samples, \
         the futex alone an eighth, `perf`); mimalloc frees to the owning page without a lock. Against glibc, one \
         router, 16 pipelining clients, three alternating runs of eight rounds, by hand: the daemon's CPU per \
         change 18 to 19 us against 24 to 27 (task clock, `perf stat`), creates 50,000 to 58,500 per second \
         against 37,500 to 43,500, deletes 51,000 to 66,500 against 40,000 to 44,500. With its defaults it kept \
         freed pages with the thread that freed them for a second or more (80 MiB after the start of a daemon \
         with one router, 126 MiB after a burst of changes; an earlier try, v2 with a thread per router then, \
         84 to 98 MiB at 300 routers): it now purges after 10 ms, each runtime worker collects its pages when it \
         goes idle (at most once a second), and housekeeping forces a purge every second as it called \
         malloc_trim before: 34 to 36 MiB after the start and 58 to 61 MiB four seconds after the burst, against \
         31 and 55 to 58 with glibc. \
         The run of commit 88e92fb came in a slow phase of the host: its changes section alone, run right \
         after it with each build in turn, read 105,600 and 111,900 times in 11 s with the build before the \
         allocator and 111,600 and 134,500 with 88e92fb, where the run before read 167,700; that build's rounds at 1,000 routers, with the churn before them, measured by hand at the same time, had medians of \
         47,500 creates and 46,000 deletes per second. \
         The disk's sync is not what limits it: 7% of the group loop's time \
         (p50 1.1 ms per commit of about 480 changes, `perf trace`). A group's audit lines go to the file in one \
         write. Helper ids the daemon makes are time-ordered (UUIDv7), so a group's inserts land in a few pages of \
         the store's B-tree instead of one page each. The group loop in two stages was built and measured in an \
         earlier run: the next group handled and applied to the maps while the previous one is committed, on a \
         thread of its own; against the one-stage loop 46,800 against 44,800 creates per second and 37,400 against \
         39,600 deletes, within the noise, so it was not landed: the two cores are busy, and the handling stage \
         took twice its time per change sharing them. Built again in this run (a committer thread, each group \
         answered once its commit is done, the audit numbered when a group is staged), against the one-stage \
         loop with 300 routers, medians of four alternating runs: 56,200 against 53,100 creates and 50,900 \
         against 52,200 deletes per second, within the noise again. A group's apply costs about 9 us of CPU per \
         change and its commit about 5 (thread CPU clocks), and the second core was idle about 40% of the time \
         either way (vmstat): the stages wait on each other and on the clients' windows of 64 requests. Not \
         landed. Two malloc arenas instead of one measured no faster. One \
         client's change waits for a commit of its own: redb writes 22 KB in 9 writes per commit with 10 helpers \
         in the store and 35 KB in 12 with 1,000 (copy-on-write pages of the B-trees it touches, measured from the \
         daemon's I/O counters), which is why one client's create + delete grows from about 0.5 to 0.9 ms with N. \
         The counters are now an array the daemon maps, whose entry the rule names, so a create and a delete \
         make one `bpf` call each (a create made two, a delete three): 16 pipelining clients on one router, \
         Python clients, three rounds each, builds alternated, medians by hand: creates 36,638 and 30,854 per \
         second against 26,004 and 24,040 with the build before; deletes 26,419 and 28,914 against 27,746 and \
         31,073, within the noise. 8 clients that do not pipeline: the same rate for both builds (5,000 to \
         5,900 per second). That row, {} clients that each wait for an answer before they send again, is bounded \
         by its clients: each change waits for its group's sync of the disk, so they make at most {} ÷ the p50 \
         latency ({:.2} ms) = {:.0} changes per second, and 50,000 per second needs about {:.0} changes in flight at \
         once, which the pipelined rows have. The allocations a change makes under the daemon's lock, counted with \
         a uprobe on malloc (16 pipelining clients on one router, creates and deletes), went from 41.5 per change \
         to 28.8 in a later run: the store encodes a change from the daemon's own records when it is applied, \
         where each change was copied into the group and its helper copied again to be encoded; a delete takes its \
         helper out of memory instead of copying it; the audit entry takes a created helper from the answer \
         instead of looking it up again; ids are encoded at their final size; and a group's audit entries are \
         freed beside the next group instead of before it. Six alternating runs of eight rounds against the build \
         before, one router, by hand: medians of the runs 44,900 creates and 45,100 deletes per second before, \
         50,000 and 48,400 after (the daemon's CPU per change 20 to 25 us for both builds, moving with the host). \
         At 1,000 routers the periodic check of every router's glue and links (every 10 s; 0.4 s on an idle \
         daemon) took 5 to 8 s while the changes ran: each router's check waited for its turn at the daemon \
         behind the groups, to note what it found. A check that finds a router as it was last recorded (glue \
         intact at the same nftables generation, every link in place) no longer takes the turn: 2.2 to 2.8 s \
         during the changes, by hand. The changes run beside a check either way; rounds right after the churn \
         measured 36,000 to 48,000 creates per second and rounds 12 s later 40,000 to 57,000, by hand, within \
         the noise of each other. What is left under the lock per change (`perf`): the store's B-tree \
         work, the `bpf` calls, the audit entry's JSON and about 20 allocations (the helper's copies for memory, \
         the answer and the audit entry). The way on is less work per change under the lock, and a binary or \
         batched wire form for bulk clients. The per-change comparison with iptables-restore counts enforcer's create + \
         delete halved; the Neutron delete grows with N (a whole-table save and restore) while enforcer's does not, \
         so the ratio grows with N ({:.0}x at the largest N measured). Chain costs derived from forwarding rates are \
         noisy on 2 vCPUs.",
        f.changes_per_commit,
        f.clients,
        f.bulk_set.0 as f64 / (f.bulk_set.1 / 1000.0),
        c.clients,
        c.clients,
        c.create_many_clients.p50_ms,
        c.clients as f64 / (c.create_many_clients.p50_ms / 1000.0),
        50_000.0 * c.create_many_clients.p50_ms / 1000.0,
        c.at_n.last().map(|x| x.2 / (x.1 / 2.0)).unwrap_or(f64::NAN)
    );
    let bare_p50 = bare(0.5);
    let attach_p50 = f.add_parts.iter().find(|(part, _)| part == "attach_ms").map_or(f64::NAN, |(_, ms)| *ms);
    let _ = writeln!(
        md,
        "\nWhy the fleet goals are missed, where they are: with tcx a router add is bounded by the kernel, an RCU \
         grace period per link under the RTNL lock (two links per router here): without enforcer, the kernel took \
         {bare_p50:.1} ms p50 to attach an empty program with tcx to both links of a fresh veth pair (§8), where a \
         router add spent {attach_p50:.1} ms attaching, its `tag` loaded and both links made. Neither verifying the whole program \
         per router nor replacing the glue's table is paid any more (see above). Finding the router from the \
         packet's namespace instead of a per-router `tag` was tried and set aside: in tc programs \
         `bpf_get_netns_cookie` gives the namespace of the packet's socket, and a forwarded packet has none (it \
         gives the initial namespace's), so every router's packets looked alike. With attach = netlink \
         a filter waits for no grace period, and the qdisc and filter are looked up over rtnetlink (the netlink row; \
         a quick run on 50 routers measured about 7 ms p50). Adds in both modes grew with the routers on the host: \
         each add woke the namespace follower, which looked at every router's namespace (two stats each, under the \
         daemon's lock) and matched its link watchers against the routers in O(n^2); now an add starts only the new \
         router's link watcher (netlink adds at 1,000 routers, last tenth p50: 15.8 ms before, 8.5 ms after, first \
         tenth 6.2 ms, measured by hand). What growth is left is in the attach (1.3 to 2.5 ms p50 over the 1,000). tcx stays the default where the kernel has it: its links belong \
         to enforcer (another tool's `tc filter del` cannot remove them by accident), and it runs beside an \
         `ingress` qdisc, which Neutron puts on a router's gateway for floating IP QoS and which netlink mode \
         refuses to replace. The way on for the rest: the glue written over netlink instead of through `nft`. Running a new router's glue beside its attach \
         (it has no rules, so nothing is tagged before the glue is there) was tried: 300 routers added with their \
         helpers in 13.9 s instead of 20.0 s, but the add then waited for its `nft` under the daemon's lock, so a \
         hanging `nft` stalled every router (two fault tests failed); it needs an add in two steps that lets go of \
         the lock between the attach and the store. A restart checks each router's glue by its nftables generation (one netlink \
         request; `nft` runs only where the ruleset changed since the last check that found it intact), then its \
         links; the helper probe runs in parallel scratch namespaces while the programs verify. In a Neutron \
         router the L3 agent's iptables-nft rewrites move the generation, so there a restart lists those routers' \
         glue as in the cold row. `status` reads what the last periodic check found and walks no map. \
         A delete costs one sync of the disk (the store's; its audit entry is journaled in the same transaction), \
         down from two: 1.69 to 1.23 ms p50 at 1,000 routers, 0.79 to 0.58 ms with one router, measured back to \
         back. What the rest costs at 1,000 routers, twice the one-router figure, is not located yet. \
         Memory under churn: until this run a restarted daemon ended its start with about one thread per \
         router (306 with 300 routers). Every stored router's start step queued for the daemon's lock at once, \
         each on a blocking thread of its own, parked on the mutex, and each thread took memory (its stack, \
         its malloc cache, up to eight malloc arenas per core) that stayed with the process when it ended: 300 \
         routers removed and added again grew the daemon from 34 to 55 and then 60 MiB. A heap profile showed a \
         flat live heap, as this was never the daemon's data. Now a step waits for its turn at the lock as a \
         future, without a thread (15 threads after the restart): 30 to 36 MiB, then 36 again, the size \
         of the daemon before the restart, which had added the routers itself. That rise went too in a later \
         run: a heap profile of one churn round (heaptrack, attached) found 4.7 KiB more live data, so the rest \
         was the heap's layout. Each router's link watcher held a 16 KiB receive buffer between events; it now \
         drains into a small local one (MSG_TRUNC discards the rest of a message). And the one-malloc-arena \
         setting never took effect: the daemon's start set two arenas right after it, when the start-up checks' \
         threads had made arenas already; it is now set before any thread starts. 300 routers, restart and two \
         churn rounds, measured by hand: 30.4, 36.8, 36.6 MiB before, 30.7, 32.3, 32.3 MiB after. Earlier tries (a \
         fixed mmap threshold, redb's cache at 2 MiB, jemalloc, which grew it 52 to 117 MiB, and mimalloc, 202 to \
         1,645 MiB with the threads still there) were aimed at the allocator. The daemon now runs on mimalloc for \
         the changes' sake (above), its free pages purged after 10 ms and collected every second. \
         It costs memory after a restart: mimalloc gives each thread pages of its own, and the start-up's \
         steps run on many threads, so what they keep is spread thinly over more pages (300 routers of 10 \
         helpers, by hand: 47 MiB 13 s after the restart was ready, against 34 with glibc; the run of commit 88e92fb: 64.4 MiB after a restart at 1,000 routers, against 46.7 in the run before). Now every step on the daemon runs on one \
         thread of its own, where it ran on whichever blocking thread was free, so what the steps keep is \
         allocated by one thread (300 routers of 10 helpers, netlink attach, two alternating runs each, by hand: \
         13 s after the restart was ready 41.8 and 41.5 MiB against 47.0 and 48.4, after a round of churn 42.3 \
         and 42.4 against 53.4 and 53.3; the daemon that had added the routers held 38 to 40). The changes gained \
         by it too, the daemon's state staying in one core's caches: 16 pipelining clients on one of the 300 \
         routers, two alternating runs of six rounds, medians of the rounds 72,500 and 71,600 creates and 70,700 \
         and 66,700 deletes per second against 59,300 and 62,200 and 51,500 and 56,300; the daemon's CPU per \
         create 12.5 and 14.1 us against 15.6 and 16.6."
    );
    let _ = writeln!(
        md,
        "\nWhy the packet goals are missed, where they are: the runs do not all come on one kind of host. The \
         run of commit 8b7bba1 came on a 2-core Intel Xeon (the kernel's Spectre v2 mitigation: retpolines), the \
         runs before it on a 2-core AMD EPYC, and the Intel host did nearly everything two to three times faster: \
         the Neutron router's packet 2,026 ns against 6,581, pipelined creates and deletes at 1,000 routers 63,682 \
         and 78,589 per second against 37,413 and 39,464, a restart's repair 591 ms against 930. Three goals that \
         are ratios went the other way there. In a Neutron router (§6), enforcer's fixed cost fell from 347 to 151 \
         ns per packet, but the router's own time fell more, so 0.95 leaves enforcer 101 ns where it left 329: the \
         table took 45 ns, the tc hook 24, the program's work 25, and the conntrack index's netfilter hook the rest \
         (the 0 helpers row, with the index parked, measured 0.951, the rows with helpers 0.926 to 0.935). Each of \
         these is a hook the packet crosses, an indirect call that retpolines make dearer; the way on is fewer \
         hooks per packet: the index filled from conntrack's own events of new connections in the router's \
         namespace instead of a program every packet runs, falling back to the dump it already makes when the \
         index is incomplete (a lost event marks it so). The tagging program came to 2.04x the one-lookup baseline \
         at 1M rules (47 against 23 ns; 1.39x on the AMD host): what it does beside its lookup (the tail call from \
         the router's `tag`, the parse, the filter's hash and the counter's atomic add) costs relatively more on \
         this CPU. And a create + delete at 1,000 rules (0.89 ms, two syncs of the disk) came to 92.6x the \
         iptables-restore way (41 ms), which this host also ran faster; at 5,000 rules 651x, as Neutron's delete \
         grows with the rules and enforcer's does not. The run of commit 5edd428, which changed only the daemon's userspace and the bench's memory readings, measured on the same kind of host 0.942 with the index parked and 0.911 to 0.922 with helpers, 2.04x, and 89.2x (33.0 ms against 0.74)."
    );
    std::fs::write(dir.join("results.md"), md)
}

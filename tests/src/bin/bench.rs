//! `cargo xtask bench [--quick]`: see tests/src/bench.
use enforcer_tests::bench::{self, Scale, report};

fn main() {
    let mut quick = false;
    // One section alone, printed rather than reported (for development).
    let mut only = None;
    let mut out = std::path::PathBuf::from("bench");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quick" => quick = true,
            "--out" => out = args.next().expect("--out DIR").into(),
            "--only" => only = args.next(),
            other => panic!("unknown argument {other}; use [--quick] [--out DIR] [--only SECTION]"),
        }
    }
    enforcer_tests::require_root();
    let scale = Scale { quick };
    let started = std::time::Instant::now();
    if let Some(section) = only {
        match section.as_str() {
            "packet" => eprintln!("{:#?}", bench::packet::measure(scale)),
            "changes" => eprintln!("{:#?}", bench::changes::measure(scale)),
            "fleet" => eprintln!("{:#?}", bench::fleet::measure(scale)),
            "revocation" => eprintln!("{:#?}", bench::revocation::measure(scale)),
            "fixed" => eprintln!("{:#?}", bench::fixed_cost::measure(scale)),
            other => panic!("--only: unknown section {other} (packet, changes, fleet, fixed, revocation)"),
        }
        return;
    }
    let packet = bench::packet::measure(scale);
    let changes = bench::changes::measure(scale);
    let revocation = bench::revocation::measure(scale);
    let forwarding = bench::forwarding::measure(scale);
    let fixed_cost = bench::fixed_cost::measure(scale);
    let sync = bench::sync::measure(scale);
    let fleet = bench::fleet::measure(scale);
    let all = report::All { scale, packet, forwarding, fixed_cost, changes, revocation, sync, fleet };
    report::write(&all, &out).expect("writing the results");
    eprintln!("bench: done in {:.0} s; results in {}", started.elapsed().as_secs_f64(), out.join("results.md").display());
}

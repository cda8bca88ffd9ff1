//! Packet path cost: ns per run of the programs through BPF_PROG_TEST_RUN
//! with 1 .. 1,000,000 rules loaded, against an empty program and a
//! program doing one hash lookup, in the same run.

use aya::programs::{TestRun, TestRunOptions};
use enforcer::kernel::Datapath;
use enforcer_common::{IPPROTO_TCP, MarkLayout, PROG_BASELINE_EMPTY, PROG_BASELINE_LOOKUP, PROG_TAG};

use super::{Scale, median};

#[derive(Debug, Clone)]
pub struct Row {
    pub rules: usize,
    pub program: String,
    pub case: String,
    pub ns: f64,
}

fn packet(v6: bool, dport: u16) -> Vec<u8> {
    let mut p = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    let tcp = {
        let mut h = vec![0u8; 20];
        h[0..2].copy_from_slice(&40000u16.to_be_bytes());
        h[2..4].copy_from_slice(&dport.to_be_bytes());
        h[12] = 0x50;
        h
    };
    if v6 {
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0, 0, 20, IPPROTO_TCP, 64]);
        p.extend_from_slice(&[0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2]);
        p.extend_from_slice(&[0xfd, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 2]);
    } else {
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.extend_from_slice(&[0x45, 0, 0, 40, 0, 1, 0, 0, 64, IPPROTO_TCP, 0, 0, 10, 200, 1, 2, 10, 200, 2, 2]);
    }
    p.extend_from_slice(&tcp);
    // Pad to 64 bytes on the wire.
    p.resize(p.len().max(64), 0);
    p
}

fn run(dp: &Datapath, prog: &str, data: &[u8], mark: u32, repeat: u32) -> f64 {
    let mut ctx = vec![0u8; 192];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    let opts = TestRunOptions { data_in: Some(data), ctx_in: Some(&ctx), repeat, ..Default::default() };
    let r = dp.program(prog).expect("program").test_run(opts).expect("BPF_PROG_TEST_RUN");
    r.duration.as_nanos() as f64
}

/// The conntrack entry of `packet(false, dport)`'s connection.
fn revoked_flow(dport: u16) -> enforcer::kernel::conntrack::Entry {
    use enforcer::kernel::conntrack::{Entry, Tuple5};
    let (a, b): (std::net::IpAddr, std::net::IpAddr) = ([10, 200, 1, 2].into(), [10, 200, 2, 2].into());
    Entry {
        zone: 0,
        orig: Tuple5 { proto: IPPROTO_TCP, src: a, dst: b, sport: 40000, dport },
        reply: Tuple5 { proto: IPPROTO_TCP, src: b, dst: a, sport: dport, dport: 40000 },
    }
}

pub fn measure(scale: Scale) -> Vec<Row> {
    let dir = std::path::PathBuf::from("/sys/fs/bpf").join(crate::unique("bench"));
    let sizes: Vec<usize> = scale.pick(vec![1, 1_000, 100_000], vec![1, 1_000, 100_000, 1_000_000]);
    let repeat = scale.pick(20_000, 200_000);
    let rounds = scale.pick(3, 7);
    let mut dp = Datapath::load(&dir, MarkLayout::DEFAULT, 1 << 21, enforcer::kernel::RevokedPolicy { quiet_ns: 1_000_000_000, ..Default::default() }).expect("loading");
    dp.load_baselines().expect("baselines");
    // The hit rule: router 0 (the control instance), tcp/21, slot 1.
    dp.allow(0, IPPROTO_TCP, 21, 1, 1).unwrap();
    let mut loaded = 1usize;
    let mut rows = Vec::new();
    for n in sizes {
        // Fill other routers' rules up to n (60,000 per router: slots are 16 bits).
        while loaded < n {
            let i = loaded;
            let (router, port) = (1 + (i / 60_000) as u32, 1 + (i % 60_000) as u16);
            dp.allow(router, IPPROTO_TCP, port, 1, port).unwrap();
            loaded += 1;
        }
        let cases: Vec<(&str, &str, Vec<u8>, u32)> = vec![
            ("tag", "hit ipv4", packet(false, 21), 0),
            ("tag", "miss ipv4", packet(false, 22), 0),
            ("tag", "hit ipv6", packet(true, 21), 0),
            ("tag", "miss ipv6", packet(true, 22), 0),
            ("empty program", "-", packet(false, 21), 0),
            ("one hash lookup", "-", packet(false, 21), 0),
        ];
        for (prog, case, data, mark) in cases {
            let name = match prog {
                "tag" => PROG_TAG,
                "empty program" => PROG_BASELINE_EMPTY,
                _ => PROG_BASELINE_LOOKUP,
            };
            let ns = median((0..rounds).map(|_| run(&dp, name, &data, mark, repeat)).collect());
            rows.push(Row { rules: n, program: prog.to_string(), case: case.to_string(), ns });
        }
        // While a revocation keeps a flow dropped, every packet pays one
        // more hash lookup; the drop path runs with the datapath log off
        // (its only reader).
        let revoked = revoked_flow(23);
        dp.remember_revoked(0, 1, &[revoked]).expect("remembering a revoked flow");
        for (case, port) in [("revoked flow (drop)", 23), ("miss ipv4, a flow revoked", 22)] {
            let ns = median((0..rounds).map(|_| run(&dp, PROG_TAG, &packet(false, port), 0, repeat)).collect());
            rows.push(Row { rules: n, program: "tag".to_string(), case: case.to_string(), ns });
        }
        dp.forget_revoked(0, [revoked].iter());
        dp.sweep_revoked().expect("sweeping the revoked flows");
        eprintln!("bench: packet cost with {n} rules done");
    }
    drop(dp);
    let _ = std::fs::remove_dir_all(&dir);
    rows
}

//! Whole maps read a few thousand entries per `bpf` call
//! (BPF_MAP_LOOKUP_BATCH), where a walk key by key makes two calls per
//! entry: at 100,000 rules the periodic check of the maps held the
//! daemon's lock for about 600 ms walking them so.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::maps::MapData;
use aya_obj::generated::{bpf_attr, bpf_cmd};

/// Entries asked for per call.
const CHUNK: usize = 4096;

/// Every entry of `map`, a hash map or an array (whose keys are then the
/// indexes, `u32`). An error where the kernel has no batch lookup (before
/// 5.6) too: the caller may walk instead.
pub fn read_all<K: aya::Pod, V: aya::Pod>(map: &MapData) -> io::Result<Vec<(K, V)>> {
    let mut out = Vec::new();
    // SAFETY: the map's keys and values are plain data, valid all-zero.
    let (mut keys, mut values) = unsafe { (vec![std::mem::zeroed::<K>(); CHUNK], vec![std::mem::zeroed::<V>(); CHUNK]) };
    let (mut token, mut next) = (0u32, 0u32);
    let mut first = true;
    loop {
        // SAFETY: all-zero is a valid bpf_attr.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        attr.batch.in_batch = if first { 0 } else { &raw const token as u64 };
        attr.batch.out_batch = &raw mut next as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = CHUNK as u32;
        attr.batch.map_fd = map.fd().as_fd().as_raw_fd() as u32;
        let result = sys_bpf(bpf_cmd::BPF_MAP_LOOKUP_BATCH, &mut attr);
        // SAFETY: the kernel wrote back how many it read.
        let read = unsafe { attr.batch.count } as usize;
        out.extend(keys[..read].iter().copied().zip(values[..read].iter().copied()));
        match result {
            Ok(_) => {}
            // ENOENT: the walk is over.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Err(e) => return Err(e),
        }
        token = next;
        first = false;
    }
}

/// The `bpf` system call, for what aya does not offer.
pub(super) fn sys_bpf(cmd: bpf_cmd, attr: &mut bpf_attr) -> io::Result<i64> {
    // SAFETY: the bpf syscall with a bpf_attr of the size given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd as libc::c_long, attr as *mut bpf_attr, std::mem::size_of::<bpf_attr>()) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

//! Everything that touches the kernel: the TC programs and their pinned maps,
//! router namespaces, the netfilter glue. The rest of the crate sees only
//! `Datapath`, `Attachment`, `glue` and `dump`, and is testable without root.

pub mod dump;
pub mod glue;
pub mod netns;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLink},
};
use enforcer_common::{
    Counters, GLOBAL_MARK_LAYOUT, GLOBAL_ROUTER, MAP_COUNTERS, MAP_ROUTERS, MAP_RULES, MAP_SLOTS,
    MarkLayout, PROG_ENFORCE, PROG_TAG, RouterIndex, RouterValue, RuleKey, RuleValue, SlotKey,
    SlotValue,
};

/// The eBPF object, built by build.rs from enforcer-ebpf.
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer.bpf.o"));

/// Default bpffs directory of the pinned maps.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/enforcer";

/// The pinned maps, and an instance of the programs for router index 0
/// (never a router; used for BPF_PROG_TEST_RUN).
pub struct Datapath {
    dir: PathBuf,
    control: Ebpf,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    slots: HashMap<MapData, SlotKey, SlotValue>,
    counters: PerCpuHashMap<MapData, SlotKey, Counters>,
    routers: HashMap<MapData, RouterIndex, RouterValue>,
    layout: MarkLayout,
    max_rules: u32,
}

/// One router's instance of the programs, attached to the interfaces of its
/// namespace. Only the links are kept (they hold the programs in the kernel),
/// so a router costs two file descriptors per interface. Dropping it
/// detaches them.
pub struct Attachment {
    pub index: RouterIndex,
    pub interfaces: Vec<String>,
    _links: Vec<SchedClassifierLink>,
}

fn mount_bpffs_if_needed(dir: &Path) -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root)?;
        nix::mount::mount(Some("bpf"), root, Some("bpf"), nix::mount::MsFlags::empty(), None::<&str>)
            .context("mounting bpffs at /sys/fs/bpf")?;
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 as i64 == BPF_FS_MAGIC).unwrap_or(false)
}

impl Datapath {
    /// Creates (or reuses) the maps pinned in `dir`, so they outlive the
    /// daemon and `maps dump` can read them, and verifies the programs.
    pub fn load(dir: &Path, layout: MarkLayout, max_rules: u32) -> Result<Self> {
        mount_bpffs_if_needed(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !is_bpffs(dir) {
            return Err(anyhow!("{} is not on a bpf filesystem", dir.display()));
        }
        let mut control = load_instance(dir, layout, max_rules, 0)?;
        fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
        where
            T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
        {
            let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing"))?;
            T::try_from(map).with_context(|| format!("map {name}"))
        }
        Ok(Self {
            rules: take(&mut control, MAP_RULES)?,
            slots: take(&mut control, MAP_SLOTS)?,
            counters: take(&mut control, MAP_COUNTERS)?,
            routers: take(&mut control, MAP_ROUTERS)?,
            control,
            dir: dir.to_path_buf(),
            layout,
            max_rules,
        })
    }

    pub fn layout(&self) -> MarkLayout {
        self.layout
    }

    /// A loaded program, for BPF_PROG_TEST_RUN.
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self.control.program(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?)
    }

    /// Loads an instance of the programs for router `index` and attaches tag
    /// (ingress) and enforce (egress) to every interface of the namespace at
    /// `ns`; records which router the index belongs to.
    pub fn attach_router(&mut self, ns: &Path, index: RouterIndex, router: uuid::Uuid) -> Result<Attachment> {
        let mut programs = load_instance(&self.dir, self.layout, self.max_rules, index)?;
        let ebpf = &mut programs;
        let (interfaces, links) = netns::run_in(ns, || {
            let interfaces = netns::interfaces()?;
            let mut links = Vec::new();
            for iface in &interfaces {
                if !tcx_supported() {
                    // Older kernels: classic clsact qdisc via netlink.
                    let _ = aya::programs::tc::qdisc_add_clsact(iface);
                }
                for (name, kind) in [(PROG_TAG, TcAttachType::Ingress), (PROG_ENFORCE, TcAttachType::Egress)] {
                    let prog: &mut SchedClassifier =
                        ebpf.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?;
                    let id = prog
                        .attach(iface, kind)
                        .with_context(|| format!("attaching {name} to {iface} ({kind:?})"))?;
                    links.push(prog.take_link(id)?);
                }
            }
            Ok((interfaces, links))
        })?;
        self.routers
            .insert(index, RouterValue { id: *router.as_bytes() }, 0)
            .context("recording router in map")?;
        Ok(Attachment { index, interfaces, _links: links })
    }

    /// Forgets a router's index; its links go when the Attachment drops.
    pub fn forget_router(&mut self, index: RouterIndex) {
        let _ = self.routers.remove(&index);
    }

    /// Allows (router, protocol, port) with `helper` under rule `slot`:
    /// counters first, then the live slot, then the rule, so a tagged packet
    /// always finds its slot live.
    pub fn allow(&mut self, router: RouterIndex, proto: u8, port: u16, helper: u8, slot: u16) -> Result<()> {
        let key = SlotKey::new(router, slot as u32);
        let zero = PerCpuValues::try_from(vec![Counters::default(); nr_cpus()?])?;
        self.counters.insert(key, zero, 0).context("creating rule counters")?;
        self.slots.insert(key, SlotValue { helper, _pad: [0; 7] }, 0).context("marking slot live")?;
        self.rules
            .insert(RuleKey::new(router, proto, port), RuleValue { slot, helper, _pad: [0; 5] }, 0)
            .context("inserting rule (is the rules map full? see max_rules)")?;
        Ok(())
    }

    /// Revokes a rule: stop tagging, then kill the slot, so every packet
    /// still carrying it (control and RELATED data flows) is dropped on egress.
    /// Returns once the maps say so: the next packet sees the change.
    pub fn revoke(&mut self, router: RouterIndex, proto: u8, port: u16, slot: u16) -> Result<()> {
        remove_if_present(&mut self.rules, &RuleKey::new(router, proto, port))?;
        remove_if_present(&mut self.slots, &SlotKey::new(router, slot as u32))?;
        Ok(())
    }

    /// Empties every map (at start, before the store's rules are applied).
    pub fn clear(&mut self) -> Result<()> {
        let keys: Vec<_> = self.rules.keys().collect::<Result<_, _>>()?;
        for k in keys {
            remove_if_present(&mut self.rules, &k)?;
        }
        let keys: Vec<_> = self.slots.keys().collect::<Result<_, _>>()?;
        for k in keys {
            remove_if_present(&mut self.slots, &k)?;
        }
        let keys: Vec<_> = self.counters.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = self.counters.remove(&k);
        }
        let keys: Vec<_> = self.routers.keys().collect::<Result<_, _>>()?;
        for k in keys {
            remove_if_present(&mut self.routers, &k)?;
        }
        Ok(())
    }

    /// Drops the counters of a slot that will never be seen again.
    pub fn forget_slot(&mut self, router: RouterIndex, slot: u16) {
        let _ = self.counters.remove(&SlotKey::new(router, slot as u32));
        let _ = self.slots.remove(&SlotKey::new(router, slot as u32));
    }
}

/// Removes `key`; a key that is already gone is not an error.
fn remove_if_present<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: &K) -> Result<()> {
    match map.remove(key) {
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => Ok(other?),
    }
}

/// Loads the object with the given router index; maps are shared through
/// their pins, so every instance sees the same rules.
fn load_instance(dir: &Path, layout: MarkLayout, max_rules: u32, index: RouterIndex) -> Result<Ebpf> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global(GLOBAL_MARK_LAYOUT, &layout, true)
        .override_global(GLOBAL_ROUTER, &index, true)
        .map_max_entries(MAP_RULES, max_rules)
        .map_max_entries(MAP_SLOTS, max_rules)
        .map_max_entries(MAP_COUNTERS, max_rules)
        .load(PROGRAMS)
        .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
    for name in [PROG_TAG, PROG_ENFORCE] {
        let prog: &mut SchedClassifier =
            ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
        prog.load().with_context(|| format!("verifying program {name}"))?;
    }
    Ok(ebpf)
}

fn nr_cpus() -> Result<usize> {
    aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))
}

fn tcx_supported() -> bool {
    aya::util::KernelVersion::current().map(|v| v >= aya::util::KernelVersion::new(6, 6, 0)).unwrap_or(false)
}

/// The pin directory a daemon with `--bpffs DIR` uses.
pub fn bpffs_dir(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS))
}

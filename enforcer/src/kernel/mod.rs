//! Everything that touches the kernel: the TC programs and their pinned maps,
//! router namespaces, the netfilter glue. The rest of the crate sees only
//! `Datapath`, `Attachment`, `glue` and `dump`, and is testable without root.

pub mod attach;
mod batch;
pub mod conntrack;
pub mod counters;
pub mod ctindex;
pub mod dump;
pub mod exec;
pub mod features;
pub mod glue;
pub mod pins;
mod filter;
pub mod probe;
pub mod netns;
pub mod netlink;

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, IterableMap, MapData},
    programs::{SchedClassifier, TcAttachType, links::FdLink},
};
pub use attach::{AttachMode, AttachSetting};
pub use crate::api::MapDrift;
use enforcer_common::{
    FlowKey, GLOBAL_MARK_LAYOUT, GLOBAL_QUIET_NS, GLOBAL_ROUTER, MAP_COUNTERS, MAP_REVOKED,
    MAP_ROUTERS, MAP_RULES, MarkLayout, NO_COUNTER, PROG_LEGACY_ENFORCE, PROG_TAG, RevokedFlow, RouterIndex,
    RouterValue, RuleKey, RuleValue, SlotKey,
};

/// The eBPF object, built by build.rs from enforcer-ebpf (empty in a build
/// with AYA_BUILD_SKIP set).
pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/enforcer.bpf.o"));

/// Default bpffs directory of the pinned maps.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/enforcer";

/// Map update flag: insert only if the key is absent (EEXIST otherwise).
const BPF_NOEXIST: u64 = 1;

/// The pinned maps, and the control instance of the programs: its
/// `classify` serves every router (through `ENFORCER_CLASSIFY`), its `tag`
/// is router index 0's (never a router; used for BPF_PROG_TEST_RUN).
pub struct Datapath {
    dir: PathBuf,
    control: Ebpf,
    rules: HashMap<MapData, RuleKey, RuleValue>,
    filter: filter::RuleFilter,
    counters: counters::SlotCounters,
    routers: HashMap<MapData, RouterIndex, RouterValue>,
    revoked: HashMap<MapData, FlowKey, RevokedFlow>,
    revoked_active: aya::maps::Array<MapData, u32>,
    /// Drops the programs may still describe in the datapath log.
    debug: aya::maps::Array<MapData, u32>,
    /// The reader of that log, until the daemon takes it.
    log: Option<DatapathLog>,
    layout: MarkLayout,
    revoked_policy: RevokedPolicy,
    loader: Loader,
    /// Revoked flows per router, as of the last remember or sweep: each
    /// router's share of the map is enforced on it.
    revoked_per_router: StdHashMap<RouterIndex, usize>,
    /// Slots that revoked flows name, as of the last remember or sweep:
    /// their counters count the flows' drops, so reconciling keeps them.
    revoked_slots: HashSet<SlotKey>,
    /// Revoked flows that could not be kept dropped (share or map full).
    revoked_overflows: u64,
    mode: AttachMode,
    /// Netlink mode: swap programs in for those already attached (set while
    /// the daemon reconciles at start).
    replace_programs: bool,
    /// The conntrack index, unless this kernel cannot run it (then every
    /// revocation dumps the conntrack table).
    ctindex: Option<ctindex::CtIndex>,
}

/// How revoked flows are kept dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokedPolicy {
    /// A flow passes again once quiet this long.
    pub quiet_ns: u64,
    /// ... or once revoked this long, however it talks.
    pub lifetime_ns: u64,
    /// Capacity of the map, all routers together.
    pub capacity: u32,
    /// Most entries one router may hold, so that one router's mass
    /// revocation cannot take the others' room.
    pub per_router: u32,
}

impl Default for RevokedPolicy {
    fn default() -> Self {
        Self {
            quiet_ns: enforcer_common::DEFAULT_QUIET_NS,
            lifetime_ns: enforcer_common::DEFAULT_REVOKED_LIFETIME_NS,
            capacity: enforcer_common::MAX_REVOKED_FLOWS,
            per_router: enforcer_common::MAX_REVOKED_FLOWS / 4,
        }
    }
}

/// What remembering a revocation's flows did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Remembered {
    /// Directions now kept dropped.
    pub kept: usize,
    /// Directions refused: the router's share or the map was full.
    pub overflowed: usize,
}

/// Where a router's programs are attached. The links themselves are pinned
/// (they hold the programs in the kernel), so the daemon keeps no file
/// descriptor per router and enforcement outlives it.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub index: RouterIndex,
    pub interfaces: Vec<String>,
}

/// What `sync_router` changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkChanges {
    pub attached: usize,
    pub detached: usize,
    /// Attachments that kept their place and got this build's program.
    pub replaced: usize,
}

/// A program on an interface's hook: (interface, ifindex, program, hook).
type Hook = (String, u32, &'static str, TcAttachType);

/// Each program and the hook it runs on: one, on ingress. (Earlier
/// releases also ran `enforce` on egress; an upgrade detaches it.)
const PROGRAMS_AND_HOOKS: [(&str, TcAttachType); 1] = [(PROG_TAG, TcAttachType::Ingress)];

/// Pin file name of a link (bpffs refuses dots in names).
fn pin_name(ifindex: u32, prog: &str) -> String {
    format!("if{ifindex}_{prog}")
}

/// Whether the link pinned at `path` is not to be kept with the interfaces
/// `current`: its interface is gone, or it holds a program this build does
/// not attach (an earlier release's egress program). Unpinning it detaches
/// it.
fn stale_pin(path: &Path, current: &[(String, u32)]) -> bool {
    let legacy = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.strip_suffix(PROG_LEGACY_ENFORCE).is_some_and(|n| n.ends_with('_')));
    legacy || pin_ifindex(path).is_none_or(|i| !current.iter().any(|(_, idx)| *idx == i))
}

fn pin_ifindex(path: &Path) -> Option<u32> {
    path.file_name()?.to_str()?.strip_prefix("if")?.split_once('_')?.0.parse().ok()
}

/// Takes map `name` out of `ebpf`, typed.
fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
    T::Error: std::error::Error + Send + Sync + 'static,
{
    let map = ebpf.take_map(name).ok_or_else(|| anyhow!("map {name} missing"))?;
    T::try_from(map).with_context(|| format!("map {name}"))
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
    nix::sys::statfs::statfs(path).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC).unwrap_or(false)
}

impl Datapath {
    /// Creates (or reuses) the maps pinned in `dir`, so they outlive the
    /// daemon and `maps dump` can read them, and verifies the programs;
    /// with a conntrack index of the default capacity.
    pub fn load(dir: &Path, layout: MarkLayout, max_rules: u32, revoked: RevokedPolicy) -> Result<Self> {
        Self::load_with_index(dir, layout, max_rules, revoked, enforcer_common::DEFAULT_CT_INDEX_CAPACITY)
    }

    /// [`Datapath::load`] with a conntrack index of `ct_index_max` entries
    /// (0: none, and an earlier one's pins are removed).
    pub fn load_with_index(dir: &Path, layout: MarkLayout, max_rules: u32, revoked: RevokedPolicy, ct_index_max: u32) -> Result<Self> {
        mount_bpffs_if_needed(dir)?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !is_bpffs(dir) {
            return Err(anyhow!("{} is not on a bpf filesystem", dir.display()));
        }
        pins::check(dir, max_rules, revoked.capacity)?;
        pins::remove_legacy(dir)?;
        let mut loader = Loader::new(dir, layout, max_rules, revoked);
        let mut control = loader.instance(0)?;
        let classify: &mut SchedClassifier = control
            .program_mut(enforcer_common::PROG_CLASSIFY)
            .ok_or_else(|| anyhow!("program {} missing from the object", enforcer_common::PROG_CLASSIFY))?
            .try_into()?;
        classify.load().with_context(|| format!("verifying program {}", enforcer_common::PROG_CLASSIFY))?;
        let classify = classify.fd()?.try_clone().context("duplicating the classify program's descriptor")?;
        let rules: HashMap<MapData, RuleKey, RuleValue> = take(&mut control, MAP_RULES)?;
        // Before any program of this build runs: a rules map left by an
        // earlier run (or version) gets its rules' bits in the filter.
        let filter = filter::RuleFilter::new(take(&mut control, enforcer_common::MAP_RULE_FILTER)?, rules.keys().filter_map(|k| k.ok()))?;
        // Then every router's `tag` (this start's, and those an earlier one
        // pinned) runs this `classify`. The pin keeps the entry after this
        // descriptor is closed.
        let mut jump: aya::maps::ProgramArray<MapData> = take(&mut control, enforcer_common::MAP_CLASSIFY)?;
        jump.set(0, &classify, 0).context("installing the classify program")?;
        let mut datapath = Self {
            rules,
            filter,
            counters: counters::SlotCounters::open(control.take_map(MAP_COUNTERS).ok_or_else(|| anyhow!("map {MAP_COUNTERS} missing"))?)?,
            routers: take(&mut control, MAP_ROUTERS)?,
            revoked: take(&mut control, MAP_REVOKED)?,
            revoked_active: take(&mut control, enforcer_common::MAP_REVOKED_ACTIVE)?,
            debug: take(&mut control, enforcer_common::MAP_DEBUG)?,
            log: Some(aya_log::EbpfLogger::init_with_logger(&mut control, Forward).context("reading the datapath log")?),
            control,
            loader,
            dir: dir.to_path_buf(),
            layout,
            revoked_policy: revoked,
            revoked_per_router: StdHashMap::new(),
            revoked_slots: HashSet::new(),
            revoked_overflows: 0,
            mode: AttachMode::Tcx,
            replace_programs: false,
            ctindex: None,
        };
        datapath.ctindex = match ctindex::CtIndex::load(dir, layout, ct_index_max) {
            Ok(index) => index,
            Err(e) => {
                tracing::warn!("no conntrack index, every revocation with connections dumps the conntrack table: {e:#}");
                None
            }
        };
        // Counts the revoked flows an earlier run left in the pinned map.
        datapath.sweep_revoked()?;
        Ok(datapath)
    }

    pub fn layout(&self) -> MarkLayout {
        self.layout
    }

    /// Lets the programs describe the next `drops` drops in the datapath
    /// log (0: none, the default).
    pub fn set_debug(&mut self, drops: u32) -> Result<()> {
        self.debug.set(0, drops, 0).context("setting the datapath log budget")
    }

    /// Drops the programs may still describe.
    pub fn debug_budget(&self) -> Result<u32> {
        self.debug.get(&0, 0).context("reading the datapath log budget")
    }

    /// The datapath log's reader (once): readable when the programs wrote
    /// records, which `flush` passes to the daemon's log.
    pub fn take_log(&mut self) -> Option<DatapathLog> {
        self.log.take()
    }

    /// How routers are attached from now on (default: tcx).
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = mode;
    }

    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// What the programs attached by this datapath are: the eBPF object and
    /// the constants it is loaded with (mark layout, quiet time). Another
    /// value than the one recorded at the last start means an upgrade or a
    /// configuration change: the programs must be replaced everywhere.
    pub fn program_identity(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        PROGRAMS.hash(&mut h);
        ctindex::OBJECT.hash(&mut h);
        let l = self.layout;
        (l.helper_mask, l.slot_mask, l.slot_shift, self.revoked_policy.quiet_ns).hash(&mut h);
        format!("{:016x}-{}", h.finish(), PROGRAMS.len())
    }

    /// Whether routers synced from now on get this build's programs even
    /// where they are already attached: netlink filters get the new program
    /// in place, tcx links are updated to it (bpf_link_update), so the hook
    /// never runs without a program.
    pub fn set_replace_programs(&mut self, replace: bool) {
        self.replace_programs = replace;
    }

    /// Loads the benchmark baseline programs of the control instance.
    pub fn load_baselines(&mut self) -> Result<()> {
        for name in [enforcer_common::PROG_BASELINE_EMPTY, enforcer_common::PROG_BASELINE_LOOKUP] {
            let prog: &mut SchedClassifier =
                self.control.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        Ok(())
    }

    /// A loaded program, for BPF_PROG_TEST_RUN.
    pub fn program(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self.control.program(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?)
    }

    /// Where the links of router `index` are pinned.
    fn link_dir(&self, index: RouterIndex) -> PathBuf {
        self.dir.join("routers").join(index.to_string())
    }

    /// Makes the attachments of router `index` match the interfaces its
    /// namespace has now: tag (ingress) on each one, so that they outlive
    /// the daemon (see `attach`). Idempotent. `unmarked`: no connection of
    /// the namespace can carry a slot yet (see `CtIndex::register`).
    pub fn sync_router(&mut self, ns: &Path, index: RouterIndex, router: uuid::Uuid, unmarked: bool) -> Result<(Attachment, LinkChanges)> {
        // The directory also records, in netlink mode, which routers have
        // attachments (for orphans after a restart).
        let dir = self.link_dir(index);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let current = netns::run_in(ns, netns::interfaces)?;
        let changes = match self.mode {
            AttachMode::Tcx => self.sync_tcx(ns, index, &current)?,
            AttachMode::Netlink => {
                // Programs are swapped in for those already there only when
                // asked (at start, so an upgrade runs its own programs);
                // otherwise a router whose filters are all there is left as
                // it is, with no program loaded.
                let complete = !self.replace_programs
                    && netns::run_in(ns, || {
                        let hooks = attach::Hooks::open()?;
                        current.iter().try_fold(true, |all, (iface, idx)| Ok(all && hooks.missing((iface, *idx))? == 0))
                    })?;
                if complete {
                    self.routers.insert(index, RouterValue { id: *router.as_bytes() }, 0).context("recording router in map")?;
                    self.index_router(ns, index, unmarked);
                    let interfaces = current.into_iter().map(|(name, _)| name).collect();
                    return Ok((Attachment { index, interfaces }, LinkChanges::default()));
                }
                let mut programs = self.loader.instance(index)?;
                netns::run_in(ns, || {
                    let mut changes = LinkChanges::default();
                    // Every interface is checked before any is touched, so
                    // a refused router is left as it was.
                    let hooks = attach::Hooks::open()?;
                    let missing = hooks.clsact_missing(&current)?;
                    for ((iface, idx), missing) in current.iter().zip(missing) {
                        if missing {
                            attach::add_clsact(iface)?;
                        }
                        if self.replace_programs && hooks.detach_legacy((iface, *idx))? {
                            changes.detached += 1;
                        }
                        for (name, kind) in PROGRAMS_AND_HOOKS {
                            let prog: &mut SchedClassifier =
                                programs.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?;
                            if hooks.attach(prog, (iface, *idx), kind)? {
                                changes.attached += 1;
                            } else {
                                changes.replaced += 1;
                            }
                        }
                    }
                    Ok(changes)
                })?
            }
        };
        self.routers.insert(index, RouterValue { id: *router.as_bytes() }, 0).context("recording router in map")?;
        self.index_router(ns, index, unmarked);
        let interfaces = current.into_iter().map(|(name, _)| name).collect();
        Ok((Attachment { index, interfaces }, changes))
    }

    /// Has the conntrack index keep router `index`'s entries (a failure
    /// leaves its revocations to dump the table).
    fn index_router(&mut self, ns: &Path, index: RouterIndex, unmarked: bool) {
        if let Some(ix) = &mut self.ctindex
            && let Err(e) = ix.register(ns, index, self.replace_programs, unmarked)
        {
            tracing::warn!(router = index, "{e:#}");
        }
    }

    /// The entries of `slot` of router `index`, from the conntrack index
    /// if it is complete for the router (None: dump, then `ct_seed`).
    pub fn ct_carrying(&self, index: RouterIndex, slot: u16) -> Option<Vec<conntrack::Entry>> {
        self.ctindex.as_ref()?.carrying(index, slot)
    }

    /// Fills router `index`'s conntrack index from a dump of its
    /// namespace's entries carrying a slot, made after `missed_before`
    /// was read (`ct_index_missed`).
    pub fn ct_seed(&mut self, index: RouterIndex, dumped: &[(conntrack::Entry, u16)], missed_before: u64) -> Result<()> {
        match &mut self.ctindex {
            Some(ix) => ix.seed(index, dumped, missed_before),
            None => Ok(()),
        }
    }

    /// Drops what the conntrack index holds of `slot` of router `index`
    /// (gone, once the slot was deleted by mark).
    pub fn ct_forget_slot(&mut self, index: RouterIndex, slot: u16) {
        if let Some(ix) = &mut self.ctindex {
            ix.forget_slot(index, slot);
        }
    }

    /// Drops `entries` of router `index` from the conntrack index (deleted).
    pub fn ct_forget(&mut self, index: RouterIndex, entries: &[conntrack::Entry]) {
        if let Some(ix) = &mut self.ctindex {
            ix.forget(index, entries);
        }
    }

    /// Takes the conntrack index's program off router `index`'s namespace,
    /// which has no slot in use (see `CtIndex::park`); the next rule of
    /// the router attaches it again before it goes in.
    pub fn ct_park(&mut self, index: RouterIndex) -> bool {
        self.ctindex.as_mut().is_some_and(|ix| ix.park(index))
    }

    /// Before a rule of router `index` goes in: its conntrack index watches
    /// (a parked router's program is attached again).
    fn watch(&mut self, index: RouterIndex) {
        if let Some(ix) = &mut self.ctindex
            && let Err(e) = ix.watch(index)
        {
            tracing::warn!(router = index, "{e:#}");
        }
    }

    /// Connections carrying slots of router `index` may outlive it in its
    /// namespace (a flush failed, or it is an orphan): a router added there
    /// later fills its conntrack index from a walk.
    pub fn ct_leftovers(&mut self, index: RouterIndex) {
        if let Some(ix) = &mut self.ctindex {
            ix.leftovers(index);
        }
    }

    /// Whether the conntrack index runs (it could be loaded).
    pub fn ct_index_runs(&self) -> bool {
        self.ctindex.is_some()
    }

    /// Entries that found no room in the conntrack index, all routers, if
    /// it runs.
    pub fn ct_index_missed(&self) -> Option<u64> {
        self.ctindex.as_ref().map(|ix| ix.missed())
    }

    /// tcx: pinned links, one per (interface, program); pins of interfaces
    /// that are gone are removed, missing ones attached.
    fn sync_tcx(&mut self, ns: &Path, index: RouterIndex, current: &[(String, u32)]) -> Result<LinkChanges> {
        let dir = self.link_dir(index);
        let mut changes = LinkChanges::default();
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if stale_pin(&path, current) {
                std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
                changes.detached += 1;
            }
        }
        let mut missing = Vec::new();
        for ((iface, idx, name, kind), stale) in tcx_unattached(&self.link_dir(index), ns, current)? {
            if stale {
                // Pinned, but the kernel no longer runs it there.
                let path = dir.join(pin_name(idx, name));
                std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
                changes.detached += 1;
            }
            missing.push((iface, idx, name, kind));
        }
        // Links in place that must run this build's programs.
        let intact: Vec<(u32, &'static str)> = if self.replace_programs {
            current
                .iter()
                .flat_map(|(_, idx)| PROGRAMS_AND_HOOKS.into_iter().map(move |(name, _)| (*idx, name)))
                .filter(|(idx, name)| !missing.iter().any(|(_, i, n, _)| i == idx && n == name))
                .collect()
        } else {
            Vec::new()
        };
        if missing.is_empty() && intact.is_empty() {
            return Ok(changes);
        }
        let mut programs = self.loader.instance(index)?;
        for (idx, name) in intact {
            let path = dir.join(pin_name(idx, name));
            let link = FdLink::from(aya::programs::links::PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?);
            let link = aya::programs::tc::SchedClassifierLink::try_from(link).with_context(|| format!("{} is not a tcx link", path.display()))?;
            let prog: &mut SchedClassifier = programs.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?;
            let id = prog.attach_to_link(link).with_context(|| format!("replacing the program of {}", path.display()))?;
            // The pin keeps the link; this descriptor is not needed.
            drop(prog.take_link(id)?);
            changes.replaced += 1;
        }
        if missing.is_empty() {
            return Ok(changes);
        }
        let ebpf = &mut programs;
        let links = netns::run_in(ns, || {
            let mut links = Vec::new();
            for (iface, idx, name, kind) in &missing {
                let prog: &mut SchedClassifier =
                    ebpf.program_mut(name).ok_or_else(|| anyhow!("no program {name}"))?.try_into()?;
                let id = prog.attach(iface, *kind).with_context(|| format!("attaching {name} to {iface} ({kind:?})"))?;
                links.push((*idx, *name, prog.take_link(id)?));
            }
            Ok(links)
        })?;
        for (idx, name, link) in links {
            changes.attached += 1;
            let link: FdLink = link.try_into().context("tcx link")?;
            let path = dir.join(pin_name(idx, name));
            link.pin(&path).with_context(|| format!("pinning {}", path.display()))?;
        }
        Ok(changes)
    }

    /// Detaches router `index` everywhere: its pins go, so do its tcx
    /// links; netlink filters are removed from the interfaces of `ns` (they
    /// vanish with the namespace anyway).
    pub fn detach_router(&mut self, index: RouterIndex, ns: Option<&Path>) -> Result<()> {
        let _ = self.routers.remove(&index);
        if let Some(ix) = &mut self.ctindex {
            ix.forget_router(index);
        }
        let dir = self.link_dir(index);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("unpinning {}", dir.display()))?;
        }
        if let (AttachMode::Netlink, Some(ns)) = (self.mode, ns)
            && ns.exists()
        {
            netns::run_in(ns, || {
                let hooks = attach::Hooks::open()?;
                for (iface, idx) in netns::interfaces()? {
                    hooks.detach((&iface, idx))?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// The check of router `index`'s attachments in `ns`, to run without
    /// the daemon's lock (it needs nothing of the datapath).
    pub fn link_check(&self, ns: &Path, index: RouterIndex) -> LinkCheck {
        LinkCheck { mode: self.mode, ns: ns.to_path_buf(), dir: self.link_dir(index) }
    }

    /// Removes every map entry of router `index`: rules, counters,
    /// revoked flows.
    pub fn forget_router_state(&mut self, index: RouterIndex) {
        let rules: Vec<RuleKey> = self.rules.keys().filter_map(|k| k.ok()).filter(|k| k.router == index).collect();
        for k in rules {
            if self.rules.remove(&k).is_ok() {
                self.filter.remove(&k);
            }
        }
        self.counters.forget_router(index);
        let flows: Vec<FlowKey> = self.revoked.keys().filter_map(|k| k.ok()).filter(|k| k.router == index).collect();
        for k in flows {
            let _ = self.revoked.remove(&k);
        }
        self.revoked_per_router.remove(&index);
        self.revoked_slots.retain(|k| k.router != index);
        let _ = self.routers.remove(&index);
        if let Some(ix) = &mut self.ctindex {
            ix.forget_router(index);
        }
    }

    /// Removes every pin: links (so every attachment goes) and maps.
    pub fn unpin_all(&mut self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("removing {}", self.dir.display()))
    }

    /// Router indexes that have pinned links (to find orphans).
    pub fn pinned_routers(&self) -> Vec<RouterIndex> {
        std::fs::read_dir(self.dir.join("routers"))
            .map(|rd| rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Allows (router, protocol, port) with `helper` under rule `slot`:
    /// counters first, then the rule, so a tagged packet always finds its
    /// slot's counters. (The rule is what makes its slot live.)
    pub fn allow(&mut self, router: RouterIndex, proto: u8, port: u16, helper: u8, slot: u16) -> Result<()> {
        let counter = self.counters.take(SlotKey::new(router, slot as u32), 0)?;
        let rule = RuleKey::new(router, proto, port);
        let value = RuleValue { counter, ..RuleValue::new(slot, helper) };
        self.watch(router);
        // The rule's bit is set before the rule goes in, so its first packet
        // is looked up. A rule already there (found by the insert itself,
        // with no lookup first) is replaced and its bit stays counted once.
        self.filter.add(&rule);
        let inserted = match insert_waiting(&mut self.rules, rule, value, BPF_NOEXIST) {
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                self.filter.remove(&rule);
                return self.rules.insert(rule, value, 0).context("replacing rule");
            }
            other => other,
        };
        if inserted.is_err() {
            self.filter.remove(&rule);
        }
        inserted.context("inserting rule (is the rules map full? see max_rules)")
    }

    /// Takes a rule out of the maps: the next packet of its tuple is not
    /// tagged. Its connections are cut by the revocation that calls this,
    /// through the revoked-flows map (`remember_revoked`).
    pub fn revoke(&mut self, router: RouterIndex, proto: u8, port: u16) -> Result<()> {
        let rule = RuleKey::new(router, proto, port);
        if remove_if_present(&mut self.rules, &rule)? {
            self.filter.remove(&rule);
        }
        Ok(())
    }

    /// Packets the rule in `slot` has tagged since it was allowed (an error
    /// if its counters are not there).
    pub fn tagged(&self, router: RouterIndex, slot: u16) -> Result<u64> {
        self.counters.tagged(&SlotKey::new(router, slot as u32)).ok_or_else(|| anyhow!("slot {slot} of router {router} has no counters"))
    }

    /// A check of the maps against `want`, to run without the daemon's
    /// lock.
    pub fn map_check(&self, want: Desired) -> MapCheck {
        MapCheck { want, revoked_slots: self.revoked_slots.clone(), dir: self.dir.clone() }
    }

    /// Whether the entries a check without the lock found different
    /// (`found`) still differ from `want`. A change the daemon made while
    /// that check ran shows there as drift, and is in line by now: only
    /// those entries are read again, where a whole check under the lock
    /// held every request back (about 200 ms at 100,000 rules).
    pub fn still_drifts(&self, want: &Desired, found: &MapFindings) -> Result<bool> {
        for k in &found.rules {
            let wanted = want.rules.get(k).map(|v| RuleValue {
                counter: self.counters.get(&SlotKey::new(k.router, v.slot as u32)).unwrap_or(UNCOUNTED),
                ..*v
            });
            if lookup(&self.rules, k)? != wanted {
                return Ok(true);
            }
        }
        for r in &found.routers {
            if lookup(&self.routers, r)? != want.routers.get(r).map(|id| RouterValue { id: *id.as_bytes() }) {
                return Ok(true);
            }
        }
        let routers: HashSet<RouterIndex> = found.counters.iter().map(|(k, _)| k.router).collect();
        let live: HashSet<SlotKey> =
            want.rules.iter().filter(|(k, _)| routers.contains(&k.router)).map(|(k, v)| SlotKey::new(k.router, v.slot as u32)).collect();
        for (key, seen_at) in &found.counters {
            let counted = live.contains(key) || self.revoked_slots.contains(key) || want.quarantined.contains(&(key.router, key.slot as u16));
            let mut held = false;
            for i in [self.counters.get(key), *seen_at].into_iter().flatten() {
                match self.counters.holds(i, key) {
                    Some(h) => held |= h,
                    // An entry the daemon does not map cannot be read again.
                    None => return Ok(true),
                }
            }
            if held != counted {
                return Ok(true);
            }
        }
        if !found.words.is_empty() {
            let wanted = filter::Wanted::of(want.rules.keys().copied());
            // As in a whole check, only words a rule needs are compared.
            if found.words.iter().any(|&w| wanted.word(w) != 0 && wanted.word(w) != self.filter.word(w)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Brings the maps in line with `want`; with `apply` false only counts
    /// the differences (drift). Adds in the order a packet needs them
    /// (counters, rules) and removes in the reverse order.
    pub fn reconcile(&mut self, want: &Desired, apply: bool) -> Result<MapDrift> {
        // The counters array says which entries are taken; the daemon's
        // table follows it.
        self.counters.adopt(&counters::scan(self.counters.map())?)?;
        let maps = Maps { rules: &self.rules, counters: self.counters.owners(), routers: &self.routers };
        let plan = Plan::of(want, &self.revoked_slots, maps, |word| self.filter.word(word))?;
        let Plan { drift, live, counters_add, counters_del, rules_add, rules_del, routers_add, routers_del, wanted_bits, .. } = plan;
        if !apply {
            return Ok(drift);
        }
        if drift.is_empty() {
            self.filter.recount(wanted_bits);
            return Ok(drift);
        }
        for key in counters_add {
            // What the slot tagged before is unknown (its counters were
            // lost, or kept by an earlier release in another map): counted
            // as having tagged, so that its delete cleans conntrack.
            let tagged = u64::from(live.contains(&key));
            self.counters.take(key, tagged)?;
        }
        // The bits of the rules to come are set first, and those of the
        // rules that go cleared only once they are gone.
        self.filter.rebuild(want.rules.keys().chain(rules_del.iter()).copied());
        for router in rules_add.iter().map(|(k, _)| k.router).collect::<HashSet<_>>() {
            self.watch(router);
        }
        for (k, mut v) in rules_add {
            if v.counter == UNCOUNTED {
                v.counter = self.counters.get(&SlotKey::new(k.router, v.slot as u32)).unwrap_or(NO_COUNTER);
            }
            self.rules.insert(k, v, 0)?;
        }
        for (k, v) in routers_add {
            self.routers.insert(k, v, 0)?;
        }
        for k in rules_del {
            remove_if_present(&mut self.rules, &k)?;
        }
        self.filter.rebuild(want.rules.keys().copied());
        for k in counters_del {
            self.counters.forget(&k);
        }
        for k in routers_del {
            remove_if_present(&mut self.routers, &k)?;
        }
        Ok(drift)
    }

    /// Keeps the flows of revoked conntrack entries dead in the datapath
    /// (both directions), until each has been quiet for the quiet time or
    /// its lifetime ends. A router past its share, or a full map, refuses
    /// the rest: counted, never evicting another entry.
    pub fn remember_revoked(&mut self, router: RouterIndex, slot: u16, entries: &[conntrack::Entry]) -> Result<Remembered> {
        let now = monotonic_ns()?;
        let counter = self.counters.get(&SlotKey::new(router, slot as u32)).unwrap_or(NO_COUNTER);
        let value = RevokedFlow { last_seen_ns: now, expires_ns: now.saturating_add(self.revoked_policy.lifetime_ns), slot: slot as u32, counter };
        let mut done = Remembered::default();
        let share = self.revoked_policy.per_router as usize;
        for e in entries {
            for t in [e.orig, e.reply] {
                let held = self.revoked_per_router.entry(router).or_default();
                if *held >= share {
                    done.overflowed += 1;
                    continue;
                }
                match self.revoked.insert(revoked_key(router, &t), value, 0) {
                    Ok(()) => {
                        *held += 1;
                        done.kept += 1;
                    }
                    Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => done.overflowed += 1,
                    Err(e) => return Err(e).context("remembering a revoked flow"),
                }
            }
        }
        self.revoked_overflows += done.overflowed as u64;
        if done.kept > 0 {
            self.revoked_slots.insert(SlotKey::new(router, slot as u32));
            self.revoked_active.set(0, 1, 0).context("activating the revoked-flows check")?;
        }
        Ok(done)
    }

    /// Lets the flows of `entries` pass again (remembered for a revocation
    /// that did not happen).
    pub fn forget_revoked<'a>(&mut self, router: RouterIndex, entries: impl Iterator<Item = &'a conntrack::Entry>) {
        let mut gone = 0;
        for e in entries {
            for t in [e.orig, e.reply] {
                gone += usize::from(self.revoked.remove(&revoked_key(router, &t)).is_ok());
            }
        }
        if let Some(n) = self.revoked_per_router.get_mut(&router) {
            *n = n.saturating_sub(gone);
        }
    }

    /// Lets the revoked flows of (router, protocol, port) pass again: a rule
    /// for that tuple was created again, and its flows are wanted. Returns
    /// how many directions were forgotten.
    pub fn clear_revoked(&mut self, router: RouterIndex, proto: u8, port: u16) -> usize {
        // The count is never below what the map holds (see `load`), so a
        // router without revoked flows costs no walk of the map.
        if self.revoked_per_router.get(&router).is_none_or(|n| *n == 0) {
            return 0;
        }
        let keys: Vec<FlowKey> = self
            .revoked
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.router == router && k.proto == proto && (k.dport == port || k.sport == port))
            .collect();
        let gone = keys.iter().filter(|k| self.revoked.remove(k).is_ok()).count();
        if let Some(n) = self.revoked_per_router.get_mut(&router) {
            *n = n.saturating_sub(gone);
        }
        gone
    }

    /// Forgets revoked flows that have been quiet for the quiet time or
    /// outlived their lifetime (the datapath forgets them lazily, on their
    /// next packet; one that never sends again would stay). Returns the
    /// slots still referenced.
    pub fn sweep_revoked(&mut self) -> Result<HashSet<SlotKey>> {
        let now = monotonic_ns()?;
        let mut referenced = HashSet::new();
        let mut per_router: StdHashMap<RouterIndex, usize> = StdHashMap::new();
        let entries: Vec<(FlowKey, RevokedFlow)> = self.revoked.iter().filter_map(|e| e.ok()).collect();
        for (k, v) in entries {
            if now.saturating_sub(v.last_seen_ns) > self.revoked_policy.quiet_ns || now > v.expires_ns {
                let _ = self.revoked.remove(&k);
            } else {
                referenced.insert(SlotKey::new(k.router, v.slot));
                *per_router.entry(k.router).or_default() += 1;
            }
        }
        // Entries are only added under the daemon's lock, so none can appear
        // between this check and the write.
        let active = u32::from(!per_router.is_empty());
        self.revoked_per_router = per_router;
        self.revoked_slots = referenced.clone();
        self.revoked_active.set(0, active, 0)?;
        Ok(referenced)
    }

    /// Revoked flows refused since start (share or map full).
    pub fn revoked_overflows(&self) -> u64 {
        self.revoked_overflows
    }

    /// Number of revoked flows the datapath still keeps dead (a walk of
    /// the whole map).
    pub fn revoked_flows(&self) -> usize {
        self.revoked.keys().filter(|k| k.is_ok()).count()
    }

    /// The same as of the last sweep (at most a second old; a flow that
    /// went quiet since may still be counted), without walking the map.
    pub fn revoked_flows_swept(&self) -> usize {
        self.revoked_per_router.values().sum()
    }

    /// Drops the counters of a slot that will never be seen again.
    pub fn forget_slot(&mut self, router: RouterIndex, slot: u16) {
        self.counters.forget(&SlotKey::new(router, slot as u32));
    }
}

/// How a router's attachments compare with what its namespace has now.
pub struct LinkCheck {
    mode: AttachMode,
    ns: PathBuf,
    /// Where its tcx links are pinned.
    dir: PathBuf,
}

impl LinkCheck {
    /// (missing, stale) attachments, asked of the kernel, changing nothing.
    pub fn drift(&self) -> Result<(usize, usize)> {
        if self.mode == AttachMode::Netlink {
            // Filters go with their interface: none can be stale.
            return netns::run_in(&self.ns, || {
                let hooks = attach::Hooks::open()?;
                let mut missing = 0;
                for (iface, idx) in netns::interfaces()? {
                    missing += hooks.missing((&iface, idx))?;
                }
                Ok((missing, 0))
            });
        }
        let current = netns::run_in(&self.ns, netns::interfaces)?;
        let stale = std::fs::read_dir(&self.dir)
            .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| stale_pin(&e.path(), &current)).count())
            .unwrap_or_default();
        let unattached = tcx_unattached(&self.dir, &self.ns, &current)?;
        Ok((unattached.len(), stale + unattached.iter().filter(|(_, stale)| *stale).count()))
    }
}

/// The (interface, program) pairs of `current` that the kernel does not
/// run: no pin, or (stale = true) a pin whose link is no longer attached
/// there (detached from outside, or left defunct by an interface that
/// was replaced under the same index). Asked of the kernel, not of the
/// pins.
fn tcx_unattached(dir: &Path, ns: &Path, current: &[(String, u32)]) -> Result<Vec<(Hook, bool)>> {
    let wanted: Vec<(String, u32, &'static str, TcAttachType, Option<u32>)> = current
        .iter()
        .flat_map(|(name, idx)| PROGRAMS_AND_HOOKS.into_iter().map(move |(prog, kind)| (name.clone(), *idx, prog, kind)))
        .map(|(name, idx, prog, kind)| {
            let pinned = aya::programs::links::PinnedLink::from_pin(dir.join(pin_name(idx, prog)))
                .ok()
                .and_then(|link| FdLink::from(link).info().ok())
                .map(|info| info.program_id());
            (name, idx, prog, kind, pinned)
        })
        .collect();
    let running: Vec<Vec<u32>> = netns::run_in(ns, || {
        Ok(wanted
            .iter()
            .map(|(iface, _, _, kind, _)| {
                SchedClassifier::query_tcx(iface, *kind).map(|(_, progs)| progs.iter().map(|p| p.id()).collect()).unwrap_or_default()
            })
            .collect())
    })?;
    Ok(wanted
        .into_iter()
        .zip(running)
        .filter(|((.., pinned), running)| !pinned.is_some_and(|id| running.contains(&id)))
        .map(|((iface, idx, prog, kind, pinned), _)| ((iface, idx, prog, kind), pinned.is_some()))
        .collect())
}

/// Kernel memory of the maps pinned in `dir` (their memlock, in bytes).
pub fn map_memory(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for name in [MAP_RULES, MAP_COUNTERS, MAP_ROUTERS, MAP_REVOKED] {
        let map = MapData::from_pin(dir.join(name))?;
        use std::os::fd::{AsFd, AsRawFd};
        let fd = map.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        total += info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(total)
}

/// The rule set the maps should hold.
#[derive(Debug, Default, Clone)]
pub struct Desired {
    pub routers: std::collections::HashMap<RouterIndex, uuid::Uuid>,
    pub rules: std::collections::HashMap<RuleKey, RuleValue>,
    /// Revoked slots whose counters are still of interest.
    pub quarantined: Vec<(RouterIndex, u16)>,
}

/// The maps a check compares with the store: the counters as the entry
/// each counted slot has.
struct Maps<'a> {
    rules: &'a HashMap<MapData, RuleKey, RuleValue>,
    counters: &'a StdHashMap<SlotKey, u32>,
    routers: &'a HashMap<MapData, RouterIndex, RouterValue>,
}

/// A wanted rule's counter while its slot has no entry yet: never what a
/// map holds, so the rule is written once the entry is taken.
const UNCOUNTED: u32 = u32::MAX;

/// How the maps differ from what is wanted, and what would bring them in
/// line.
struct Plan {
    drift: MapDrift,
    /// Slots with a rule.
    live: HashSet<SlotKey>,
    counters_add: Vec<SlotKey>,
    counters_del: Vec<SlotKey>,
    rules_add: Vec<(RuleKey, RuleValue)>,
    rules_del: Vec<RuleKey>,
    routers_add: Vec<(RouterIndex, RouterValue)>,
    routers_del: Vec<RouterIndex>,
    wanted_bits: filter::Wanted,
    /// Filter words needed whose value differs.
    words_off: Vec<u32>,
}

impl Plan {
    /// Compares `maps`, and the rule filter's words (`word`), with `want`
    /// and the slots revoked flows name (`revoked_slots`).
    fn of(want: &Desired, revoked_slots: &HashSet<SlotKey>, maps: Maps, word: impl Fn(u32) -> u64) -> Result<Self> {
        let live: HashSet<SlotKey> = want.rules.iter().map(|(k, v)| SlotKey::new(k.router, v.slot as u32)).collect();
        let want_routers: StdHashMap<RouterIndex, RouterValue> =
            want.routers.iter().map(|(i, id)| (*i, RouterValue { id: *id.as_bytes() })).collect();
        // Counters are kept for live and quarantined slots and for slots that
        // revoked flows name; their values are statistics, so only presence
        // is compared.
        let counted: HashSet<SlotKey> = live
            .iter()
            .copied()
            .chain(want.quarantined.iter().map(|(r, s)| SlotKey::new(*r, *s as u32)))
            .chain(revoked_slots.iter().copied())
            .collect();
        let counters_add: Vec<SlotKey> = counted.iter().filter(|k| !maps.counters.contains_key(k)).copied().collect();
        let counters_del: Vec<SlotKey> = maps.counters.keys().filter(|k| !counted.contains(k)).copied().collect();
        // Each rule names its slot's entry.
        let want_rules: StdHashMap<RuleKey, RuleValue> = want
            .rules
            .iter()
            .map(|(k, v)| {
                let counter = maps.counters.get(&SlotKey::new(k.router, v.slot as u32)).copied().unwrap_or(UNCOUNTED);
                (*k, RuleValue { counter, ..*v })
            })
            .collect();
        let (rules_add, rules_del) = diff(maps.rules, &want_rules)?;
        let (routers_add, routers_del) = diff(maps.routers, &want_routers)?;
        let wanted_bits = filter::Wanted::of(want.rules.keys().copied());
        let words_off = wanted_bits.differing(word);
        let drift = MapDrift {
            rules_added: rules_add.len(),
            rules_removed: rules_del.len(),
            counters_added: counters_add.len(),
            counters_removed: counters_del.len(),
            routers_added: routers_add.len(),
            routers_removed: routers_del.len(),
            filter_fixed: words_off.len(),
        };
        Ok(Self { drift, live, counters_add, counters_del, rules_add, rules_del, routers_add, routers_del, wanted_bits, words_off })
    }
}

/// A check of the maps against the store, taken under the daemon's lock
/// (`Datapath::map_check`) and run without it: at 100,000 rules it reads
/// and compares for about 200 ms, which held every request back while it
/// ran under the lock. The entries it finds different are read again
/// under the lock (`Datapath::still_drifts`), as a change made meanwhile
/// shows as drift; only one still different has the maps checked whole,
/// and repaired (`reconcile`).
pub struct MapCheck {
    want: Desired,
    revoked_slots: HashSet<SlotKey>,
    dir: PathBuf,
}

impl MapCheck {
    /// How the pinned maps differ from what was wanted when it was taken.
    pub fn run(self) -> Result<MapFindings> {
        fn open<K: aya::Pod, V: aya::Pod>(dir: &Path, name: &str) -> Result<HashMap<MapData, K, V>> {
            let data = MapData::from_pin(dir.join(name)).with_context(|| format!("opening map {name}"))?;
            Ok(HashMap::try_from(aya::maps::Map::HashMap(data))?)
        }
        let rules = open(&self.dir, MAP_RULES)?;
        let counters = MapData::from_pin(self.dir.join(MAP_COUNTERS)).context("opening the counters map")?;
        let counters = counters::owners(&counters::scan(&counters)?);
        let routers = open(&self.dir, MAP_ROUTERS)?;
        let filter = MapData::from_pin(self.dir.join(enforcer_common::MAP_RULE_FILTER)).context("opening the rule filter")?;
        let words = filter::Words::open(filter)?;
        let maps = Maps { rules: &rules, counters: &counters, routers: &routers };
        let plan = Plan::of(&self.want, &self.revoked_slots, maps, |w| words.word(w))?;
        Ok(MapFindings {
            drift: plan.drift,
            rules: plan.rules_add.iter().map(|(k, _)| *k).chain(plan.rules_del).collect(),
            counters: plan.counters_add.into_iter().chain(plan.counters_del).map(|k| (k, counters.get(&k).copied())).collect(),
            routers: plan.routers_add.iter().map(|(k, _)| *k).chain(plan.routers_del).collect(),
            words: plan.words_off,
        })
    }
}

/// What a check without the lock found different: the drift, and the
/// entries behind it, looked at again under the lock
/// (`Datapath::still_drifts`).
#[derive(Debug, Default)]
pub struct MapFindings {
    pub drift: MapDrift,
    rules: Vec<RuleKey>,
    /// With the entry the scan found counting the slot, if one did.
    counters: Vec<(SlotKey, Option<u32>)>,
    routers: Vec<RouterIndex>,
    words: Vec<u32>,
}

fn monotonic_ns() -> Result<u64> {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)?;
    Ok(t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
}

/// The revoked-flows key of one direction of a connection: its flow as the
/// datapath parses a packet of it (a GRE packet names one call ID).
fn revoked_key(router: RouterIndex, t: &conntrack::Tuple5) -> FlowKey {
    let (sport, dport) = enforcer_common::flow_ports(t.proto, t.sport, t.dport);
    FlowKey { sport, dport, ..flow_key(router, t) }
}

/// The conntrack index's key of one direction of a connection: its whole
/// tuple, which names the entry for a delete.
fn flow_key(router: RouterIndex, t: &conntrack::Tuple5) -> FlowKey {
    fn words(ip: std::net::IpAddr) -> (u8, [u32; 4]) {
        let mut w = [0u32; 4];
        match ip {
            std::net::IpAddr::V4(a) => {
                w[0] = u32::from_ne_bytes(a.octets());
                (4, w)
            }
            std::net::IpAddr::V6(a) => {
                for (i, c) in a.octets().chunks(4).enumerate() {
                    w[i] = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
                }
                (6, w)
            }
        }
    }
    let (family, src) = words(t.src);
    let (_, dst) = words(t.dst);
    FlowKey { router, sport: t.sport, dport: t.dport, proto: t.proto, family, _pad: [0; 2], src, dst }
}

/// Every entry of `map`: in batches, or key by key where the kernel has
/// no batch lookup.
fn entries<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> Result<Vec<(K, V)>> {
    match batch::read_all(map.map()) {
        Ok(all) => Ok(all),
        Err(_) => Ok(map.iter().collect::<Result<_, _>>()?),
    }
}

/// What a map lacks of the wanted entries (or holds differently), and the
/// keys it holds beyond them.
type MapDiff<K, V> = (Vec<(K, V)>, Vec<K>);

fn diff<K, V>(map: &HashMap<MapData, K, V>, want: &StdHashMap<K, V>) -> Result<MapDiff<K, V>>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let have: StdHashMap<K, V> = entries(map)?.into_iter().collect();
    let add = want.iter().filter(|(k, v)| have.get(k) != Some(v)).map(|(k, v)| (*k, *v)).collect();
    let del = have.into_keys().filter(|k| !want.contains_key(k)).collect();
    Ok((add, del))
}

/// Inserts into a map that is not preallocated, whose entries come from
/// caches the kernel refills in the background: a burst of inserts can
/// find them empty for a moment (ENOMEM) with memory to spare, so it waits
/// a little and tries again.
fn insert_waiting<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: K, value: V, flags: u64) -> Result<(), aya::maps::MapError> {
    let mut wait = std::time::Duration::from_millis(1);
    loop {
        match map.insert(key, value, flags) {
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOMEM) && wait <= std::time::Duration::from_millis(32) => {
                std::thread::sleep(wait);
                wait *= 2;
            }
            other => return other,
        }
    }
}

/// Removes `key`; a key that is already gone is not an error.
/// Whether `key` was there.
/// The value of `key` in `map`, if it has one.
fn lookup<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, key: &K) -> Result<Option<V>> {
    match map.get(key, 0) {
        Err(aya::maps::MapError::KeyNotFound) => Ok(None),
        other => Ok(Some(other?)),
    }
}

fn remove_if_present<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, key: &K) -> Result<bool> {
    match map.remove(key) {
        Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        other => Ok(other.map(|()| true)?),
    }
}

/// The loader of every program instance: one per router, whose `tag` has
/// the router index as a constant and is all that is verified (the shared
/// `classify`, verified at start, does the work: verifying it per router
/// cost each router add about 10 ms). Maps are shared through their pins.
/// Made once, because aya's loader parses the kernel's BTF when it is
/// made: per router add that cost 10 ms more and megabytes of churn.
struct Loader(EbpfLoader<'static>);

impl Loader {
    fn new(dir: &Path, layout: MarkLayout, max_rules: u32, revoked: RevokedPolicy) -> Self {
        // The loader keeps references to the values of its globals: these
        // live as long as the process (one loader per datapath).
        let layout: &'static MarkLayout = Box::leak(Box::new(layout));
        let quiet: &'static u64 = Box::leak(Box::new(revoked.quiet_ns));
        let mut loader = EbpfLoader::new();
        loader
            .default_map_pin_directory(dir)
            .override_global(GLOBAL_MARK_LAYOUT, layout, true)
            .override_global(GLOBAL_QUIET_NS, quiet, true)
            .map_max_entries(MAP_RULES, max_rules)
            .map_max_entries(MAP_COUNTERS, enforcer_common::counters_capacity(max_rules))
            .map_max_entries(MAP_REVOKED, revoked.capacity)
            // One log for every router's programs, read by the daemon.
            .map_pin_path(enforcer_common::MAP_LOGS, dir.join(enforcer_common::MAP_LOGS));
        Self(loader)
    }

    /// The programs of router `index`, verified.
    fn instance(&mut self, index: RouterIndex) -> Result<Ebpf> {
        if PROGRAMS.is_empty() {
            anyhow::bail!("this binary was built with AYA_BUILD_SKIP set and carries no eBPF programs: build it again without that variable");
        }
        let mut ebpf = self
            .0
            .override_global(GLOBAL_ROUTER, interned(index), true)
            .load(PROGRAMS)
            .context("loading the eBPF object (needs root or CAP_BPF + CAP_NET_ADMIN)")?;
        for (name, _) in PROGRAMS_AND_HOOKS {
            let prog: &mut SchedClassifier =
                ebpf.program_mut(name).ok_or_else(|| anyhow!("program {name} missing from the object"))?.try_into()?;
            prog.load().with_context(|| format!("verifying program {name}"))?;
        }
        Ok(ebpf)
    }
}

/// What the programs write with aya-log, read from the ring buffer they all
/// share.
pub type DatapathLog = aya_log::EbpfLogger<Forward>;

/// Passes the programs' records to the daemon's log (tracing), under the
/// target `datapath`.
pub struct Forward;

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        tracing::info!(target: "datapath", "{}", record.args());
    }

    fn flush(&self) {}
}

/// A router index that lives as long as the process, for the loader: each
/// distinct index is kept once (4 bytes each; indexes are reused, lowest
/// first, so they are bounded by the routers a host has at once).
fn interned(index: RouterIndex) -> &'static RouterIndex {
    static INDEXES: std::sync::Mutex<std::collections::BTreeMap<RouterIndex, &'static RouterIndex>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let mut indexes = INDEXES.lock().unwrap_or_else(|p| p.into_inner());
    indexes.entry(index).or_insert_with(|| Box::leak(Box::new(index)))
}


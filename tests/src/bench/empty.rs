//! `baseline_empty` on maps of its own, attached with tcx: what being on a
//! tc hook costs a packet, and what the kernel alone takes to attach there.

use std::path::{Path, PathBuf};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, tc::{SchedClassifierLink, TcAttachOptions}};

pub struct EmptyProgram {
    pins: PathBuf,
    ebpf: aya::Ebpf,
    _datapath: enforcer::kernel::Datapath,
}

impl EmptyProgram {
    /// Loads and verifies the empty program, its maps pinned in a
    /// directory of this run's own.
    pub fn load() -> Self {
        let pins = PathBuf::from("/sys/fs/bpf").join(crate::unique("empty"));
        let datapath = enforcer::kernel::Datapath::load(&pins, enforcer_common::MarkLayout::DEFAULT, 1_000, Default::default()).expect("maps");
        let ebpf = aya::EbpfLoader::new().default_map_pin_directory(&pins).load(enforcer::kernel::PROGRAMS).expect("programs");
        let mut empty = Self { pins, ebpf, _datapath: datapath };
        empty.program().load().expect("verifying the empty program");
        empty
    }

    fn program(&mut self) -> &mut SchedClassifier {
        self.ebpf.program_mut(enforcer_common::PROG_BASELINE_EMPTY).expect("baseline").try_into().expect("classifier")
    }

    /// Attaches it last on the ingress of `iface` in the namespace at `ns`,
    /// with tcx, as enforcer attaches its `tag`; the link lives as long as
    /// what is returned.
    pub fn attach(&mut self, ns: &Path, iface: &str) -> SchedClassifierLink {
        let prog = self.program();
        enforcer::kernel::netns::run_in(ns, || {
            let id = prog.attach_with_options(iface, TcAttachType::Ingress, TcAttachOptions::TcxOrder(LinkOrder::last()))?;
            Ok(prog.take_link(id)?)
        })
        .expect("attaching the empty program")
    }
}

impl Drop for EmptyProgram {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.pins);
    }
}

//! The seccomp policy as data (a deny-list, SANDBOX.md §3 D) and its compilation to BPF with
//! `seccompiler`. Three stacked filters: the deny-list (EPERM), `clone3` -> ENOSYS (so libc
//! falls back to `clone`, whose flags the deny-list inspects) and, on x86_64, x32-ABI syscall
//! numbers -> ENOSYS (they would otherwise bypass number-keyed rules).

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// A comparison on one syscall argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgCheck {
    /// Low 32 bits of the argument equal the value (ioctl requests: CVE-2019-10063).
    Eq32(u8, u64),
    /// Low 32 bits of the argument differ from the value.
    Ne32(u8, u64),
    /// All bits of the mask are set in the 64-bit argument.
    HasBits(u8, u64),
}

/// One denied syscall: denied always (`when` empty) or when any conjunction in `when` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DenyRule {
    pub name: &'static str,
    pub nr: i64,
    pub when: Vec<Vec<ArgCheck>>,
}

const CLONE_NEW_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWCGROUP as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
];

/// `TIOCSTI` and `TIOCLINUX` ioctl requests.
pub const TIOCSTI: u64 = 0x5412;
pub const TIOCLINUX: u64 = 0x541C;
/// `personality()` values that are allowed: PER_LINUX, PER_LINUX32 and the query value.
pub const SAFE_PERSONALITIES: [u64; 3] = [0, 0x0008, 0xffff_ffff];
/// AF_VSOCK.
pub const AF_VSOCK: u64 = 40;

macro_rules! always {
    ($($n:ident),* $(,)?) => {
        vec![$(DenyRule { name: stringify!($n), nr: paste_nr!($n), when: vec![] }),*]
    };
}
macro_rules! paste_nr {
    (ptrace) => {
        libc::SYS_ptrace
    };
    (mount) => {
        libc::SYS_mount
    };
    (umount2) => {
        libc::SYS_umount2
    };
    (pivot_root) => {
        libc::SYS_pivot_root
    };
    (chroot) => {
        libc::SYS_chroot
    };
    (unshare) => {
        libc::SYS_unshare
    };
    (setns) => {
        libc::SYS_setns
    };
    (keyctl) => {
        libc::SYS_keyctl
    };
    (add_key) => {
        libc::SYS_add_key
    };
    (request_key) => {
        libc::SYS_request_key
    };
    (bpf) => {
        libc::SYS_bpf
    };
    (perf_event_open) => {
        libc::SYS_perf_event_open
    };
    (userfaultfd) => {
        libc::SYS_userfaultfd
    };
    (kexec_load) => {
        libc::SYS_kexec_load
    };
    (kexec_file_load) => {
        libc::SYS_kexec_file_load
    };
    (init_module) => {
        libc::SYS_init_module
    };
    (finit_module) => {
        libc::SYS_finit_module
    };
    (delete_module) => {
        libc::SYS_delete_module
    };
    (open_by_handle_at) => {
        libc::SYS_open_by_handle_at
    };
    (name_to_handle_at) => {
        libc::SYS_name_to_handle_at
    };
    (process_vm_readv) => {
        libc::SYS_process_vm_readv
    };
    (process_vm_writev) => {
        libc::SYS_process_vm_writev
    };
    (io_uring_setup) => {
        libc::SYS_io_uring_setup
    };
    (io_uring_enter) => {
        libc::SYS_io_uring_enter
    };
    (io_uring_register) => {
        libc::SYS_io_uring_register
    };
    (fsopen) => {
        libc::SYS_fsopen
    };
    (fsconfig) => {
        libc::SYS_fsconfig
    };
    (fsmount) => {
        libc::SYS_fsmount
    };
    (fspick) => {
        libc::SYS_fspick
    };
    (move_mount) => {
        libc::SYS_move_mount
    };
    (open_tree) => {
        libc::SYS_open_tree
    };
    (mount_setattr) => {
        libc::SYS_mount_setattr
    };
    (swapon) => {
        libc::SYS_swapon
    };
    (swapoff) => {
        libc::SYS_swapoff
    };
    (reboot) => {
        libc::SYS_reboot
    };
    (acct) => {
        libc::SYS_acct
    };
    (quotactl) => {
        libc::SYS_quotactl
    };
    (pidfd_getfd) => {
        libc::SYS_pidfd_getfd
    };
    (inotify_add_watch) => {
        libc::SYS_inotify_add_watch
    };
    (fanotify_init) => {
        libc::SYS_fanotify_init
    };
    (fanotify_mark) => {
        libc::SYS_fanotify_mark
    };
}

/// The deny-list (pure data).
pub fn deny_rules() -> Vec<DenyRule> {
    let mut rules = always!(
        ptrace,
        mount,
        umount2,
        pivot_root,
        chroot,
        unshare,
        setns,
        keyctl,
        add_key,
        request_key,
        bpf,
        perf_event_open,
        userfaultfd,
        kexec_load,
        kexec_file_load,
        init_module,
        finit_module,
        delete_module,
        open_by_handle_at,
        name_to_handle_at,
        process_vm_readv,
        process_vm_writev,
        io_uring_setup,
        io_uring_enter,
        io_uring_register,
        fsopen,
        fsconfig,
        fsmount,
        fspick,
        move_mount,
        open_tree,
        mount_setattr,
        swapon,
        swapoff,
        reboot,
        acct,
        quotactl,
        pidfd_getfd,
        // File-system watches: the read-only image is the host's own inodes, so a watch on
        // /usr/bin would see (with timestamps) which binaries the host and other sandboxes
        // open. Sandboxed code polls its own files instead.
        inotify_add_watch,
        fanotify_init,
        fanotify_mark,
    );
    rules.push(DenyRule {
        name: "clone",
        nr: libc::SYS_clone,
        when: CLONE_NEW_FLAGS
            .iter()
            .map(|&f| vec![ArgCheck::HasBits(0, f)])
            .collect(),
    });
    rules.push(DenyRule {
        name: "ioctl",
        nr: libc::SYS_ioctl,
        when: vec![
            vec![ArgCheck::Eq32(1, TIOCSTI)],
            vec![ArgCheck::Eq32(1, TIOCLINUX)],
        ],
    });
    rules.push(DenyRule {
        name: "personality",
        nr: libc::SYS_personality,
        when: vec![SAFE_PERSONALITIES
            .iter()
            .map(|&p| ArgCheck::Ne32(0, p))
            .collect()],
    });
    rules.push(DenyRule {
        name: "socket",
        nr: libc::SYS_socket,
        when: vec![vec![ArgCheck::Eq32(0, AF_VSOCK)]],
    });
    rules
}

fn arch() -> TargetArch {
    #[cfg(target_arch = "aarch64")]
    return TargetArch::aarch64;
    #[cfg(target_arch = "riscv64")]
    return TargetArch::riscv64;
    #[cfg(not(any(target_arch = "aarch64", target_arch = "riscv64")))]
    TargetArch::x86_64
}

fn condition(c: ArgCheck) -> Result<SeccompCondition, seccompiler::BackendError> {
    match c {
        ArgCheck::Eq32(a, v) => {
            SeccompCondition::new(a, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
        }
        ArgCheck::Ne32(a, v) => {
            SeccompCondition::new(a, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, v)
        }
        ArgCheck::HasBits(a, m) => {
            SeccompCondition::new(a, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(m), m)
        }
    }
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    action: SeccompAction,
) -> Result<BpfProgram, String> {
    let f = SeccompFilter::new(rules, SeccompAction::Allow, action, arch())
        .map_err(|e| e.to_string())?;
    BpfProgram::try_from(f).map_err(|e| e.to_string())
}

/// Compiles the deny-list and the `clone3` filter; plus the x32 filter on x86_64.
pub fn build_filters() -> Result<Vec<BpfProgram>, String> {
    let mut out = vec![compile_deny(deny_rules())?];
    out.extend(tail_filters()?);
    Ok(out)
}

/// The same filters split by who installs them, so a child attaches one tiny filter instead
/// of compiling the whole deny-list again: `init` holds the deny-list without the `clone`
/// rule, the `clone3` filter and the x32 filter, installed once on the init itself after
/// setup and inherited by every process it starts; `child` holds the `clone` rule (the init
/// itself creates pid namespaces), installed by each child before execve. Stacked, they
/// answer every syscall exactly as [`build_filters`] does: the rules are disjoint by syscall
/// number and carry the same actions.
pub struct SplitFilters {
    pub init: Vec<BpfProgram>,
    pub child: Vec<BpfProgram>,
}

/// Builds [`SplitFilters`].
pub fn build_split() -> Result<SplitFilters, String> {
    let (clone, rest): (Vec<_>, Vec<_>) = deny_rules()
        .into_iter()
        .partition(|r| r.nr == libc::SYS_clone);
    let mut init = vec![compile_deny(rest)?];
    init.extend(tail_filters()?);
    Ok(SplitFilters {
        init,
        child: vec![compile_deny(clone)?],
    })
}

fn tail_filters() -> Result<Vec<BpfProgram>, String> {
    let clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let mut out = vec![compile(clone3, SeccompAction::Errno(libc::ENOSYS as u32))?];
    #[cfg(target_arch = "x86_64")]
    out.push(x32_filter());
    Ok(out)
}

fn compile_deny(rules: Vec<DenyRule>) -> Result<BpfProgram, String> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for r in rules {
        let mut chain = Vec::new();
        for conj in &r.when {
            let conds = conj
                .iter()
                .map(|&c| condition(c))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            chain.push(SeccompRule::new(conds).map_err(|e| e.to_string())?);
        }
        map.insert(r.nr, chain);
    }
    compile(map, SeccompAction::Errno(libc::EPERM as u32))
}

/// Rejects syscall numbers with the x32 bit on x86_64 (ENOSYS); everything else passes.
#[cfg(target_arch = "x86_64")]
pub fn x32_filter() -> BpfProgram {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_BIT: u32 = 0x4000_0000;
    let ins = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        ins(LD_W_ABS, 0, 0, 4),
        ins(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        ins(LD_W_ABS, 0, 0, 0),
        ins(JGE_K, 0, 1, X32_BIT),
        ins(RET_K, 0, 0, 0x0005_0000 | libc::ENOSYS as u32),
        ins(RET_K, 0, 0, 0x7fff_0000),
    ]
}

/// Installs the filters on the calling thread (no_new_privs must already be set).
pub fn apply(filters: &[BpfProgram]) -> std::io::Result<()> {
    for f in filters {
        seccompiler::apply_filter(f).map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deny_list_covers_the_required_syscalls() {
        let rules = deny_rules();
        let names: Vec<_> = rules.iter().map(|r| r.name).collect();
        for n in [
            "ptrace",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "unshare",
            "setns",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "kexec_load",
            "init_module",
            "finit_module",
            "open_by_handle_at",
            "process_vm_readv",
            "process_vm_writev",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "clone",
            "ioctl",
            "personality",
            "socket",
        ] {
            assert!(names.contains(&n), "{n} missing");
        }
        assert!(
            !names.contains(&"clone3"),
            "clone3 belongs to the ENOSYS filter"
        );
        let nrs: std::collections::BTreeSet<_> = rules.iter().map(|r| r.nr).collect();
        assert_eq!(nrs.len(), rules.len(), "duplicate syscall numbers");
    }

    #[test]
    fn conditional_rules_use_the_right_comparisons() {
        let rules = deny_rules();
        let get = |n: &str| rules.iter().find(|r| r.name == n).unwrap().clone();
        assert_eq!(
            get("ioctl").when,
            vec![
                vec![ArgCheck::Eq32(1, TIOCSTI)],
                vec![ArgCheck::Eq32(1, TIOCLINUX)]
            ]
        );
        let clone = get("clone");
        assert_eq!(clone.when.len(), 7);
        assert!(clone
            .when
            .contains(&vec![ArgCheck::HasBits(0, libc::CLONE_NEWUSER as u64)]));
        assert_eq!(get("personality").when[0].len(), 3);
        assert!(get("ptrace").when.is_empty());
    }

    #[test]
    fn filters_compile() {
        let f = build_filters().unwrap();
        assert!(f.len() >= 2);
        assert!(f.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }

    #[test]
    fn split_filters_keep_every_rule() {
        let whole = build_filters().unwrap();
        let split = build_split().unwrap();
        // The init carries the same stack minus the clone rule; the child adds that rule only.
        assert_eq!(split.init.len(), whole.len());
        assert_eq!(split.child.len(), 1);
        assert_eq!(split.init[1..], whole[1..]);
        assert!(split.init[0].len() < whole[0].len());
        let nr = |p: &BpfProgram| {
            p.iter()
                .filter(|i| i.code == 0x15 && i.k == libc::SYS_clone as u32)
                .count()
        };
        assert_eq!(
            nr(&split.init[0]),
            0,
            "the init must stay able to clone namespaces"
        );
        assert!(nr(&split.child[0]) >= 1);
        assert!(nr(&whole[0]) >= 1);
    }
}

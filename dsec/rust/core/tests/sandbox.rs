//! Real sandboxes (root required). The test binary doubles as the init: the host side spawns
//! this same executable with DSEC_TEST_INIT=1, which runs the init's entry point instead.

use dsec_core::host::{ExecRequest, InitImage, Sandbox};
use dsec_core::{Error, Policy};

fn image() -> InitImage {
    let exe = std::env::current_exe()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    InitImage::Exe(exe, vec![("DSEC_TEST_INIT".into(), "1".into())])
}

fn sandbox(p: Policy) -> Sandbox {
    Sandbox::new(p, &image()).expect("sandbox")
}

fn sh(sb: &Sandbox, cmd: &str, timeout: Option<f64>) -> dsec_core::ExecOutput {
    let req = ExecRequest {
        argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), cmd.as_bytes().to_vec()],
        timeout,
        ..Default::default()
    };
    sb.exec(&req).expect("exec")
}

fn exec_basics() {
    let sb = sandbox(Policy::default());
    let o = sh(&sb, "echo hi; echo err >&2; exit 3", None);
    assert_eq!(o.exit_code, Some(3));
    assert_eq!(o.stdout, b"hi\n");
    assert_eq!(o.stderr, b"err\n");
    let o = sb
        .exec(&ExecRequest {
            argv: vec![b"true".to_vec()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(o.exit_code, Some(0));
    let o = sb
        .exec(&ExecRequest {
            argv: vec![b"no-such-cmd".to_vec()],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(o.exit_code, Some(127));
    let o = sb
        .exec(&ExecRequest {
            argv: vec![b"cat".to_vec()],
            stdin: Some(b"abc".to_vec()),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(o.stdout, b"abc");
    let o = sh(&sb, "kill -9 $$", None);
    assert_eq!((o.exit_code, o.signal), (None, Some(9)));
    let o = sh(&sb, "pwd; id -u; hostname", None);
    assert_eq!(o.stdout, b"/workspace\n0\nsandbox\n");
}

fn posture() {
    let sb = sandbox(Policy::default());
    let o = sh(&sb, "cat /proc/self/status", None);
    let s = String::from_utf8_lossy(&o.stdout);
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(get("CapEff:"), "0000000000000000");
    assert_eq!(get("CapPrm:"), "0000000000000000");
    assert_eq!(get("CapBnd:"), "0000000000000000");
    assert_eq!(get("NoNewPrivs:"), "1");
    assert_eq!(get("Seccomp:"), "2");
    // The init keeps only the capabilities it needs, inside its own user namespace.
    let init = std::fs::read_to_string(format!("/proc/{}/status", sb.pid())).unwrap();
    let eff = init
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim()
        .to_string();
    assert_eq!(
        u64::from_str_radix(&eff, 16).unwrap(),
        (1 << 21) | (1 << 8) | 0b1110
    );
    let map = std::fs::read_to_string(format!("/proc/{}/uid_map", sb.pid())).unwrap();
    // Root 0 maps to the sandbox's own host uid, leased from uid_range (never host root).
    let host_uid = sb.policy().host_id.to_string();
    assert_eq!(
        map.split_whitespace().collect::<Vec<_>>(),
        ["0", host_uid.as_str(), "1"]
    );
    let (first, count) = sb.policy().uid_range;
    assert!((first..first + count).contains(&sb.policy().host_id));
    for ns in ["user", "pid", "mnt", "net", "ipc", "uts", "cgroup"] {
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        let theirs = std::fs::read_link(format!("/proc/{}/ns/{ns}", sb.pid())).unwrap();
        assert_ne!(ours, theirs, "{ns} namespace is shared");
    }
    let o = sh(
        &sb,
        "touch /usr/x; echo $?; touch /etc/x; echo $?; touch /x; echo $?",
        None,
    );
    assert_eq!(
        o.stdout,
        b"1\n1\n1\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = sh(&sb, "ls /dev | tr '\\n' ' '", None);
    assert_eq!(
        o.stdout,
        b"fd full null random shm stderr stdin stdout tty urandom zero "
    );
}

fn timeout_kills_tree() {
    let sb = sandbox(Policy::default());
    let t = std::time::Instant::now();
    let o = sh(
        &sb,
        "sleep 300 & setsid sleep 300 & (sleep 100 &); wait",
        Some(0.3),
    );
    assert!(o.timed_out);
    assert!(t.elapsed().as_secs_f64() < 5.0);
    let o = sh(&sb, "ls /proc | grep -c '^[0-9]'", None);
    // init, the reaper, sh and ls/grep: nothing from the previous call survives.
    let n: u32 = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    assert!(n <= 5, "{n} processes");
    let o = sh(&sb, "(sleep 5 &) ; echo done", Some(10.0));
    assert!(
        !o.timed_out && o.wall_time < 4.0,
        "grandchild holding the pipe delayed the call"
    );
}

fn output_is_bounded() {
    let sb = sandbox(Policy {
        max_output_bytes: 1000,
        ..Default::default()
    });
    let o = sh(&sb, "head -c 100000 /dev/zero | tr '\\0' a; echo END", None);
    assert!(o.stdout_truncated);
    assert_eq!(o.stdout.len(), 1000);
    assert_eq!(o.stdout_total, 100_004);
    assert!(o.stdout.ends_with(b"END\n"));
}

fn files_and_python() {
    let sb = sandbox(Policy::default());
    sb.write_file(b"a.txt", b"data", false).unwrap();
    assert_eq!(sh(&sb, "cat /workspace/a.txt", None).stdout, b"data");
    sh(
        &sb,
        "echo x > /tmp/b; ln -s /etc/passwd /workspace/l; ln -s ../../.. /workspace/up",
        None,
    );
    assert_eq!(sb.read_file(b"/tmp/b", None).unwrap(), b"x\n");
    assert!(matches!(
        sb.read_file(b"../../etc/passwd", None),
        Err(Error::Path(_))
    ));
    assert!(matches!(sb.read_file(b"l", None), Err(Error::Path(_))));
    assert!(matches!(
        sb.read_file(b"up/etc/hostname", None),
        Err(Error::Path(_))
    ));
    assert!(matches!(
        sb.write_file(b"/usr/x", b"", false),
        Err(Error::Path(_))
    ));
    // parents: directories made beneath the root only, never through an escaping link.
    assert!(matches!(
        sb.write_file(b"d/e/f.txt", b"x", false),
        Err(Error::Path(_))
    ));
    sb.write_file(b"d/e/f.txt", b"deep", true).unwrap();
    sb.write_file(b"/tmp/g//h/./i.txt", b"t", true).unwrap();
    assert_eq!(
        sb.read_file(b"/workspace/d/e/f.txt", None).unwrap(),
        b"deep"
    );
    assert_eq!(sb.read_file(b"/tmp/g/h/i.txt", None).unwrap(), b"t");
    sh(&sb, "ln -s /etc /workspace/etc_link", None);
    for p in [&b"up/x/y.txt"[..], b"etc_link/x/y.txt", b"../x/y.txt"] {
        let r = sb.write_file(p, b"", true);
        assert!(matches!(r, Err(Error::Path(_))), "{r:?}");
    }
    assert!(matches!(
        sb.write_file(b"/usr/newdir/x", b"", true),
        Err(Error::Path(_))
    ));
    assert!(matches!(
        sb.read_file(b"/proc/1/environ", None),
        Err(Error::Path(_))
    ));
    let o = sb
        .run_python(b"import os\nprint(6*7, os.getcwd())", None)
        .unwrap();
    assert_eq!(
        o.stdout,
        b"42 /workspace\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = sb.run_python(b"raise SystemExit(4)", None).unwrap();
    assert_eq!(o.exit_code, Some(4));
    let o = sb
        .run_python(b"import time\nwhile True: pass", Some(0.3))
        .unwrap();
    assert!(o.timed_out);
    let o = sb
        .run_python(b"print(open('/workspace/a.txt').read())", None)
        .unwrap();
    assert_eq!(o.stdout, b"data\n");
    sb.close();
    assert!(matches!(
        sb.exec(&ExecRequest {
            argv: vec![b"true".to_vec()],
            ..Default::default()
        }),
        Err(Error::Closed)
    ));
}

fn spawn_background() {
    let sb = sandbox(Policy::default());
    let req = |cmd: &str| ExecRequest {
        argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), cmd.as_bytes().to_vec()],
        ..Default::default()
    };
    // Outlives the call that started it; output is read incrementally.
    let id = sb
        .spawn(&req(
            "echo start; while [ ! -e /tmp/go ]; do sleep 0.01; done; echo end >&2; exit 3",
        ))
        .unwrap();
    let mut out = Vec::new();
    while out != b"start\n" {
        let s = sb.process(id, false, 1 << 20, 1 << 20).unwrap();
        assert!(s.running);
        out.extend(s.stdout);
    }
    sh(&sb, "touch /tmp/go", None);
    let s = sb.wait_process(id, Some(20.0), &|| false).unwrap().unwrap();
    assert_eq!((s.running, s.exit_code, s.signal), (false, Some(3), None));
    let s = sb.process(id, false, 1 << 20, 1 << 20).unwrap();
    assert_eq!((s.stderr.as_slice(), s.drained), (&b"end\n"[..], true));
    assert!(matches!(sb.process(id, false, 0, 0), Err(Error::Policy(_))));
    // kill() ends the whole tree; a wait that times out says so.
    let id = sb.spawn(&req("sleep 100 & sleep 100")).unwrap();
    assert!(sb
        .wait_process(id, Some(0.05), &|| false)
        .unwrap()
        .is_none());
    let s = sb.process(id, true, 0, 0).unwrap();
    assert_eq!((s.running, s.signal), (false, Some(libc::SIGKILL)));
    let o = sh(&sb, "ps -e -o comm= 2>/dev/null | grep -c sleep", None);
    assert_eq!(o.stdout, b"0\n", "{}", String::from_utf8_lossy(&o.stderr));
    // reset(): background processes killed, writable directories emptied.
    let id = sb.spawn(&req("sleep 100")).unwrap();
    sh(
        &sb,
        "mkdir -p d/e && touch d/e/f /tmp/t /dev/shm/s && chmod 0 d",
        None,
    );
    sb.reset().unwrap();
    let o = sh(
        &sb,
        "ls -A /workspace /tmp /dev/shm; ps -e -o comm= | grep -c sleep",
        None,
    );
    assert_eq!(o.stdout, b"/dev/shm:\n\n/tmp:\n\n/workspace:\n0\n");
    assert!(matches!(sb.process(id, false, 0, 0), Err(Error::Policy(_))));
}

fn snapshot_and_fork() {
    let sb = sandbox(Policy::default());
    sh(
        &sb,
        "mkdir d && echo s > d/f && ln -s d/f l && chmod 600 d/f",
        None,
    );
    let dir = std::env::temp_dir().join(format!("dsec-core-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    let e = sb.export_workspace(&dir).unwrap();
    assert_eq!((e.dirs, e.files, e.symlinks, e.bytes), (1, 1, 1, 2));
    sb.close();
    let fork = |_| {
        sandbox(Policy {
            snapshot: Some(dir.to_str().unwrap().as_bytes().to_vec()),
            ..Default::default()
        })
    };
    let (a, b) = (fork(0), fork(1));
    assert_eq!(sh(&a, "echo a >> d/f; cat l", None).stdout, b"s\na\n");
    assert_eq!(sh(&b, "cat l; stat -c %a d/f", None).stdout, b"s\n600\n");
    assert_eq!(std::fs::read(dir.join("d/f")).unwrap(), b"s\n");
    drop((a, b));
    std::fs::remove_dir_all(&dir).unwrap();
}

fn main() {
    if std::env::var_os("DSEC_TEST_INIT").is_some() {
        std::process::exit(dsec_core::init::main());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("sandbox tests skipped: they need root");
        return;
    }
    let tests: [(&str, fn()); 7] = [
        ("exec_basics", exec_basics),
        ("posture", posture),
        ("timeout_kills_tree", timeout_kills_tree),
        ("output_is_bounded", output_is_bounded),
        ("files_and_python", files_and_python),
        ("spawn_background", spawn_background),
        ("snapshot_and_fork", snapshot_and_fork),
    ];
    for (name, f) in tests {
        f();
        println!("test {name} ... ok");
    }
}

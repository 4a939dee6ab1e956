//! Naming the signal that ended an `exec` process, and which configured limit likely sent it.

use drover_shared::settings::ExecHandler;

/// The conventional name of Linux signal `sig`, if it has one.
pub fn name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        16 => "SIGSTKFLT",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        21 => "SIGTTIN",
        22 => "SIGTTOU",
        23 => "SIGURG",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        26 => "SIGVTALRM",
        27 => "SIGPROF",
        28 => "SIGWINCH",
        29 => "SIGIO",
        30 => "SIGPWR",
        31 => "SIGSYS",
        _ => return None,
    })
}

/// `SIGKILL (9)`, or `signal 40` for one without a name.
pub fn describe(sig: i32) -> String {
    match name(sig) {
        Some(n) => format!("{n} ({sig})"),
        None => format!("signal {sig}"),
    }
}

/// Which limit of `config` probably caused signal `sig`, as words for the error message.
pub fn limit_hint(sig: i32, config: &ExecHandler) -> Option<String> {
    match name(sig)? {
        "SIGXCPU" => Some(match config.cpu_secs {
            Some(s) => format!("CPU time limit of {s} s reached"),
            None => "CPU time limit (the attempt timeout) reached".to_owned(),
        }),
        "SIGKILL" => Some(format!(
            "by the CPU hard limit, the kernel's OOM killer or another process \
             (memory limit {} MiB)",
            config.memory_mb
        )),
        "SIGSEGV" | "SIGABRT" | "SIGBUS" => Some(format!(
            "possibly an allocation refused by the memory limit of {} MiB",
            config.memory_mb
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_hints() {
        assert_eq!(describe(9), "SIGKILL (9)");
        assert_eq!(describe(24), "SIGXCPU (24)");
        assert_eq!(describe(64), "signal 64");
        assert_eq!(describe(-1), "signal -1");
        let cfg = ExecHandler {
            cpu_secs: Some(3),
            memory_mb: 64,
            ..ExecHandler::default()
        };
        assert_eq!(
            limit_hint(24, &cfg).as_deref(),
            Some("CPU time limit of 3 s reached")
        );
        assert!(limit_hint(6, &cfg).is_some_and(|h| h.contains("64 MiB")));
        assert_eq!(limit_hint(15, &cfg), None);
        assert_eq!(limit_hint(99, &cfg), None);
    }
}

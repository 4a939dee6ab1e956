//! [`Health`]: the liveness and readiness a component reports on `/healthz` and `/readyz`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Liveness states, stored in one atomic so `/healthz` and [`Health::set_live`] never lock.
const STARTING: u8 = 0;
const LIVE: u8 = 1;
const STOPPED: u8 = 2;

/// The reason `/readyz` gives before the component first calls [`Health::set_ready`].
const NOT_READY_YET: &str = "starting";

/// A component's liveness, readiness and named checks, shared between the component (which
/// updates it) and the ops server (which reports it).
///
/// Cloning is cheap (one `Arc`); every clone sees the same state. Liveness is one atomic;
/// readiness and checks sit behind one short-held mutex, and setting a value equal to the current
/// one only compares.
///
/// * **Live** (`/healthz`): the component's main loop is running. Starts not live ("starting");
///   [`set_live(false)`](Health::set_live) after having been live reports "stopped".
/// * **Ready** (`/readyz`): live, the component's own flag set by [`set_ready`](Health::set_ready)
///   (for example: connected to NATS and provisioned), and every named check passing
///   ([`set_check`](Health::set_check)). Starts not ready ("starting").
///
/// ```
/// use drover_shared::ops::Health;
///
/// let health = Health::new();
/// health.set_live(true);
/// health.set_ready(true, "");
/// assert!(health.is_ready());
///
/// health.set_check("nats", Err("disconnected"));
/// assert_eq!(health.not_ready_reasons(), vec!["check nats failing: disconnected".to_string()]);
///
/// health.set_check("nats", Ok(()));
/// assert!(health.is_ready());
/// ```
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    live: AtomicU8,
    ready: Mutex<Readiness>,
}

#[derive(Debug)]
struct Readiness {
    /// `None` = ready by the component's own flag; `Some(reason)` = not ready, and why.
    not_ready: Option<String>,
    /// Named checks: `None` = passing, `Some(reason)` = failing.
    checks: BTreeMap<String, Option<String>>,
}

impl Default for Health {
    /// Same as [`Health::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    /// A new handle: not live ("starting"), not ready ("starting"), no checks.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                live: AtomicU8::new(STARTING),
                ready: Mutex::new(Readiness {
                    not_ready: Some(NOT_READY_YET.to_owned()),
                    checks: BTreeMap::new(),
                }),
            }),
        }
    }

    /// Marks the main loop as running (`true`) or stopped (`false`).
    pub fn set_live(&self, live: bool) {
        self.inner
            .live
            .store(if live { LIVE } else { STOPPED }, Ordering::Release);
    }

    /// Sets the component's own readiness flag; `reason` says why it is not ready and is ignored
    /// when `ready` is true.
    pub fn set_ready(&self, ready: bool, reason: &str) {
        let mut state = self.lock();
        match (&mut state.not_ready, ready) {
            (None, true) => {}
            (slot @ Some(_), true) => *slot = None,
            (Some(current), false) if current == reason => {}
            (slot, false) => *slot = Some(reason.to_owned()),
        }
    }

    /// Records the result of the named check (`Ok(())` = passing, `Err(reason)` = failing).
    /// Readiness requires every registered check to pass; a failing check is listed by name in
    /// the `/readyz` body.
    pub fn set_check(&self, name: &str, status: Result<(), &str>) {
        let mut state = self.lock();
        let failing = status.err();
        match state.checks.get_mut(name) {
            Some(current) if current.as_deref() == failing => {}
            Some(current) => *current = failing.map(str::to_owned),
            None => {
                state
                    .checks
                    .insert(name.to_owned(), failing.map(str::to_owned));
            }
        }
    }

    /// Forgets the named check (it no longer counts for readiness).
    pub fn remove_check(&self, name: &str) {
        self.lock().checks.remove(name);
    }

    /// Whether the main loop is running.
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire) == LIVE
    }

    /// Why the component is not live, or `None` when it is.
    pub fn not_live_reason(&self) -> Option<&'static str> {
        match self.inner.live.load(Ordering::Acquire) {
            LIVE => None,
            STARTING => Some("starting"),
            _ => Some("stopped"),
        }
    }

    /// Whether the component is ready: live, its own flag set, every check passing.
    pub fn is_ready(&self) -> bool {
        self.is_live() && {
            let state = self.lock();
            state.not_ready.is_none() && state.checks.values().all(Option::is_none)
        }
    }

    /// Every reason the component is not ready, one line each (empty when ready): `not live: …`,
    /// `not ready: …`, then `check NAME failing: …` for each failing check, by name.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if let Some(why) = self.not_live_reason() {
            reasons.push(format!("not live: {why}"));
        }
        let state = self.lock();
        if let Some(why) = &state.not_ready {
            reasons.push(format!("not ready: {why}"));
        }
        for (name, status) in &state.checks {
            if let Some(why) = status {
                reasons.push(format!("check {name} failing: {why}"));
            }
        }
        reasons
    }

    /// The readiness mutex; a panic elsewhere while holding it leaves plain data, so poisoning is
    /// ignored rather than spread to the ops server.
    fn lock(&self) -> MutexGuard<'_, Readiness> {
        self.inner
            .ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

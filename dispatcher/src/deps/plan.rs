//! Pure dependency decisions: whether a task may start given its parents' states, what an
//! intake message's tasks come to (dispatch, hold, `upstream_failed`), the records those write,
//! and the leader's in-memory parent → children index.

use drover_shared::error::{ApiError, ErrorCode};
use drover_shared::task::{ErrorKind, Task, TaskError, TaskRecord, TaskState};
use std::collections::{BTreeSet, HashMap, HashSet};

/// What is known of one parent when a dependent is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parent {
    /// It exists and has not finished (or is dispatched in this very message or chunk).
    Pending,
    /// It finished in this state.
    Finished(TaskState),
    /// No task has that id.
    Missing,
}

impl Parent {
    /// What a parent's record (or its absence) says.
    pub fn of(record: Option<&TaskRecord>) -> Self {
        match record {
            None => Parent::Missing,
            Some(r) if r.state.is_terminal() => Parent::Finished(r.state),
            Some(_) => Parent::Pending,
        }
    }
}

/// Whether a dependent may start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Every parent succeeded: dispatch it.
    Ready,
    /// Some parent has not finished (or is not known yet): hold it.
    Wait,
    /// A parent ended without success: the task is `upstream_failed` because of it.
    Blocked {
        /// The parent that failed.
        parent: String,
        /// How it ended (`failed`, `cancelled`, `upstream_failed`; or missing, as `failed`).
        state: TaskState,
    },
}

/// Decides a dependent from its parents' states (in `depends_on` order; the first failed parent
/// is the one named).
pub fn readiness<'a>(parents: impl IntoIterator<Item = (&'a str, Parent)>) -> Readiness {
    let mut wait = false;
    for (id, p) in parents {
        match p {
            Parent::Finished(TaskState::Succeeded) => {}
            Parent::Finished(state) => {
                return Readiness::Blocked {
                    parent: id.to_owned(),
                    state,
                };
            }
            // A parent whose record expired or was never written while a child waits: the child
            // cannot ever start, so it fails rather than waiting forever.
            Parent::Missing => {
                return Readiness::Blocked {
                    parent: id.to_owned(),
                    state: TaskState::Failed,
                };
            }
            Parent::Pending => wait = true,
        }
    }
    if wait {
        Readiness::Wait
    } else {
        Readiness::Ready
    }
}

/// The `missing_dependency` error of a task (at `index` of an array) depending on `parent`.
pub fn missing_error(task: &str, parent: &str, index: Option<usize>) -> ApiError {
    let e = ApiError::new(
        ErrorCode::MissingDependency,
        format!(
            "task {task:?} depends on {parent:?}, which is neither in this submission nor a known task; submit the dependency first (or in the same array) and name it by its id"
        ),
    )
    .with_field("depends_on");
    match index {
        Some(i) => e.at_index(i),
        None => e,
    }
}

/// Finds the first dependency of `tasks` (an accepted message, in submit order, with each task's
/// `depends_on`) that is neither in the message nor known: `known(id)` says whether a task
/// outside the message exists. Returns the error to reject the message with.
pub fn find_missing<'a>(
    tasks: &[(&'a str, &'a [String])],
    is_array: bool,
    known: impl Fn(&str) -> bool,
) -> Option<ApiError> {
    let inside: HashSet<&str> = tasks.iter().map(|(id, _)| *id).collect();
    for (i, (id, deps)) in tasks.iter().enumerate() {
        if let Some(d) = deps
            .iter()
            .find(|d| !inside.contains(d.as_str()) && !known(d))
        {
            return Some(missing_error(id, d, is_array.then_some(i)));
        }
    }
    None
}

/// What one task of an intake message comes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// No dependencies, or all succeeded: dispatch now.
    Dispatch,
    /// Write a `scheduled` record and hold it until its parents succeed.
    Hold,
    /// A parent already failed: write this terminal record, never run it.
    UpstreamFailed {
        /// The failed parent.
        parent: String,
        /// How it ended.
        state: TaskState,
    },
}

/// Decides every task of one intake message. `tasks` are in submit order with their
/// `depends_on`; an in-message parent counts as pending unless it is itself `upstream_failed`
/// (then so are its dependents, transitively); `outside(id)` is the state of a parent outside
/// the message. The message's workflow is acyclic (checked at validation).
pub fn admit(tasks: &[(&str, &[String])], outside: impl Fn(&str) -> Parent) -> Vec<Admission> {
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .map(|(i, (id, _))| (*id, i))
        .collect();
    let mut result: Vec<Option<Admission>> = vec![None; tasks.len()];
    // Acyclic, so repeated passes settle every task within `len` rounds.
    for _ in 0..=tasks.len() {
        let mut progress = false;
        for (i, (_, deps)) in tasks.iter().enumerate() {
            if result[i].is_some() {
                continue;
            }
            let mut parents = Vec::with_capacity(deps.len());
            let mut unsettled = false;
            for d in deps.iter() {
                let p = match index.get(d.as_str()) {
                    Some(&j) => match &result[j] {
                        None => {
                            unsettled = true;
                            break;
                        }
                        Some(Admission::UpstreamFailed { .. }) => {
                            Parent::Finished(TaskState::UpstreamFailed)
                        }
                        Some(_) => Parent::Pending,
                    },
                    None => outside(d),
                };
                parents.push((d.as_str(), p));
            }
            if unsettled {
                continue;
            }
            result[i] = Some(match readiness(parents) {
                Readiness::Ready => Admission::Dispatch,
                Readiness::Wait => Admission::Hold,
                Readiness::Blocked { parent, state } => Admission::UpstreamFailed { parent, state },
            });
            progress = true;
        }
        if !progress {
            break;
        }
    }
    // A cycle cannot reach here (validated); hold anything unsettled rather than run it early.
    result
        .into_iter()
        .map(|a| a.unwrap_or(Admission::Hold))
        .collect()
}

/// The `scheduled` record of a held task.
pub fn scheduled_record(task: &Task) -> TaskRecord {
    let submitted =
        chrono::DateTime::from_timestamp_millis(task.submitted_ms).unwrap_or_else(chrono::Utc::now);
    TaskRecord::new(task, TaskState::Scheduled, submitted)
}

/// The error of a task that never ran because `parent` ended in `state`.
pub fn upstream_error(parent: &str, state: TaskState) -> TaskError {
    TaskError {
        kind: ErrorKind::Cancelled,
        message: format!(
            "dependency {parent:?} ended {state} (not succeeded), so this task never ran"
        ),
    }
}

/// The terminal `upstream_failed` record of `record` (any non-terminal state) or, with no
/// record, of `task`.
pub fn upstream_failed(
    base: TaskRecord,
    parent: &str,
    state: TaskState,
    now: chrono::DateTime<chrono::Utc>,
) -> TaskRecord {
    let mut r = base;
    r.state = TaskState::UpstreamFailed;
    r.finished_at = Some(now);
    r.started_at = r.started_at.or(Some(now));
    r.next_run_at = None;
    r.error = Some(upstream_error(parent, state));
    r
}

/// The leader's view of held tasks: child → its parents, parent → its held children.
#[derive(Debug, Default)]
pub struct Index {
    parents: HashMap<String, Vec<String>>,
    children: HashMap<String, BTreeSet<String>>,
}

impl Index {
    /// Records that `child` waits for `parents`. Returns `false` if it was held already.
    pub fn hold(&mut self, child: &str, parents: &[String]) -> bool {
        if self.parents.contains_key(child) {
            return false;
        }
        for p in parents {
            self.children
                .entry(p.clone())
                .or_default()
                .insert(child.to_owned());
        }
        self.parents.insert(child.to_owned(), parents.to_vec());
        true
    }

    /// Forgets `child` (released or finished); returns its parents if it was held. Whoever
    /// removes a child owns its release, so no child is released twice by one leader.
    pub fn remove(&mut self, child: &str) -> Option<Vec<String>> {
        let parents = self.parents.remove(child)?;
        for p in &parents {
            if let Some(set) = self.children.get_mut(p) {
                set.remove(child);
                if set.is_empty() {
                    self.children.remove(p);
                }
            }
        }
        Some(parents)
    }

    /// The held children of `parent`, sorted.
    pub fn children_of(&self, parent: &str) -> Vec<String> {
        self.children
            .get(parent)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The parents of a held `child`.
    pub fn parents_of(&self, child: &str) -> Option<&[String]> {
        self.parents.get(child).map(Vec::as_slice)
    }

    /// `true` if `child` is held.
    pub fn is_held(&self, child: &str) -> bool {
        self.parents.contains_key(child)
    }

    /// Number of held tasks.
    pub fn len(&self) -> usize {
        self.parents.len()
    }

    /// `true` when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn readiness_needs_every_parent_succeeded() {
        let ok = Parent::Finished(TaskState::Succeeded);
        assert_eq!(readiness([("a", ok), ("b", ok)]), Readiness::Ready);
        assert_eq!(
            readiness([("a", ok), ("b", Parent::Pending)]),
            Readiness::Wait
        );
        assert_eq!(
            readiness([
                ("a", Parent::Pending),
                ("b", Parent::Finished(TaskState::Cancelled))
            ]),
            Readiness::Blocked {
                parent: "b".into(),
                state: TaskState::Cancelled
            }
        );
        assert_eq!(
            readiness([("gone", Parent::Missing)]),
            Readiness::Blocked {
                parent: "gone".into(),
                state: TaskState::Failed
            }
        );
        assert_eq!(readiness([]), Readiness::Ready);
    }

    #[test]
    fn admit_holds_in_message_children_and_fails_transitively() {
        let a = deps(&[]);
        let b = deps(&["a", "old-ok"]);
        let c = deps(&["old-bad"]);
        let d = deps(&["c", "b"]);
        let e = deps(&["old-ok"]);
        let tasks: Vec<(&str, &[String])> =
            vec![("d", &d), ("a", &a), ("b", &b), ("c", &c), ("e", &e)];
        let got = admit(&tasks, |id| match id {
            "old-ok" => Parent::Finished(TaskState::Succeeded),
            "old-bad" => Parent::Finished(TaskState::Failed),
            _ => Parent::Pending,
        });
        assert_eq!(
            got,
            vec![
                Admission::UpstreamFailed {
                    parent: "c".into(),
                    state: TaskState::UpstreamFailed
                },
                Admission::Dispatch,
                Admission::Hold,
                Admission::UpstreamFailed {
                    parent: "old-bad".into(),
                    state: TaskState::Failed
                },
                Admission::Dispatch,
            ]
        );
    }

    #[test]
    fn missing_dependencies_are_named_with_their_index() {
        let a = deps(&[]);
        let b = deps(&["a", "known", "nope"]);
        let tasks: Vec<(&str, &[String])> = vec![("a", &a), ("b", &b)];
        let e = find_missing(&tasks, true, |id| id == "known").unwrap();
        assert_eq!(e.code, ErrorCode::MissingDependency);
        assert_eq!(e.index, Some(1));
        assert!(e.message.contains("\"nope\""));
        assert!(find_missing(&tasks, true, |id| id == "known" || id == "nope").is_none());
        let e = find_missing(&[("x", &deps(&["y"]))], false, |_| false).unwrap();
        assert_eq!(e.index, None);
    }

    #[test]
    fn index_tracks_children_and_releases_once() {
        let mut ix = Index::default();
        assert!(ix.hold("c", &deps(&["a", "b"])));
        assert!(!ix.hold("c", &deps(&["a"])));
        assert!(ix.hold("d", &deps(&["a"])));
        assert_eq!(ix.children_of("a"), ["c", "d"]);
        assert_eq!(ix.parents_of("c").unwrap(), ["a", "b"]);
        assert_eq!(ix.remove("c"), Some(deps(&["a", "b"])));
        assert_eq!(ix.remove("c"), None);
        assert_eq!(ix.children_of("a"), ["d"]);
        assert!(ix.children_of("b").is_empty());
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn upstream_failed_records_are_terminal_and_name_the_parent() {
        let task = Task {
            id: "c".into(),
            queue: "q".into(),
            task_type: "noop".into(),
            payload: serde_json::value::RawValue::from_string("null".into()).unwrap(),
            attempt: 1,
            max_attempts: 1,
            timeout_ms: 1000,
            key: None,
            backoff: None,
            shard: None,
            parent: None,
            submitted_ms: 5,
            meta: Default::default(),
        };
        let base = scheduled_record(&task);
        assert_eq!(base.state, TaskState::Scheduled);
        let r = upstream_failed(base, "p", TaskState::Failed, chrono::Utc::now());
        assert_eq!(r.state, TaskState::UpstreamFailed);
        assert!(r.state.is_terminal());
        assert!(r.finished_at.is_some() && r.started_at.is_some());
        assert!(r.error.unwrap().message.contains("\"p\""));
    }
}

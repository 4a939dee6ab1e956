//! Ids of a submission and the dependency check of a workflow.

use super::*;
use crate::error::{ApiError, ErrorCode};
use std::collections::{HashMap, HashSet};

// ---- ids and workflows ------------------------------------------------------------------------

/// Gives every task of a submission its id (SPEC §1.1, "Ids").
///
/// A client-chosen id is kept. Otherwise the base is the message's `Nats-Msg-Id` (which must
/// then match the id pattern) or `_s<stream seq>`; a single task takes the base itself and
/// array elements take `<base>-<index>`. Two tasks of one array with the same id are a
/// `duplicate` error.
pub fn assign_ids(
    sub: &mut Submission,
    msg_id: Option<&str>,
    stream_seq: u64,
) -> Result<(), ApiError> {
    let base = match msg_id {
        Some(m) if !is_valid_id(m) => {
            return Err(ApiError::new(
                ErrorCode::InvalidField,
                format!("header Nats-Msg-Id is used as the task id, and {ID_RULE}; got {m:?}"),
            )
            .with_field("Nats-Msg-Id"));
        }
        Some(m) => m.to_owned(),
        None => format!("_s{stream_seq}"),
    };
    let is_array = sub.is_array;
    for (i, t) in sub.tasks.iter_mut().enumerate() {
        if t.id.is_none() {
            t.id = Some(if is_array {
                format!("{base}-{i}")
            } else {
                base.clone()
            });
        }
    }
    let mut seen = HashMap::with_capacity(sub.tasks.len());
    for (i, t) in sub.tasks.iter().enumerate() {
        let id = t.id.as_deref().unwrap_or_default();
        if let Some(first) = seen.insert(id, i) {
            return Err(ApiError::new(
                ErrorCode::Duplicate,
                format!("id {id:?} is used by tasks [{first}] and [{i}] of this array; ids must be unique"),
            )
            .with_field("id")
            .at_index(i));
        }
    }
    Ok(())
}

/// Checks the dependencies of a submission whose ids are assigned: no task depends on itself or
/// on a chain that leads back to it (`cycle`). Returns the ids depended on that are not in the
/// submission; the caller checks that they exist (`missing_dependency` otherwise).
pub fn check_workflow(tasks: &[TaskSpec]) -> Result<Vec<String>, ApiError> {
    let index: HashMap<&str, usize> = tasks
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.id.as_deref().map(|id| (id, i)))
        .collect();
    let mut external = Vec::new();
    let mut seen_external = HashSet::new();
    // Kahn's algorithm over the in-submission edges.
    let mut indegree = vec![0usize; tasks.len()];
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); tasks.len()];
    for (i, t) in tasks.iter().enumerate() {
        for dep in &t.depends_on {
            match index.get(dep.as_str()) {
                Some(&j) => {
                    indegree[i] += 1;
                    children[j].push(i);
                }
                None => {
                    if seen_external.insert(dep.as_str()) {
                        external.push(dep.clone());
                    }
                }
            }
        }
    }
    let mut ready: Vec<usize> = (0..tasks.len()).filter(|&i| indegree[i] == 0).collect();
    let mut done = 0;
    while let Some(j) = ready.pop() {
        done += 1;
        for &i in &children[j] {
            indegree[i] -= 1;
            if indegree[i] == 0 {
                ready.push(i);
            }
        }
    }
    if done < tasks.len() {
        let i = indegree.iter().position(|&d| d > 0).unwrap_or_default();
        let id = tasks[i].id.as_deref().unwrap_or_default();
        return Err(ApiError::new(
            ErrorCode::Cycle,
            format!(
                "task {id:?} is part of a dependency cycle: following depends_on from it leads back to it; a workflow must be acyclic"
            ),
        )
        .with_field("depends_on")
        .at_index(i));
    }
    Ok(external)
}

//! Every NATS name Drover uses (SPEC §1–§2), derived from one prefix.
//!
//! Subjects are `<prefix>.…`, streams `<PREFIX>_…` (upper-cased), KV buckets and consumers
//! `<prefix>-…`. Keeping them in one place means `--prefix` moves all of them together.

use std::fmt;

/// The default prefix of every subject, stream, bucket and consumer.
pub const DEFAULT_PREFIX: &str = "drover";

/// Why a prefix or a queue name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The prefix is not a single lower-case subject token.
    #[error(
        "invalid prefix {0:?}: use 1-32 characters from a-z, 0-9, '_' and '-', starting with a letter"
    )]
    Prefix(String),
    /// The queue name does not match `[a-z0-9][a-z0-9_-]{0,63}`.
    #[error("invalid queue name {0:?}: must match [a-z0-9][a-z0-9_-]{{0,63}}")]
    Queue(String),
}

/// `true` if `name` matches the queue pattern `[a-z0-9][a-z0-9_-]{0,63}`.
pub fn is_valid_queue(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 64
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Checks a queue name, returning it on success.
pub fn validate_queue(name: &str) -> Result<&str, NameError> {
    if is_valid_queue(name) {
        Ok(name)
    } else {
        Err(NameError::Queue(name.to_owned()))
    }
}

/// All names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    prefix: String,
    upper: String,
}

impl Default for Names {
    fn default() -> Self {
        Self::new(DEFAULT_PREFIX).expect("the default prefix is valid")
    }
}

impl fmt::Display for Names {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.prefix)
    }
}

impl Names {
    /// Names under `prefix`, which must be one lower-case subject token.
    pub fn new(prefix: &str) -> Result<Self, NameError> {
        let ok = !prefix.is_empty()
            && prefix.len() <= 32
            && prefix.as_bytes()[0].is_ascii_lowercase()
            && prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if !ok {
            return Err(NameError::Prefix(prefix.to_owned()));
        }
        Ok(Self {
            prefix: prefix.to_owned(),
            upper: prefix.to_ascii_uppercase().replace('-', "_"),
        })
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    // ---- streams -------------------------------------------------------------------------

    /// `<PREFIX>_<SUFFIX>`, e.g. `DROVER_SUBMIT`.
    pub fn stream(&self, suffix: &str) -> String {
        format!("{}_{suffix}", self.upper)
    }
    /// Intake stream.
    pub fn submit_stream(&self) -> String {
        self.stream("SUBMIT")
    }
    /// Envelope stream.
    pub fn work_stream(&self) -> String {
        self.stream("WORK")
    }
    /// Worker → leader outcome stream.
    pub fn outcomes_stream(&self) -> String {
        self.stream("OUTCOMES")
    }
    /// Durable timers (message schedules).
    pub fn delayed_stream(&self) -> String {
        self.stream("DELAYED")
    }
    /// Event-triggered schedules.
    pub fn triggers_stream(&self) -> String {
        self.stream("TRIGGERS")
    }
    /// Lifecycle history.
    pub fn events_stream(&self) -> String {
        self.stream("EVENTS")
    }
    /// Dead, rejected and quarantined messages.
    pub fn dlq_stream(&self) -> String {
        self.stream("DLQ")
    }

    // ---- buckets and consumers ---------------------------------------------------------------

    /// `<prefix>-<suffix>`, e.g. `drover-tasks`.
    pub fn bucket(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }
    /// Intake consumer on the submit stream (leader only).
    pub fn intake_consumer(&self) -> String {
        self.bucket("intake")
    }
    /// Outcome consumer (leader only).
    pub fn outcomes_consumer(&self) -> String {
        self.bucket("outcomes")
    }
    /// Consumer of `<prefix>.due.>` on the delayed stream (leader only).
    pub fn due_consumer(&self) -> String {
        self.bucket("due")
    }
    /// Consumer of the trigger stream (leader only).
    pub fn triggers_consumer(&self) -> String {
        self.bucket("triggers")
    }
    /// Durable consumer of one work partition.
    pub fn work_consumer(&self, queue: &str, partition: u32) -> String {
        format!("{}-work-{queue}-{partition}", self.prefix)
    }

    // ---- subjects ------------------------------------------------------------------------

    /// `<prefix>.<rest>`.
    pub fn subject(&self, rest: &str) -> String {
        format!("{}.{rest}", self.prefix)
    }
    /// Where clients publish tasks for `queue`.
    pub fn submit_subject(&self, queue: &str) -> String {
        format!("{}.submit.{queue}", self.prefix)
    }
    /// Where envelopes of one partition go.
    pub fn work_subject(&self, queue: &str, partition: u32) -> String {
        format!("{}.work.{queue}.{partition}", self.prefix)
    }
    /// Where a worker reports the outcomes of one batch.
    pub fn outcome_subject(&self, queue: &str, batch: &str) -> String {
        format!("{}.outcome.{queue}.{batch}", self.prefix)
    }
    /// A delayed task's schedule subject.
    pub fn delayed_subject(&self, queue: &str, id: &str) -> String {
        format!("{}.delayed.{queue}.{id}", self.prefix)
    }
    /// Where delayed tasks of `queue` fire.
    pub fn due_subject(&self, queue: &str) -> String {
        format!("{}.due.{queue}", self.prefix)
    }
    /// Lifecycle events of `queue` entering `state`.
    pub fn events_subject(&self, queue: &str, state: &str) -> String {
        format!("{}.events.{queue}.{state}", self.prefix)
    }
    /// Dead letters of `queue`.
    pub fn dlq_subject(&self, queue: &str) -> String {
        format!("{}.dlq.{queue}", self.prefix)
    }
    /// Rejected submissions of `queue` (`_invalid` when the queue token itself is invalid).
    pub fn rejected_subject(&self, queue: &str) -> String {
        format!("{}.rejected.{queue}", self.prefix)
    }
    /// Tampered or undecodable envelopes.
    pub fn quarantine_subject(&self) -> String {
        format!("{}.quarantine", self.prefix)
    }
    /// Cancellation of a running task, heard by every worker.
    pub fn cancel_subject(&self, id: &str) -> String {
        format!("{}.ctl.cancel.{id}", self.prefix)
    }
    /// Request API endpoint, e.g. `api("status")` → `drover.api.status`.
    pub fn api(&self, endpoint: &str) -> String {
        format!("{}.api.{endpoint}", self.prefix)
    }

    /// Splits `<prefix>.work.<queue>.<partition>` into its queue and partition, or `None` if the
    /// subject is not a well-formed work subject under this prefix.
    pub fn parse_work_subject<'a>(&self, subject: &'a str) -> Option<(&'a str, u32)> {
        let rest = subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix(".work.")?;
        let (queue, partition) = rest.split_once('.')?;
        if !is_valid_queue(queue) || partition.is_empty() || partition.starts_with('+') {
            return None;
        }
        Some((queue, partition.parse().ok()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prefix() {
        let n = Names::new("acme-jobs").unwrap();
        assert_eq!(n.submit_stream(), "ACME_JOBS_SUBMIT");
        assert_eq!(n.bucket("tasks"), "acme-jobs-tasks");
        assert_eq!(n.work_subject("mail", 7), "acme-jobs.work.mail.7");
        assert_eq!(n.work_consumer("mail", 7), "acme-jobs-work-mail-7");
        assert_eq!(
            n.parse_work_subject("acme-jobs.work.mail.7"),
            Some(("mail", 7))
        );
        let d = Names::default();
        assert_eq!(d.intake_consumer(), "drover-intake");
        assert_eq!(d.api("status"), "drover.api.status");
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(Names::new("").is_err());
        assert!(Names::new("Drover").is_err());
        assert!(Names::new("a.b").is_err());
        assert!(is_valid_queue("default"));
        assert!(is_valid_queue("0-a_b"));
        assert!(!is_valid_queue("_x"));
        assert!(!is_valid_queue("A"));
        assert!(!is_valid_queue(&"a".repeat(65)));
        let n = Names::default();
        assert_eq!(n.parse_work_subject("drover.work.q.x"), None);
        assert_eq!(n.parse_work_subject("drover.work.q"), None);
        assert_eq!(n.parse_work_subject("drover.work.q.1.2"), None);
        assert_eq!(n.parse_work_subject("other.work.q.1"), None);
    }
}

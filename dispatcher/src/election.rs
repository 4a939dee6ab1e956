//! Leader election on the `drover-election` KV bucket (SPEC §5), as a pure state machine.
//!
//! Every replica campaigns with `create("leader")`; the winner renews with
//! `update(key, value, revision)` every lease/4. The lease is counted from the **send** time of
//! the last successful renewal, on this process's monotonic clock, and the leader stops leading
//! at once when a renewal fails or when `lease − margin` has passed without one. The `create`
//! revision is the epoch. The async loop feeds [`Event`]s in and carries out the [`Action`]s;
//! time is always passed in, so every rule here is tested without a server.

use std::time::{Duration, Instant};

/// Timing of the lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// The bucket's max_age: how long a lease lives without renewal.
    pub lease: Duration,
    /// Safety margin for clock skew between NATS servers and scheduling delays: a leader stops
    /// leading `margin` before its lease could have expired on the server.
    pub margin: Duration,
}

impl LeaseConfig {
    /// Renewal (and standby campaign) period: a quarter of the lease.
    pub fn period(&self) -> Duration {
        self.lease / 4
    }

    /// How long after a renewal's send time this process may still act as leader.
    pub fn validity(&self) -> Duration {
        self.lease.saturating_sub(self.margin)
    }
}

/// What the loop observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Time passed; check deadlines.
    Tick,
    /// A `create` sent at `sent_at` succeeded with `revision`: we won.
    Created {
        /// The new key revision, which becomes the epoch.
        revision: u64,
        /// When the request was sent.
        sent_at: Instant,
    },
    /// A `create` failed (the key exists, or NATS did not answer).
    CreateFailed,
    /// A renewal sent at `sent_at` succeeded with `revision`.
    Renewed {
        /// The key's new revision.
        revision: u64,
        /// When the request was sent.
        sent_at: Instant,
    },
    /// A renewal failed: someone else holds the key, or NATS did not answer in time.
    RenewFailed,
    /// The watch saw the key deleted, purged or expired (limit marker): campaign now.
    KeyGone,
    /// Graceful shutdown (SIGTERM): hand leadership over.
    Shutdown,
}

/// What the loop must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send `create("leader", value)`; report [`Event::Created`] or [`Event::CreateFailed`].
    Create,
    /// Send `update("leader", value, revision)`; report [`Event::Renewed`] or
    /// [`Event::RenewFailed`].
    Renew {
        /// The revision the update must match.
        revision: u64,
    },
    /// Start leading in `epoch`.
    StartLeading {
        /// The leader term, stamped on every envelope and state write.
        epoch: u64,
    },
    /// Stop leading at once: no dispatch, no state write.
    StopLeading {
        /// Why, for logs and metrics.
        reason: StepDown,
    },
    /// Hand over: NAK held intake, then `delete_expect_revision(revision)`.
    Resign {
        /// The revision to delete.
        revision: u64,
    },
}

/// Why a leader stopped leading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepDown {
    /// A renewal failed.
    RenewFailed,
    /// No successful renewal within `lease − margin` (e.g. the process was paused).
    LeaseExpired,
    /// Graceful shutdown.
    Shutdown,
}

impl StepDown {
    /// Stable name for logs and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RenewFailed => "renew_failed",
            Self::LeaseExpired => "lease_expired",
            Self::Shutdown => "shutdown",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not leading; campaign at `next_campaign`.
    Follower { next_campaign: Instant },
    /// A `create` is in flight.
    Campaigning,
    /// Leading in `epoch`; valid until `valid_until`; next renewal at `next_renew`.
    Leader {
        epoch: u64,
        revision: u64,
        valid_until: Instant,
        next_renew: Instant,
        renewing: bool,
    },
    /// Shut down; does nothing more.
    Stopped,
}

/// One replica's view of the election.
#[derive(Debug, Clone)]
pub struct Election {
    cfg: LeaseConfig,
    state: State,
}

impl Election {
    /// A follower that campaigns at once.
    pub fn new(cfg: LeaseConfig, now: Instant) -> Self {
        Self {
            cfg,
            state: State::Follower { next_campaign: now },
        }
    }

    /// The epoch this replica leads in, if it is leader right now (valid lease).
    pub fn leading(&self, now: Instant) -> Option<u64> {
        match self.state {
            State::Leader {
                epoch, valid_until, ..
            } if now < valid_until => Some(epoch),
            _ => None,
        }
    }

    /// Until when this replica may act as leader, if it holds the lease (valid or not).
    pub fn valid_until(&self) -> Option<Instant> {
        match self.state {
            State::Leader { valid_until, .. } => Some(valid_until),
            _ => None,
        }
    }

    /// When the loop should next send a [`Event::Tick`].
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Follower { next_campaign } => Some(next_campaign),
            State::Leader {
                valid_until,
                next_renew,
                renewing,
                ..
            } => Some(if renewing {
                valid_until
            } else {
                next_renew.min(valid_until)
            }),
            State::Campaigning | State::Stopped => None,
        }
    }

    /// Applies one event at `now`.
    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let period = self.cfg.period();
        match (self.state, event) {
            (State::Stopped, _) => {}
            (State::Leader { revision, .. }, Event::Shutdown) => {
                actions.push(Action::StopLeading {
                    reason: StepDown::Shutdown,
                });
                actions.push(Action::Resign { revision });
                self.state = State::Stopped;
            }
            (_, Event::Shutdown) => self.state = State::Stopped,

            // ---- follower ----
            (State::Follower { next_campaign }, Event::Tick) if now >= next_campaign => {
                self.state = State::Campaigning;
                actions.push(Action::Create);
            }
            (State::Follower { .. }, Event::KeyGone) => {
                self.state = State::Campaigning;
                actions.push(Action::Create);
            }
            (State::Campaigning, Event::Created { revision, sent_at }) => {
                let valid_until = sent_at + self.cfg.validity();
                if now < valid_until {
                    self.state = State::Leader {
                        epoch: revision,
                        revision,
                        valid_until,
                        next_renew: sent_at + period,
                        renewing: false,
                    };
                    actions.push(Action::StartLeading { epoch: revision });
                } else {
                    // The answer came too late to act on; the key will expire on its own.
                    self.state = State::Follower {
                        next_campaign: now + period,
                    };
                }
            }
            (State::Campaigning, Event::CreateFailed) => {
                self.state = State::Follower {
                    next_campaign: now + period,
                };
            }
            (State::Campaigning, Event::KeyGone) => {}

            // ---- leader ----
            (State::Leader { valid_until, .. }, _) if now >= valid_until => {
                self.state = State::Follower { next_campaign: now };
                actions.push(Action::StopLeading {
                    reason: StepDown::LeaseExpired,
                });
            }
            (
                State::Leader {
                    revision,
                    next_renew,
                    renewing: false,
                    epoch,
                    valid_until,
                },
                Event::Tick,
            ) if now >= next_renew => {
                self.state = State::Leader {
                    epoch,
                    revision,
                    valid_until,
                    next_renew,
                    renewing: true,
                };
                actions.push(Action::Renew { revision });
            }
            (
                State::Leader {
                    epoch, valid_until, ..
                },
                Event::Renewed { revision, sent_at },
            ) => {
                self.state = State::Leader {
                    epoch,
                    revision,
                    valid_until: valid_until.max(sent_at + self.cfg.validity()),
                    next_renew: sent_at + period,
                    renewing: false,
                };
            }
            (State::Leader { .. }, Event::RenewFailed) => {
                self.state = State::Follower {
                    next_campaign: now + period,
                };
                actions.push(Action::StopLeading {
                    reason: StepDown::RenewFailed,
                });
            }
            // Stale answers, ticks before a deadline, a watch event while leading: nothing.
            _ => {}
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE: Duration = Duration::from_millis(1500);
    const MARGIN: Duration = Duration::from_millis(250);

    fn cfg() -> LeaseConfig {
        LeaseConfig {
            lease: LEASE,
            margin: MARGIN,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A leader elected at `t0` with epoch 7.
    fn leader(t0: Instant) -> Election {
        let mut e = Election::new(cfg(), t0);
        assert_eq!(e.on_event(Event::Tick, t0), vec![Action::Create]);
        let acts = e.on_event(
            Event::Created {
                revision: 7,
                sent_at: t0,
            },
            t0 + ms(2),
        );
        assert_eq!(acts, vec![Action::StartLeading { epoch: 7 }]);
        e
    }

    #[test]
    fn wins_renews_every_quarter_lease_and_counts_from_send_time() {
        let t0 = Instant::now();
        let mut e = leader(t0);
        assert_eq!(e.leading(t0 + ms(10)), Some(7));
        assert_eq!(e.next_deadline(), Some(t0 + ms(375)));
        assert!(e.on_event(Event::Tick, t0 + ms(300)).is_empty());
        assert_eq!(
            e.on_event(Event::Tick, t0 + ms(375)),
            vec![Action::Renew { revision: 7 }]
        );
        // No second renewal while one is in flight.
        assert!(e.on_event(Event::Tick, t0 + ms(400)).is_empty());
        // The renewal was sent at 375 ms; the answer arrives late, at 900 ms. Validity counts
        // from the send: 375 + 1250.
        e.on_event(
            Event::Renewed {
                revision: 8,
                sent_at: t0 + ms(375),
            },
            t0 + ms(900),
        );
        assert_eq!(
            e.leading(t0 + ms(1624)),
            Some(7),
            "epoch stays the create revision"
        );
        assert_eq!(e.leading(t0 + ms(1625)), None);
        assert_eq!(
            e.on_event(Event::Tick, t0 + ms(750)),
            vec![Action::Renew { revision: 8 }]
        );
    }

    #[test]
    fn a_failed_renewal_stops_leading_at_once() {
        let t0 = Instant::now();
        let mut e = leader(t0);
        e.on_event(Event::Tick, t0 + ms(375));
        let acts = e.on_event(Event::RenewFailed, t0 + ms(380));
        assert_eq!(
            acts,
            vec![Action::StopLeading {
                reason: StepDown::RenewFailed
            }]
        );
        assert_eq!(e.leading(t0 + ms(381)), None);
    }

    #[test]
    fn a_paused_leader_fences_itself_on_its_own_clock() {
        // SIGSTOP: the process wakes long after its lease; the first thing it does is stop.
        let t0 = Instant::now();
        let mut e = leader(t0);
        assert_eq!(e.leading(t0 + ms(5000)), None, "no dispatch after validity");
        let acts = e.on_event(Event::Tick, t0 + ms(5000));
        assert_eq!(
            acts,
            vec![Action::StopLeading {
                reason: StepDown::LeaseExpired
            }]
        );
        // A late renewal answer after stepping down is ignored.
        assert!(
            e.on_event(
                Event::Renewed {
                    revision: 9,
                    sent_at: t0 + ms(375)
                },
                t0 + ms(5001)
            )
            .is_empty()
        );
        assert_eq!(e.leading(t0 + ms(5001)), None);
        // It campaigns again like any follower.
        assert_eq!(e.on_event(Event::Tick, t0 + ms(5001)), vec![Action::Create]);
    }

    #[test]
    fn an_in_flight_renewal_does_not_extend_validity() {
        let t0 = Instant::now();
        let mut e = leader(t0);
        e.on_event(Event::Tick, t0 + ms(375));
        assert_eq!(e.next_deadline(), Some(t0 + ms(1250)));
        let acts = e.on_event(Event::Tick, t0 + ms(1250));
        assert_eq!(
            acts,
            vec![Action::StopLeading {
                reason: StepDown::LeaseExpired
            }]
        );
    }

    #[test]
    fn followers_campaign_periodically_and_on_key_gone() {
        let t0 = Instant::now();
        let mut e = Election::new(cfg(), t0);
        assert_eq!(e.on_event(Event::Tick, t0), vec![Action::Create]);
        assert!(e.on_event(Event::CreateFailed, t0 + ms(1)).is_empty());
        assert_eq!(e.next_deadline(), Some(t0 + ms(376)));
        assert!(e.on_event(Event::Tick, t0 + ms(100)).is_empty());
        assert_eq!(
            e.on_event(Event::KeyGone, t0 + ms(101)),
            vec![Action::Create]
        );
        assert!(
            e.on_event(Event::KeyGone, t0 + ms(102)).is_empty(),
            "one create at a time"
        );
    }

    #[test]
    fn a_win_reported_after_its_validity_is_not_acted_on() {
        let t0 = Instant::now();
        let mut e = Election::new(cfg(), t0);
        e.on_event(Event::Tick, t0);
        let acts = e.on_event(
            Event::Created {
                revision: 3,
                sent_at: t0,
            },
            t0 + ms(1300),
        );
        assert!(acts.is_empty());
        assert_eq!(e.leading(t0 + ms(1300)), None);
    }

    #[test]
    fn shutdown_hands_over() {
        let t0 = Instant::now();
        let mut e = leader(t0);
        let acts = e.on_event(Event::Shutdown, t0 + ms(10));
        assert_eq!(
            acts,
            vec![
                Action::StopLeading {
                    reason: StepDown::Shutdown
                },
                Action::Resign { revision: 7 }
            ]
        );
        assert!(e.on_event(Event::Tick, t0 + ms(2000)).is_empty());
        let mut f = Election::new(cfg(), t0);
        assert!(f.on_event(Event::Shutdown, t0).is_empty());
        assert!(f.on_event(Event::Tick, t0).is_empty());
    }
}

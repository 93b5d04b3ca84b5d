//! The words the operator speaks in: the types of the StatefulJob's conditions and the reasons
//! of its conditions and events. One enum each, so a reason is spelled in one place and a
//! consumer (metrics, tests, GitOps health checks) matches on a value, not a string.

/// An enum whose variants are written as their own names.
macro_rules! named {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => stringify!($variant)),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

named! {
    /// The StatefulJob's condition types.
    ConditionType {
        /// The job runs as the spec wishes (or is suspended or ended as it wishes).
        Ready,
        /// A rollout is under way.
        Progressing,
        /// Something is wrong that the operator reports and works around.
        Degraded,
        /// kstatus: the operator is still working towards the spec.
        Reconciling,
        /// kstatus: the operator cannot reach the spec by itself.
        Stalled,
    }
}

named! {
    /// Reasons of conditions and events.
    Reason {
        Deploying,
        Running,
        Stable,
        Healthy,
        Ended,
        Suspended,
        Suspending,
        EngineFailing,
        Restarting,
        InvalidSpec,
        WaitingForCheckpoint,
        PreflightSkipped,
        PreflightFailed,
        UpgradeBlocked,
        Upgrading,
        SavepointFailed,
        UpgradeComplete,
        UpgradeFailed,
        RollingBack,
        RolledBack,
        RollbackFailing,
        /// A deleted Savepoint whose files a job still needs (an event on the Savepoint).
        DisposalDeferred,
        /// The job runs but a source cannot read (its brokers do not answer); it retries.
        SourceUnavailable,
    }
}

impl Reason {
    /// The outcome of an upgrade this event reports, as `sjob_operator_upgrades_total` counts
    /// it.
    pub fn upgrade_outcome(self) -> Option<&'static str> {
        match self {
            Reason::UpgradeComplete => Some("completed"),
            Reason::RollingBack => Some("rolled_back"),
            Reason::UpgradeBlocked => Some("blocked"),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_variants() {
        assert_eq!(ConditionType::Ready.as_str(), "Ready");
        assert_eq!(Reason::UpgradeComplete.to_string(), "UpgradeComplete");
        let mut names: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Reason::ALL.len());
    }
}

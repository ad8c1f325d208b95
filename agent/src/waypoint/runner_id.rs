//! The names the agent gives runners: the Waypoint runner ID `HOST-runner-N` and the
//! container `waypoint-runner-N`. Below [`super::runners`] and [`super::link`], which both
//! name runners.

use std::fmt;

use super::RUNNER_PREFIX;

/// A Waypoint runner ID as the agent makes them: `HOST-runner-N`, HOST a DNS name (the host
/// name, so that runners of several hosts differ), N from 1 to [`pilot_values::MAX_RUNNERS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerId {
    host: String,
    index: u32,
}

impl RunnerId {
    pub fn new(host: &str, index: u32) -> RunnerId {
        RunnerId {
            host: host.to_string(),
            index,
        }
    }

    /// Parses exactly the grammar above (no sign, no leading zero), so that an ID that comes
    /// over the network is one the agent could have made.
    pub fn parse(s: &str) -> Option<RunnerId> {
        let (host, n) = s.rsplit_once("-runner-")?;
        if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let index: u32 = n.parse().ok()?;
        let ok = (1..=pilot_values::MAX_RUNNERS).contains(&index)
            && !host.ends_with('.')
            && pilot_values::is_dns_name(host);
        ok.then(|| RunnerId::new(host, index))
    }

    pub fn index(&self) -> u32 {
        self.index
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-runner-{}", self.host, self.index)
    }
}

/// The name of runner `index` (1-based).
pub fn name(index: u32) -> String {
    format!("{RUNNER_PREFIX}{index}")
}

/// The index of a runner container's name (`waypoint-runner-N`).
pub fn index_of(name: &str) -> Option<u32> {
    let n = name.strip_prefix(RUNNER_PREFIX)?;
    if n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_names_give_their_index() {
        assert_eq!(index_of("waypoint-runner-3"), Some(3));
        assert_eq!(index_of("waypoint-runner-12"), Some(12));
        for bad in [
            "waypoint-runner-",
            "waypoint-runner-03",
            "waypoint-runner-x",
            "runner-1",
        ] {
            assert_eq!(index_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn runner_ids_are_the_agents_grammar() {
        let id = RunnerId::parse("vm-1.example-runner-3").unwrap();
        assert_eq!(id.index(), 3);
        assert_eq!(id.to_string(), "vm-1.example-runner-3");
        assert_eq!(RunnerId::new("h", 2).to_string(), "h-runner-2");
        // The last `-runner-` splits: a host name may contain the word.
        assert!(RunnerId::parse("my-runner-host-runner-1").is_some());
        for bad in [
            "",
            "h-runner-",
            "h-runner-0",
            "h-runner-01",
            "h-runner-+1",
            "h-runner-1x",
            "-runner-1",
            "h_x-runner-1",
            "h.-runner-1",
            "h -runner-1",
            "h-runner-99999999999",
            "h-runner-1\n",
            "runner-1",
        ] {
            assert_eq!(RunnerId::parse(bad), None, "{bad:?}");
        }
        let max = pilot_values::MAX_RUNNERS;
        assert!(RunnerId::parse(&format!("h-runner-{max}")).is_some());
        assert!(RunnerId::parse(&format!("h-runner-{}", max + 1)).is_none());
        assert!(RunnerId::parse(&format!("{}-runner-1", "a".repeat(254))).is_none());
    }
}
